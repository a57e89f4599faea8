"""The client library: an async core (`connect_async`) and the blocking façade (`connect`)."""
from dsage.client.connection import AsyncClient, connect_async

__all__ = ["AsyncClient", "connect_async"]
