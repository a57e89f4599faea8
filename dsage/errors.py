"""The public exceptions of dsage; `DsageError` is the root of all of them."""
from __future__ import annotations


class DsageError(Exception):
    """Root of every error dsage raises on purpose."""


class JobFailed(DsageError):
    """A job failed for good; `traceback` holds the worker's traceback text, and `exception`
    the job's own exception when it came back (it pickled, and unpickles here).

    Raised for a job whose exception came back, it is also an instance of that exception's
    class, as the original would be: `except ValueError` catches a job's ValueError.  Its
    message and args are dsage's; the original's attributes are on `exception`."""

    def __init__(self, job_id: int, traceback: str | None, exception: BaseException | None = None) -> None:
        self.job_id = job_id
        self.traceback = traceback or ""
        self.exception = exception
        lines = self.traceback.strip().splitlines() or ["(no traceback)"]
        # a one-line error (the job's process died, a timeout) is said once
        details = f"\n{self.traceback}" if len(lines) > 1 else ""
        Exception.__init__(self, f"job {job_id} failed: {lines[-1]}{details}")   # never the job class's

    # the job exception class's own would read attributes this instance does not have
    __str__ = BaseException.__str__
    __repr__ = BaseException.__repr__

    def __reduce__(self) -> tuple:
        return job_failed, (self.job_id, self.traceback, self.exception)


_failed_classes: dict[type, type] = {}


def job_failed(job_id: int, traceback: str | None, exception: BaseException | None = None) -> JobFailed:
    """The JobFailed of a job, also an instance of `exception`'s class where Python allows
    a class of both (not for BaseExceptions that are not Exceptions, nor a few built-in
    classes whose instances are laid out otherwise, such as ExceptionGroup)."""
    if exception is None or not isinstance(exception, Exception) or isinstance(exception, JobFailed):
        return JobFailed(job_id, traceback, exception)
    cls = type(exception)
    if cls not in _failed_classes:
        try:
            both = type("JobFailed", (JobFailed, cls), {"__module__": __name__, "__qualname__": "JobFailed"})
            both.__new__(both, "")
        except Exception:
            both = JobFailed
        _failed_classes[cls] = both
    both = _failed_classes[cls]
    error = both.__new__(both, "")
    JobFailed.__init__(error, job_id, traceback, exception)
    return error


class JobKilled(DsageError):
    """The job was killed before it completed."""

    def __init__(self, job_id: int) -> None:
        self.job_id = job_id
        super().__init__(f"job {job_id} was killed")

    def __reduce__(self) -> tuple:
        return JobKilled, (self.job_id,)


class AuthError(DsageError):
    """The server refused this identity (unknown, revoked, wrong role or wrong owner)."""


class ConnectionLost(DsageError):
    """The connection to the server went away (or could not be made)."""


class RemoteError(DsageError):
    """The server refused a request; the message says why."""


class ProtocolError(DsageError):
    """A peer sent something that is not valid dsage protocol."""
