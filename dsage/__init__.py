"""dsage: Distributed Sage, a durable distributed job system for long Python computations.

    import dsage
    D = dsage.connect()                     # reads ~/.dsage (or $DSAGE_HOME)
    job = D.eval("2**64 + 1")
    job.wait(timeout=60)

See README.rst for the tour and the cluster set-up.
"""
from __future__ import annotations

__version__ = "0.1.0"

from dsage.errors import AuthError, ConnectionLost, DsageError, JobFailed, JobKilled, RemoteError
from dsage.job import Job, JobStatus

__all__ = ["AuthError", "ConnectionLost", "DistributedFunction", "DsageError", "Job", "JobFailed",
           "JobKilled", "JobStatus", "RemoteError", "as_completed", "connect", "start_all"]


def connect(address: str | None = None, cert: str | None = None, timeout: float = 30.0):
    """Connect to a dsage server and return a blocking `Dsage` session.

    Args:
        address: ``host:port``; by default the server named in the bundle.
        cert: the bundle file; by default ``$DSAGE_HOME/client.pem``.
        timeout: seconds to wait for the connection.
    """
    from dsage.client.blocking import connect as _connect

    return _connect(address, cert, timeout)


def start_all(workers: int = 2, **kw):
    """Start a local server and `workers` workers in a temporary home; returns (D, cluster)."""
    from dsage.client.local import start_all as _start_all

    return _start_all(workers=workers, **kw)


def as_completed(jobs, timeout: float | None = None):
    """Yield job handles as they finish (in any order)."""
    from dsage.client.blocking import as_completed as _as_completed

    return _as_completed(jobs, timeout)


def __getattr__(name: str):
    if name == "DistributedFunction":
        from dsage.client.distributed import DistributedFunction

        return DistributedFunction
    raise AttributeError(f"module 'dsage' has no attribute {name!r}")
