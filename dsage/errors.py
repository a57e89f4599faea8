"""The public exceptions of dsage; `DsageError` is the root of all of them."""
from __future__ import annotations


class DsageError(Exception):
    """Root of every error dsage raises on purpose."""


class JobFailed(DsageError):
    """A job failed for good; `traceback` holds the worker's traceback text."""

    def __init__(self, job_id: int, traceback: str | None) -> None:
        self.job_id = job_id
        self.traceback = traceback or ""
        lines = self.traceback.strip().splitlines() or ["(no traceback)"]
        # a one-line error (the job's process died, a timeout) is said once
        details = f"\n{self.traceback}" if len(lines) > 1 else ""
        super().__init__(f"job {job_id} failed: {lines[-1]}{details}")


class JobKilled(DsageError):
    """The job was killed before it completed."""

    def __init__(self, job_id: int) -> None:
        self.job_id = job_id
        super().__init__(f"job {job_id} was killed")


class AuthError(DsageError):
    """The server refused this identity (unknown, revoked, wrong role or wrong owner)."""


class ConnectionLost(DsageError):
    """The connection to the server went away (or could not be made)."""


class RemoteError(DsageError):
    """The server refused a request; the message says why."""


class ProtocolError(DsageError):
    """A peer sent something that is not valid dsage protocol."""
