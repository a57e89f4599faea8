"""JobRunner: runs leased jobs in the slots' long-lived child processes.

Each slot's child (`python -m dsage.worker.child`) runs in its own process group with the
worker's nice level and resource limits, and runs jobs one after another in a temporary
folder of its own, which the child empties after each job and the runner removes when the
child ends.  A job's stdout and stderr are kept (head
and tail, up to a limit) until the child marks the job's end with the job's sentinel.  A
timeout or a kill stops the child (TERM to its process group, then KILL); a crash ends it;
either way the next job gets a fresh child, and what the job left running is killed."""
from __future__ import annotations

import fcntl
import os
import secrets
import shutil
import signal
import struct
import sys
import tempfile
import time

import msgpack
from twisted.internet import defer, protocol
from twisted.logger import Logger

from dsage.job import MIB
from dsage.worker.child import LEFTOVER_ROUNDS, adopting, children, end_processes, peak_of

OUTPUT_MARKER = b"\n[... output truncated by dsage ...]\n"
LIVE_MARKER = b"[... earlier output not shown while the job runs ...]\n"
KILL_GRACE = 2.0
#: seconds a job process's pipes are still read after it exits (see `Child.processExited`).
PIPE_GRACE = 1.0
#: jobs one child runs before it is replaced (bounds what jobs leave behind in it).
JOBS_PER_CHILD = 1000
#: a child's successor starts this many jobs before it retires, so that it is ready by then
#: (a Python starting up would leave the slot idle for tens of milliseconds).
WARM_AHEAD = 200
#: the default of `JobRunner.recycle_memory` (`dsage_worker --recycle-memory`).
RECYCLE_MEMORY = 1 << 30
#: the end of a running job's output sent with each heartbeat when it has grown (what
#: `job.output` shows while the job runs).
LIVE_OUTPUT = 16 << 10
ENV_KEEP = ("PATH", "HOME", "LANG", "LC_ALL", "LC_CTYPE", "PYTHONPATH", "VIRTUAL_ENV", "USER", "LOGNAME")


class OutputBuffer:
    """Keeps the head and the tail of a stream, with a marker where the middle was dropped."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.head = bytearray()
        self.tail = bytearray()
        self.dropped = 0
        self.total = 0

    def write(self, data: bytes) -> None:
        """Add bytes."""
        self.total += len(data)
        room = self.limit // 2 - len(self.head)
        if room > 0:
            self.head += data[:room]
            data = data[room:]
        if data:
            self.tail += data
            excess = len(self.tail) - self.limit // 2
            if excess > 0:
                del self.tail[:excess]
                self.dropped += excess

    def text(self) -> str:
        """The kept output as text."""
        middle = OUTPUT_MARKER if self.dropped else b""
        return bytes(self.head + middle + self.tail).decode("utf-8", "replace")

    def recent(self, limit: int) -> str:
        """The last `limit` bytes of the output so far as text, after a marker if that is not all."""
        if self.total <= limit:
            return bytes(self.head + self.tail).decode("utf-8", "replace")
        end = bytes((self.head + self.tail)[-limit:])
        return (LIVE_MARKER + end).decode("utf-8", "replace")


class Attempt:
    """One job running in a child: where its output goes and when it is complete."""

    def __init__(self, job: dict, max_output: int) -> None:
        self.job = job
        self.key = lease_key(job)
        self.sentinel = b"\x00dsage-end-" + secrets.token_hex(8).encode() + b"\x00"
        self.output = OutputBuffer(max_output)
        self.start = time.monotonic()
        self.ended_streams: set[int] = set()
        self.outcome: dict | None = None
        self.reason: str | None = None
        self.peak: int | None = None     # its process's, as last seen (heartbeats, a stop)
        self.shown = 0               # output bytes the server has seen (`JobRunner.live_output`)
        self.timer = None
        self.done = defer.Deferred()

    def complete(self) -> bool:
        return self.outcome is not None and self.ended_streams == {1, 2}


class Child(protocol.ProcessProtocol):
    """A slot's long-lived job process."""

    def __init__(self, runner: JobRunner) -> None:
        self.runner = runner
        self.attempt: Attempt | None = None
        self.pending = {1: b"", 2: b""}
        self.frames = bytearray()       # outcomes from the child, as they come (8 KiB reads)
        self.jobs_run = 0
        self.owner: str | None = None     # whose jobs it runs: no other user's (`JobRunner.run`)
        self.last_used = 0.0
        self.pipes_timer = None
        self.alive = True
        self.workdir = tempfile.mkdtemp(prefix="dsage-job-")

    def connectionMade(self) -> None:
        self.send({"nice": self.runner.nice, "limits": self.runner.limits, "workdir": self.workdir})

    def send(self, message: dict, raw: bytes | None = None) -> None:
        """Write a message to the child, and then `raw` as a frame of its own (not packed
        with the message: a large payload is not copied on its way into the pipe)."""
        data = msgpack.packb(message, use_bin_type=True)
        parts = [struct.pack("!I", len(data)), data]
        if raw is not None:
            parts += [struct.pack("!I", len(raw)), raw]
        self.transport.writeSequence(parts)     # joined once, by the pipe

    def run(self, attempt: Attempt) -> None:
        """Hand a job to this child: its description, then its payload."""
        self.attempt = attempt
        self.jobs_run += 1
        job = attempt.job
        self.send({"kind": job["kind"], "files": job.get("files"), "name": job.get("name"),
                   "job_id": job["job_id"], "workdir": self.workdir, "sentinel": attempt.sentinel},
                  job["payload"] or b"")

    def childDataReceived(self, fd: int, data: bytes) -> None:
        attempt = self.attempt
        if fd == 3:
            self.frames += data         # a bytearray: appending does not copy what came before
            while len(self.frames) >= 4:
                (n,) = struct.unpack_from("!I", self.frames)
                if len(self.frames) < 4 + n:
                    break
                if attempt is not None:
                    attempt.outcome = _outcome(self.frames, n)
                del self.frames[:4 + n]
        elif fd in (1, 2):
            if attempt is None or fd in attempt.ended_streams:
                return              # output of something the last job left running: dropped
            buffer = self.pending[fd] + data
            end = buffer.find(attempt.sentinel)
            if end >= 0:
                attempt.output.write(buffer[:end])
                attempt.ended_streams.add(fd)
                self.pending[fd] = b""
            else:
                # Held back: only what may be the sentinel's beginning (it starts with a NUL),
                # so that output is seen as soon as it comes (`JobRunner.live_output`).
                cut = buffer.find(b"\x00", max(0, len(buffer) - len(attempt.sentinel) + 1))
                cut = len(buffer) if cut < 0 else cut
                attempt.output.write(buffer[:cut])
                self.pending[fd] = buffer[cut:]
        if attempt is not None and attempt.complete():
            self.attempt = None
            self.runner.finished(self, attempt)

    def processExited(self, reason) -> None:
        """The process is gone.  A process it started outside its process group may still
        hold its pipes open, which would hold back `processEnded` (and the slot) until that
        one exits: what is left in them is read for `PIPE_GRACE`, then they are closed."""
        self.alive = False
        if self.attempt is not None:        # ended in a job: what it started may be left
            self.runner.end_orphans()
        self.pipes_timer = self.runner.reactor.callLater(PIPE_GRACE, self._close_pipes)

    def _close_pipes(self) -> None:
        for fd in (1, 2, 3):
            self.transport.closeChildFD(fd)

    def processEnded(self, reason) -> None:
        self.alive = False
        if self.pipes_timer is not None and self.pipes_timer.active():
            self.pipes_timer.cancel()
        attempt, self.attempt = self.attempt, None
        self.runner.child_ended(self, attempt, reason.value)


class JobRunner:
    """Runs jobs in per-slot child processes; `run()` fires with the report for the server."""

    log = Logger()

    def __init__(self, reactor, *, nice: int = 10, max_output: int = 1 << 20, limits: dict | None = None,
                 keep_idle: int = 4, recycle_memory: int = RECYCLE_MEMORY) -> None:
        self.reactor = reactor
        #: a job process whose resident memory has reached this many bytes is replaced after
        #: its job: what jobs leave behind in it (a leak, a cache) does not pile up.
        self.recycle_memory = recycle_memory
        #: idle job processes kept at most (the least recently used retire): room for the
        #: processes of a few users whose jobs take turns.
        self.keep_idle = keep_idle
        self.nice = nice
        self.max_output = max_output
        #: resource limits of the job processes: memory (bytes of address space), open_files, file_size.
        self.limits = dict(limits or {})
        self.idle: list[Child] = []
        self.running: dict[tuple[int, int], tuple[Attempt, Child]] = {}

    def _spawn(self) -> Child:
        child = Child(self)
        env = {k: v for k, v in os.environ.items() if k in ENV_KEEP}
        env["PYTHONUNBUFFERED"] = "1"
        process = self.reactor.spawnProcess(child, sys.executable, [sys.executable, "-m", "dsage.worker.child"],
                                            env=env, path=tempfile.gettempdir(),
                                            childFDs={0: "w", 1: "r", 2: "r", 3: "r"})
        for pipe in (process.pipes.get(0), process.pipes.get(3)):
            _widen(pipe)
        return child

    def run(self, job: dict) -> defer.Deferred:
        """Run a leased job; fires with a report dict (outcome, result/error, output, times)."""
        attempt = Attempt(job, self.max_output)
        child = self._child_for(job.get("owner"))
        self.running[attempt.key] = (attempt, child)
        attempt.timer = self.reactor.callLater(job["timeout"], self._stop, attempt.key,
                                               f"timed out after {job['timeout']:g} s")
        child.run(attempt)
        return attempt.done

    def _child_for(self, owner: str | None) -> Child:
        """An idle job process that has run only `owner`'s jobs, or none yet; else a new one.
        What a job leaves in its process (modules it patched, precision it set, hooks it
        installed) reaches that user's later jobs, never another user's."""
        idle = [c for c in self.idle if c.alive]          # not one that exited while idle
        for candidates in ([c for c in idle if c.owner == owner], [c for c in idle if c.owner is None]):
            if candidates:
                child = candidates[-1]
                self.idle.remove(child)
                break
        else:
            child = self._spawn()
        child.owner = owner
        child.last_used = self.reactor.seconds()
        return child

    def _trim_idle(self) -> None:
        """Retire the least recently used idle processes beyond `keep_idle` (fresh ones last)."""
        while len(self.idle) > self.keep_idle:
            used = [c for c in self.idle if c.owner is not None] or self.idle
            oldest = min(used, key=lambda c: c.last_used)
            self.idle.remove(oldest)
            oldest.transport.closeStdin()

    def finished(self, child: Child, attempt: Attempt) -> None:
        """A child reported a job's outcome and its output is complete."""
        ok = isinstance(attempt.outcome, dict) and attempt.outcome.get("ok") and attempt.outcome.get("clean")
        small = ok and (attempt.outcome.get("peak_memory") or 0) < self.recycle_memory
        if child.alive and attempt.reason is None and small and child.jobs_run < JOBS_PER_CHILD:
            # Reused after a success only (a failed job may leave files open or memory
            # fragmented), and while its memory stayed under `recycle_memory`.
            self.idle.append(child)
            if child.jobs_run == JOBS_PER_CHILD - WARM_AHEAD:
                self.idle.insert(0, self._spawn())      # taken last: when a child retires
            self._trim_idle()
        elif child.alive:
            child.transport.closeStdin()          # retire it; it exits by itself
        self._report(attempt, None)

    def child_ended(self, child: Child, attempt: Attempt | None, ended) -> None:
        """A child process ended (retired, crashed, killed or timed out)."""
        if child in self.idle:
            self.idle.remove(child)
        shutil.rmtree(child.workdir, ignore_errors=True)
        if attempt is not None:
            self._report(attempt, ended)

    def _report(self, attempt: Attempt, ended) -> None:
        if attempt.timer is not None and attempt.timer.active():
            attempt.timer.cancel()
        self.running.pop(attempt.key, None)
        job = attempt.job
        report = {"job_id": job["job_id"], "attempt": job["attempt"], "lease": job.get("lease", 0),
                  "output": attempt.output.text(),
                  "wall_time": time.monotonic() - attempt.start, "cpu_time": None, "result": None, "error": None,
                  "peak_memory": attempt.peak}
        outcome = attempt.outcome
        if isinstance(outcome, dict) and isinstance(outcome.get("peak_memory"), int):
            report["peak_memory"] = outcome["peak_memory"]
        if attempt.reason is not None:
            report.update(outcome="failed", error=f"dsage: the job was stopped: {attempt.reason}")
            report["killed"] = attempt.reason == "killed"
        elif isinstance(outcome, dict) and outcome.get("ok"):
            report.update(outcome="completed", result=outcome["result"], cpu_time=outcome.get("cpu_time"))
        elif isinstance(outcome, dict):
            exception, error = outcome.get("exception"), outcome.get("error")
            report.update(outcome="failed", error=self._explained(error, report["peak_memory"]),
                          cpu_time=outcome.get("cpu_time"), result=exception if isinstance(exception, bytes) else None)
            if _memory_error(error):
                report["memory_exceeded"] = _mib(self.limits.get("memory") or report["peak_memory"])
        else:
            seen = (f"; its resident memory had reached {attempt.peak / MIB:.0f} MiB when last seen"
                    if attempt.peak else "")
            report.update(outcome="failed", error=f"dsage: the job's process died: {_describe(ended)}{seen}")
            if getattr(ended, "signal", None) == signal.SIGKILL:      # most often the OOM killer
                report["memory_exceeded"] = _mib(attempt.peak)
        attempt.done.callback(report)

    def job_memory(self) -> int | None:
        """The MiB each job may use here: the --max-memory limit, else the machine's memory."""
        limit = self.limits.get("memory") or machine_memory()
        return _mib(limit)

    def _explained(self, error: str | None, peak: int | None) -> str | None:
        """A job's traceback, with what this worker allows when it ends in a MemoryError
        under the worker's --max-memory (the job's peak then says how close it came)."""
        limit = self.limits.get("memory")
        if not limit or not _memory_error(error):
            return error
        used = f"; the job's peak resident memory was {peak / MIB:.0f} MiB" if peak else ""
        return (f"{error.rstrip()}\ndsage: this worker limits each job to {limit / MIB:.0f} MiB of address "
                f"space (dsage_worker --max-memory){used}\n")

    def _stop(self, key: tuple[int, int, int], reason: str) -> None:
        entry = self.running.get(key)
        if entry is None:
            return
        attempt, child = entry
        if attempt.reason is None:
            attempt.reason = reason
            _note_peak(attempt, child)
        self._signal(child, signal.SIGTERM)
        self.reactor.callLater(KILL_GRACE, self._signal, child, signal.SIGKILL)

    def _signal(self, child: Child, sig: int) -> None:
        pid = child.transport.pid if child.alive else None
        if pid is None:
            return
        try:
            os.killpg(pid, sig)
        except (ProcessLookupError, PermissionError):
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass

    def kill(self, job_id: int, attempt: int | None = None, lease: int | None = None) -> bool:
        """Stop a running attempt (TERM, then KILL); False if it is not running here."""
        for key in list(self.running):
            if lease_matches(key, job_id, attempt, lease):
                self._stop(key, "killed")
                return True
        return False

    def held(self) -> list[list[int]]:
        """The leases (job id, attempt, token) running now."""
        return [list(k) for k in self.running]

    def live_output(self, again: bool = False) -> list[list]:
        """[job id, attempt, token, the end of its output] of each running job whose output
        grew since the last call (every one with output when `again`: a new connection).
        At each heartbeat: each running job's peak memory is noted too, so that a job
        whose process dies (the kernel's OOM killer) is reported with the last one seen."""
        out = []
        for key, (attempt, child) in self.running.items():
            _note_peak(attempt, child)
            total = attempt.output.total
            if total and (again or total != attempt.shown):
                attempt.shown = total
                out.append([*key, attempt.output.recent(LIVE_OUTPUT)])
        return out

    def end_orphans(self) -> None:
        """Kill what a job process that ended (killed, timed out, crashed) left running: in
        a worker that adopts orphans (`WorkerService.startService`), they are now the
        worker's children, besides the job processes Twisted knows."""
        if not adopting():
            return
        from twisted.internet.process import reapProcessHandlers

        for _ in range(LEFTOVER_ROUNDS):
            orphans = [pid for pid in children(os.getpid()) if pid not in reapProcessHandlers]
            if not orphans:
                return
            end_processes(orphans)

    def output_of(self, job_id: int, attempt: int) -> str | None:
        """The end of a running attempt's output now (None if it does not run here)."""
        for key, (running, _) in self.running.items():
            if lease_matches(key, job_id, attempt, None):
                return running.output.recent(LIVE_OUTPUT)
        return None

    def stop_all(self) -> None:
        """Kill every running job and end the idle children (worker shutdown); their
        folders go now, since the reactor may stop before the children end."""
        for key, (_, child) in list(self.running.items()):
            self._stop(key, "worker shut down")
            shutil.rmtree(child.workdir, ignore_errors=True)
        for child in list(self.idle):
            child.transport.closeStdin()
            shutil.rmtree(child.workdir, ignore_errors=True)


def _outcome(frames: bytearray, n: int) -> dict:
    """The outcome in the child's frame of `n` bytes at the start of `frames`."""
    try:
        with memoryview(frames) as view, view[4:4 + n] as frame:
            return msgpack.unpackb(frame, raw=False)
    except Exception:
        return {"ok": False, "error": "dsage: undecodable outcome from the job process"}


F_SETPIPE_SZ = 1031
PIPE_SIZE = 1 << 20


def lease_key(job: dict) -> tuple[int, int, int]:
    """A leased job's (job id, attempt, lease token): two leases of one attempt differ by
    their tokens (one of them delivered before a commit that failed)."""
    return job["job_id"], job["attempt"], job.get("lease", 0)


def lease_matches(key: tuple[int, int, int], job_id: int, attempt: int | None, lease: int | None) -> bool:
    """Whether a lease is the one named (attempt and token when given)."""
    return key[0] == job_id and (attempt is None or key[1] == attempt) and (lease is None or key[2] == lease)


def _widen(pipe) -> None:
    """Let a pipe to or from a child hold 1 MiB (Linux): a large job goes across in a few
    writes instead of hundreds of 64 KiB ones, each waking the other side."""
    try:
        fcntl.fcntl(pipe.fileno(), F_SETPIPE_SZ, PIPE_SIZE)
    except (AttributeError, OSError):
        pass


def _note_peak(attempt: Attempt, child: Child) -> None:
    """Note the peak memory of the process running `attempt`, as it is now."""
    if child.alive and child.transport.pid:
        attempt.peak = peak_of(child.transport.pid) or attempt.peak


def machine_memory() -> int | None:
    """Bytes of physical memory, or None where the system does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _memory_error(error: str | None) -> bool:
    """Whether a job's traceback ends in a MemoryError."""
    return isinstance(error, str) and bool(error.strip()) and error.strip().splitlines()[-1].startswith("MemoryError")


def _mib(size: int | None) -> int | None:
    """`size` bytes in whole MiB (at least 1), or None."""
    return max(1, size // MIB) if size else None


def _describe(ended) -> str:
    sig = getattr(ended, "signal", None)
    if sig:
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = str(sig)
        # A SIGKILL that dsage did not send (a timeout or a kill says so instead) is most
        # often the kernel's out-of-memory killer.
        hint = (" (out of memory? the kernel's OOM killer sends it; a worker started with --max-memory "
                "turns that into a MemoryError in the job)" if sig == signal.SIGKILL else "")
        return f"killed by signal {sig} ({name}){hint}"
    return f"exit status {getattr(ended, 'exitCode', '?')} without reporting an outcome"
