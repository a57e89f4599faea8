"""Job statuses, their allowed transitions and the wire-safe `Job` description."""
from __future__ import annotations

import dataclasses
import enum
import numbers
import operator
import os
import pathlib
from typing import Any, Callable, Iterable, Mapping, Union

from dsage import errors


class JobStatus(str, enum.Enum):
    """Where a job is in its life; stored as the plain string value."""

    NEW = "new"
    PROCESSING = "processing"
    COMPLETED = "completed"
    FAILED = "failed"
    KILLED = "killed"


FINAL = frozenset({JobStatus.COMPLETED.value, JobStatus.FAILED.value, JobStatus.KILLED.value})
#: every status's name, in lifecycle order.
STATUSES = tuple(s.value for s in JobStatus)

#: status -> the statuses it may move to.
ALLOWED_TRANSITIONS: dict[str, frozenset[str]] = {
    "new": frozenset({"processing", "killed"}),
    "processing": frozenset({"new", "completed", "failed", "killed"}),
    # A final job may be run again (rerun) from the start.
    "completed": frozenset({"new"}),
    "failed": frozenset({"new"}),
    "killed": frozenset({"new"}),
}

KINDS = ("code", "callable", "file")
DEFAULT_TIMEOUT = 600.0
DEFAULT_PRIORITY = 5
DEFAULT_MAX_FAILURES = 3
#: the bounds of a job's options (the server checks them too).
MAX_TIMEOUT = 30 * 86400.0
MAX_PRIORITY = 1_000_000
MAX_FAILURES = 1000
MIB = 1 << 20
#: the most memory a job may say it needs, in MiB (16 TiB).
MAX_MEMORY = 1 << 24
#: the most a job's payload and files together, or its pickled result, may hold: one
#: message (`dsage.protocol.MAX_MESSAGE`, 256 MiB) carries it with room for the rest.
MAX_JOB_BYTES = 252 * MIB


class BadTransition(ValueError):
    """A status change that the lifecycle does not allow."""


def check_transition(old: str, new: str) -> None:
    """Raise `BadTransition` unless a job may go from `old` to `new`."""
    if new not in ALLOWED_TRANSITIONS.get(old, ()):
        raise BadTransition(f"a {old} job cannot become {new}")


@dataclasses.dataclass
class Job:
    """Describes a job before it is submitted: code or a callable, plus options."""

    code: str | None = None
    func: Callable[..., Any] | None = None
    args: tuple = ()
    kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    name: str | None = None
    #: seconds of wall time before the job is stopped; None: no limit (MAX_TIMEOUT, 30 days).
    timeout: float | None = DEFAULT_TIMEOUT
    priority: int = DEFAULT_PRIORITY
    max_failures: int = DEFAULT_MAX_FAILURES
    #: files written into the job's folder before it runs: {name: bytes, text or a local
    #: pathlib.Path to read}, or a list of local paths (each under its own base name).
    files: Union[Mapping[str, Any], Iterable[Union[str, os.PathLike]]] = dataclasses.field(default_factory=dict)
    #: MiB of memory the job needs: it runs only on workers that give each job that much
    #: (their --max-memory, else their machine's memory).  None: any worker.  A job that
    #: runs out of memory asks for twice what it reached at its next attempt.
    memory: float | None = None

    def __post_init__(self) -> None:
        if (self.code is None) == (self.func is None):
            raise ValueError("a Job needs exactly one of code= or func=")
        if self.func is not None and not callable(self.func):
            raise TypeError(f"func must be callable, not {type(self.func).__name__}")
        if self.code is not None and not isinstance(self.code, str):
            raise TypeError("code must be a str")
        if self.timeout is None:
            self.timeout = MAX_TIMEOUT
        if type(self.timeout) not in (int, float) and (isinstance(self.timeout, bool) or
                                                        not isinstance(self.timeout, numbers.Real)) or \
                not 0 < self.timeout <= MAX_TIMEOUT:
            raise ValueError(f"timeout must be a number of seconds, more than 0 and at most 30 days "
                             f"(None: no limit), not {self.timeout!r}")
        self.priority = _integer("priority", self.priority, -MAX_PRIORITY, MAX_PRIORITY, " (lower runs first)")
        self.max_failures = _integer("max_failures", self.max_failures, 1, MAX_FAILURES)
        self.files = _files(self.files)
        if self.memory is not None and (isinstance(self.memory, bool) or not isinstance(self.memory, numbers.Real)
                                        or not 0 < self.memory <= MAX_MEMORY):
            raise ValueError(f"memory must be the MiB the job needs, more than 0 and at most {MAX_MEMORY} "
                             f"(None: any worker), not {self.memory!r}")

    def to_wire(self) -> dict[str, Any]:
        """The submission message: plain data, the callable pickled with cloudpickle."""
        if self.func is not None:
            import cloudpickle

            kind = "callable"
            payload = cloudpickle.dumps((self.func, tuple(self.args), dict(self.kwargs)))
            name = self.name or getattr(self.func, "__name__", "callable")
        else:
            kind = "code"
            payload = self.code.encode("utf-8")
            name = self.name or _first_line(self.code)
        wire = {
            "kind": kind,
            "payload": payload,
            "name": str(name)[:200],
            "timeout": float(self.timeout),
            "priority": int(self.priority),
            "max_failures": int(self.max_failures),
            "files": dict(self.files),
        }
        if self.memory is not None:
            wire["memory"] = float(self.memory)
        if carried(wire) > MAX_JOB_BYTES:
            raise errors.DsageError(
                f"job {name!r} carries {carried(wire) / MIB:.1f} MiB (its pickled call or code, and its "
                f"files); a job may carry at most {MAX_JOB_BYTES // MIB} MiB: put large data where the "
                f"workers can read it and pass its path")
        return wire


def as_job(func: Any, args: tuple, kwargs: dict) -> Job:
    """What `submit(func, *args, **kwargs)` runs: `func` itself if it is a Job (then with no
    further arguments), else the call."""
    if isinstance(func, Job):
        if args or kwargs:
            raise TypeError("submit(Job) takes no further arguments")
        return func
    return Job(func=func, args=args, kwargs=kwargs)


def carried(wire: dict) -> int:
    """The bytes of payload and files a job's wire form (`Job.to_wire`) carries."""
    return len(wire["payload"]) + sum(map(len, (wire.get("files") or {}).values()))


def _integer(name: str, value: Any, low: int, high: int, note: str = "") -> int:
    """`value` as an int from `low` to `high`, else TypeError or ValueError naming `name`."""
    if type(value) is int and low <= value <= high:
        return value
    try:
        number = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer{note}, not {value!r}") from None
    if not low <= number <= high:
        raise ValueError(f"{name} must be from {low:,} to {high:,}, not {number:,}")
    return number


def _files(files: Any) -> dict[str, bytes]:
    """A job's files as {name: bytes}, read now from what `Job.files` accepts."""
    if not files:
        return {}
    if isinstance(files, (str, os.PathLike)):
        files = [files]
    if isinstance(files, Mapping):
        items = [(str(name), value) for name, value in files.items()]
    else:
        try:
            items = [(os.path.basename(os.fspath(path)), pathlib.Path(path)) for path in files]
        except TypeError:
            raise TypeError("files must be a mapping {name: bytes} or a list of file paths") from None
        names = [name for name, _ in items]
        if len(set(names)) < len(names):
            raise ValueError(f"files: two paths have the same name: {sorted(names)}")
    out = {}
    for name, value in items:
        if not safe_file_name(name):
            raise ValueError(f"bad job file name {name!r}: a relative path inside the job's folder, without '..'")
        if isinstance(value, os.PathLike):
            try:
                value = pathlib.Path(value).read_bytes()
            except OSError as e:
                raise ValueError(f"cannot read the job's file {os.fspath(value)}: {e.strerror}") from None
        out[name] = _as_bytes(value, f"files[{name!r}]")
    return out


def safe_file_name(name: str) -> bool:
    """Whether `name` is a path inside a job's folder: relative, without '.' or '..' parts
    (``data/in.txt`` is; ``/etc/x``, ``../x`` and ``''`` are not)."""
    parts = name.split("/")
    return bool(name) and "\x00" not in name and "\\" not in name and \
        all(part not in ("", ".", "..") for part in parts)


def _as_bytes(value: Any, name: str) -> bytes:
    """Text (as UTF-8) or a bytes-like value as bytes; anything else is a TypeError (bytes(5)
    would be five zero bytes)."""
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    raise TypeError(f"{name} must be bytes, text or a path, not {type(value).__name__}")


def _first_line(code: str) -> str:
    for line in code.splitlines():
        if line.strip():
            return line.strip()[:80]
    return "code"
