"""`python -m dsage.worker.child`: a worker slot's job process, without Twisted.

It starts once per slot (in its own session and process group, niced, with the worker's
resource limits) and then runs jobs one after another (what a job leaves running is killed
when it ends): each job arrives on stdin as a
length-prefixed msgpack message, runs in the slot's temporary folder (emptied after each job)
with the slot's clean environment, and its outcome leaves on file descriptor 3 the same way.  stdout and stderr
flow to the worker; after each job the child writes the job's sentinel (a nonce chosen by the
worker) to both, so the worker knows which output belongs to which job.  A job that hangs,
crashes or is killed takes the process with it; the worker starts a fresh one.
"""
from __future__ import annotations

import ast
import linecache
import os
import resource
import shutil
import signal
import struct
import sys
import traceback
from typing import Any

import msgpack

from dsage.job import MAX_JOB_BYTES, MIB, safe_file_name

LIMITS = {"memory": resource.RLIMIT_AS, "open_files": resource.RLIMIT_NOFILE,
          "file_size": resource.RLIMIT_FSIZE}


def factor(n: int) -> dict[int, int]:
    """The factorization of an integer as {prime: exponent}, by PARI (cypari), like
    `sympy.factorint` and DistributedFactor's result: what a code job calls as `factor`,
    as in Sage (`D.eval("factor(2**64 + 1)")`)."""
    import operator

    from cypari import pari

    matrix = pari.factor(operator.index(n))
    return {int(p): int(e) for p, e in zip(matrix[0], matrix[1])} if len(matrix) else {}


def run_code(code: str, filename: str = "<job>") -> object:
    """Execute code; its result is DSAGE_RESULT if set, else the last expression's value
    (`factor`, as in Sage, is there without an import).
    A script that ends itself with `sys.exit()` or `sys.exit(0)` succeeds, as it would in a
    shell (its result is then DSAGE_RESULT, or None); another exit status is a failure."""
    tree = ast.parse(code, filename, "exec")
    last = None
    if tree.body and isinstance(tree.body[-1], ast.Expr):
        last = ast.Expression(tree.body.pop().value)
    namespace: dict = {"__name__": "__main__", "__builtins__": __builtins__, "factor": factor}
    try:
        exec(compile(tree, filename, "exec"), namespace)
        value = eval(compile(last, filename, "eval"), namespace) if last is not None else None
    except SystemExit as e:
        if e.code not in (None, 0):
            raise
        value = None
    return namespace.get("DSAGE_RESULT", value)


class Refused(Exception):
    """A job that dsage could not start or send back: its message says why (no traceback)."""


def code_filename(job: dict) -> str:
    """The file name a code job's tracebacks show (its lines come from `linecache`)."""
    return f"<job {job.get('job_id', '')}>"


def run(job: dict) -> object:
    """Run one job description (in the current folder) and return its value."""
    for name, data in (msgpack.unpackb(job["files"]) if job.get("files") else {}).items():
        if not safe_file_name(name):
            raise Refused(f"dsage: the job's file name {name!r} is not a path inside its folder")
        try:
            os.makedirs(os.path.dirname(name) or ".", exist_ok=True)
            with open(name, "wb") as fh:
                fh.write(data)
        except OSError as e:        # a name that is also another file's folder, a full disk
            raise Refused(f"dsage: cannot write the job's file {name!r}: {e.strerror or e}") from None
    if job["kind"] == "callable":
        import cloudpickle

        try:
            func, args, kwargs = cloudpickle.loads(job["payload"])
        except Exception as e:
            hint = (" (install that module where the workers run, or define the function in your script or "
                    "notebook: those travel with the job)" if isinstance(e, ImportError) else "")
            raise Refused(f"dsage: the job's function and arguments could not be unpickled on this worker: "
                          f"{_one_line(e)}{hint}") from None
        return func(*args, **kwargs)
    code, filename = job["payload"].decode("utf-8"), code_filename(job)
    linecache.cache[filename] = (len(code), None, code.splitlines(True), filename)   # tracebacks show its lines
    return run_code(code, filename)


def _one_line(error: BaseException) -> str:
    return traceback.format_exception_only(type(error), error)[-1].strip()


def _user_traceback(error: BaseException) -> str:
    """The traceback of a job's exception from the job's own code on: dsage's frames, and
    the parsing of a code job, left out."""
    if isinstance(error, Refused):
        return str(error)
    tb = error.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename in _OWN_FILES:
        tb = tb.tb_next
    return "".join(traceback.format_exception(type(error), error, tb))


def pickled_exception(error: BaseException) -> bytes | None:
    """A job's exception pickled for its client (which raises JobFailed as an instance of its
    class too), when it is an Exception that pickles, unpickles and is small; else None."""
    if not isinstance(error, Exception) or isinstance(error, Refused):
        return None
    import cloudpickle

    try:
        data = cloudpickle.dumps(error)
        if len(data) > MAX_EXCEPTION_BYTES:
            return None
        cloudpickle.loads(data)     # an exception whose __init__ wants other arguments than its args
    except Exception:
        return None
    return data


def apply_limits(limits: dict) -> None:
    """Lower this process's resource limits (address space, open files, file size)."""
    for name, value in (limits or {}).items():
        if not value or name not in LIMITS:
            continue
        kind = LIMITS[name]
        _, hard = resource.getrlimit(kind)
        value = int(value) if hard == resource.RLIM_INFINITY else min(int(value), hard)
        resource.setrlimit(kind, (value, value))


#: bytes per unit of `ru_maxrss` (kilobytes on Linux, bytes on macOS).
MAXRSS_UNIT = 1 if sys.platform == "darwin" else 1024


#: jobs that use less CPU than this (seconds) cannot touch much memory: their peak is
#: estimated from the last reading instead of read (reading at every job, two system calls
#: in a niced process, cost 5-7% of the no-op throughput benchmark) ...
SHORT_JOB_CPU = 0.002
#: ... unless this many jobs ran since that reading.
READ_EVERY = 64
#: a job's exception larger than this pickled (it holds data) comes back as its traceback only.
MAX_EXCEPTION_BYTES = 64 * 1024
PAGE = resource.getpagesize()


class Meter:
    """The CPU seconds and peak resident memory in bytes of each job of this process."""

    def __init__(self) -> None:
        self.resident = 0            # the resident memory last read, and the page faults then
        self.faults = 0
        self.unread = READ_EVERY

    def start(self) -> resource.struct_rusage:
        """At a job's start: what `stop` counts from."""
        return resource.getrusage(resource.RUSAGE_SELF)

    def stop(self, start: resource.struct_rusage) -> tuple[float, int]:
        """At its end: (CPU seconds, peak resident memory).  The peak is read (Linux's
        high-water mark, then started again from what the process holds) after a job that
        used CPU enough to touch much memory, and every READ_EVERY jobs; after the others
        it is estimated: the last reading plus a page for each page fault since (a huge
        page counts as one: some tens of MiB at most in 2 ms of CPU)."""
        end = resource.getrusage(resource.RUSAGE_SELF)
        cpu = end.ru_utime + end.ru_stime - start.ru_utime - start.ru_stime
        faults = end.ru_minflt + end.ru_majflt
        self.unread += 1
        if cpu < SHORT_JOB_CPU and self.unread < READ_EVERY:
            return cpu, self.resident + (faults - self.faults) * PAGE
        peak, self.resident = _memory()
        reset_peak()
        self.faults, self.unread = faults, 0
        return cpu, peak


METER = Meter()


def _memory() -> tuple[int, int]:
    """This process's peak resident memory since `reset_peak` (where the system has no
    high-water mark to read, since it started) and its resident memory now, in bytes."""
    try:
        status = os.pread(_own_file("status", os.O_RDONLY), 4096, 0)
        return _status_bytes(status, b"VmHWM:"), _status_bytes(status, b"VmRSS:")
    except (OSError, ValueError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * MAXRSS_UNIT
        return peak, peak


def _status_bytes(status: bytes, field: bytes) -> int:
    """A size of /proc/PID/status, in bytes (ValueError if it is not there)."""
    start = status.index(field) + len(field)
    return int(status[start:status.index(b"kB", start)]) * 1024


def peak_of(pid: int) -> int | None:
    """The peak resident memory in bytes of process `pid` since its last `reset_peak`
    (Linux's VmHWM: memory the process had in RAM, page cache not counted); None if unknown."""
    try:
        with open(f"/proc/{pid}/status", "rb") as fh:
            return _status_bytes(fh.read(), b"VmHWM:")
    except (OSError, ValueError):
        return None


def reset_peak() -> None:
    """Start this process's peak resident memory again from what it holds now (Linux 4.0+),
    so that a job's peak is its own, not the largest of the jobs this process ran."""
    try:
        os.write(_own_file("clear_refs", os.O_WRONLY), b"5")
    except OSError:
        pass


#: this process's open files of /proc/self, by name (opened once: a reading then costs a
#: system call, not three).
_proc_files: dict[str, tuple[int, int]] = {}


def _own_file(name: str, flags: int) -> int:
    """A file descriptor of /proc/<this process>/`name`, kept open (OSError if none)."""
    pid = os.getpid()
    fd, owner = _proc_files.get(name, (-1, -1))
    if owner != pid:             # first use, or a process forked from the one that opened it
        fd = os.open(f"/proc/{pid}/{name}", flags | os.O_CLOEXEC)
        _proc_files[name] = (fd, pid)
    return fd


def _read(stream, n: int) -> bytes | None:
    data = b""
    while len(data) < n:
        chunk = stream.read(n - len(data))
        if not chunk:
            return None
        data += chunk
    return data


def _write_all(fd: int, *parts: bytes) -> None:
    """Write `parts` to `fd` whole (a write to a pipe may take only some of them)."""
    views = [memoryview(p) for p in parts]
    while views:
        n = os.writev(fd, views)
        while views and n >= len(views[0]):
            n -= len(views.pop(0))
        if views:
            views[0] = views[0][n:]


#: rounds of killing what a job left running (each round's orphans are the next's children).
LEFTOVER_ROUNDS = 20
PR_SET_CHILD_SUBREAPER = 36
#: whether this process adopts the orphans of what it starts (a job process does).
_adopting = False


def _has_children() -> bool:
    """Whether this process has a child, running or ended (one system call)."""
    try:
        os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return False
    return True


def children(parent: int) -> list[int]:
    """The pids of `parent`'s children (Linux: the parent pid in each /proc/PID/stat)."""
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as fh:
                stat = fh.read()
        except OSError:
            continue                    # ended meanwhile
        if int(stat.rsplit(b")", 1)[1].split()[1]) == parent:
            out.append(int(name))
    return out


def end_processes(pids: list[int]) -> None:
    """Kill this process's children `pids` and wait for each (their own children are then
    this process's, if it adopts orphans); one that cannot be killed is not waited for."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:                 # ended meanwhile, or not ours to kill (setuid)
            continue
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass


def end_leftovers() -> bool:
    """Kill the processes a job left running and theirs (this process adopts every orphan
    of them: `adopt_orphans`), so that a job's end is the end of all it started, as on a
    batch system; False if some could not be ended.  One system call when there are none.
    Only in a process that adopts orphans (a job process: not in a test's own process)."""
    if not adopting():
        return True
    for _ in range(LEFTOVER_ROUNDS):
        if not _has_children():
            return True
        end_processes(children(os.getpid()))
        while True:                     # any other that had ended
            try:
                if os.waitpid(-1, os.WNOHANG)[0] == 0:
                    break
            except ChildProcessError:
                break
    return not _has_children()


def adopt_orphans() -> None:
    """Become the parent of every process started below this one whose own parent ends
    (Linux), so that none escapes `end_leftovers` (or the worker's sweep, when a job process
    is killed) by a double fork or a new session."""
    global _adopting
    try:
        import ctypes

        _adopting = ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1) == 0
    except (OSError, AttributeError):
        pass


def adopting() -> bool:
    """Whether this process adopts orphans (`adopt_orphans`) and can find its children."""
    return _adopting and os.path.isdir("/proc")


def empty(folder: str) -> bool:
    """Remove everything in `folder`; False if something could not be removed."""
    clean = True
    for entry in os.scandir(folder):
        try:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
        except OSError:
            clean = False
    return clean


def _restore_environ(saved: dict[str, str]) -> None:
    """Put the environment back as `saved`, setting only what differs (clearing and
    refilling it cost more than the rest of a no-op job)."""
    for name in [name for name in os.environ if name not in saved]:
        del os.environ[name]
    for name, value in saved.items():
        if os.environ.get(name) != value:
            os.environ[name] = value


def run_one(job: dict) -> dict:
    """Run a job in its folder, emptied afterwards; its outcome (result or traceback, CPU
    seconds, its peak resident memory in bytes, and whether the folder could be
    emptied and what the job left running ended)."""
    home, env = os.getcwd(), dict(os.environ)
    start = METER.start()
    try:
        os.chdir(job["workdir"])
        os.environ["TMPDIR"] = job["workdir"]
        os.environ["DSAGE_JOB_ID"] = str(job.get("job_id", ""))
        value = run(job)
        import cloudpickle

        try:
            result = cloudpickle.dumps(value)
        except Exception as e:
            raise Refused(f"dsage: the job's result could not be pickled to send back: {_one_line(e)} "
                          f"(return data that pickles: numbers, strings, lists, dicts, arrays...)") from None
        if len(result) > MAX_JOB_BYTES:
            outcome = {"ok": False, "error": f"dsage: the job's result is {len(result) / MIB:.1f} MiB pickled; "
                                             f"a result may be at most {MAX_JOB_BYTES // MIB} MiB (write large "
                                             f"results where the client can read them, return their path)"}
        else:
            outcome = {"ok": True, "result": result}
    except BaseException as e:
        outcome = {"ok": False, "error": _user_traceback(e), "exception": pickled_exception(e)}
    finally:
        linecache.cache.pop(code_filename(job), None)
        os.chdir(home)
        _restore_environ(env)
    outcome["cpu_time"], outcome["peak_memory"] = METER.stop(start)
    ended = end_leftovers()
    try:
        outcome["clean"] = empty(job["workdir"]) and ended
    except OSError:
        outcome["clean"] = False
    return outcome


#: the files whose frames a job's traceback leaves out (this module's, and `ast.parse`).
_OWN_FILES = {run_one.__code__.co_filename, ast.parse.__code__.co_filename}


def die_with(parent: int) -> None:
    """Be killed when the worker dies, even by kill -9 (Linux): a job nobody will report
    must not go on using the machine (its lease expires and it runs elsewhere)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)        # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:                # the worker died before prctl took effect
        os._exit(1)


#: glibc's mallopt parameters (malloc.h).
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3


def keep_freed_memory() -> None:
    """Have this process's malloc (glibc) serve blocks under 32 MiB from its heap and keep
    up to 16 MiB freed at the heap's top: by default each 1 MiB payload came in pages fresh
    from the kernel, given back after the job, and those page faults cost more CPU than the
    rest of a job process's work per MiB (bench/README.md).  Elsewhere a no-op."""
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)
        libc.mallopt(M_TRIM_THRESHOLD, 16 << 20)
    except (OSError, AttributeError):
        pass


def _private_fds() -> tuple[Any, Any, tuple[int, int]]:
    """Move the pipes to the worker off the numbers jobs see: the job stream (was 0) and
    the outcomes (was 3) to descriptors no process a job starts inherits, stdin to
    /dev/null; and keep copies of stdout and stderr.  A job reading stdin, or passing its
    descriptors to a subprocess, cannot take the next job's bytes or write outcomes."""
    jobs, outcomes = os.dup(0), os.dup(3)           # os.dup: not inheritable
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    os.close(3)
    sys.stdin = open(0, closefd=False)
    return os.fdopen(jobs, "rb"), os.fdopen(outcomes, "wb", buffering=0), (os.dup(1), os.dup(2))


def _restore_streams(saved: tuple[int, int]) -> None:
    """Point stdout and stderr (the descriptors and sys's objects) at the worker's pipes
    again, whatever the job did to them (closed, redirected with dup2, replaced), so that
    the end of its output reaches the worker."""
    for fd, copy in zip((1, 2), saved):
        os.dup2(copy, fd)
    for fd, name in ((1, "stdout"), (2, "stderr")):
        stream = getattr(sys, f"__{name}__")
        if stream is None or stream.closed:
            stream = open(fd, "w", buffering=1, closefd=False, errors="backslashreplace")
            setattr(sys, f"__{name}__", stream)
        setattr(sys, name, stream)


def main() -> None:
    """Serve jobs from stdin until it closes."""
    parent = os.getppid()
    try:
        os.setsid()
    except OSError:
        pass
    die_with(parent)
    adopt_orphans()
    keep_freed_memory()
    jobs, outcomes, streams = _private_fds()
    settings = msgpack.unpackb(_read(jobs, struct.unpack("!I", _read(jobs, 4))[0]))
    if settings.get("nice"):
        os.nice(int(settings["nice"]))
    apply_limits(settings.get("limits"))
    import cloudpickle  # noqa: F401  (now, not in the first job: a successor starts warm)
    while True:
        header = _read(jobs, 4)
        if header is None:
            break
        job = msgpack.unpackb(_read(jobs, struct.unpack("!I", header)[0]), raw=False)
        size = _read(jobs, 4)           # the payload: a frame of its own
        job["payload"] = _read(jobs, struct.unpack("!I", size)[0]) if size is not None else None
        if job["payload"] is None:
            break                       # the worker went away while sending it
        outcome = run_one(job)
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        except Exception:
            pass
        _restore_streams(streams)
        sentinel = job["sentinel"]
        os.write(1, sentinel)
        os.write(2, sentinel)
        data = msgpack.packb(outcome, use_bin_type=True)
        _write_all(outcomes.fileno(), struct.pack("!I", len(data)), data)
    if settings.get("workdir"):
        shutil.rmtree(settings["workdir"], ignore_errors=True)
    os._exit(0)


if __name__ == "__main__":
    main()
