"""JobRunner: each job in its own child process and process group, with a timeout,
kill escalation (TERM, then KILL), capped output and a temporary working directory."""
from __future__ import annotations

import os
import shutil
import signal
import sys
import tempfile
import time

import msgpack
from twisted.internet import defer, protocol
from twisted.logger import Logger

OUTPUT_MARKER = b"\n[... output truncated by dsage ...]\n"
KILL_GRACE = 2.0
ENV_KEEP = ("PATH", "HOME", "LANG", "LC_ALL", "LC_CTYPE", "PYTHONPATH", "VIRTUAL_ENV", "USER", "LOGNAME")


class OutputBuffer:
    """Keeps the head and the tail of a stream, with a marker where the middle was dropped."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.head = bytearray()
        self.tail = bytearray()
        self.dropped = 0

    def write(self, data: bytes) -> None:
        """Add bytes."""
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


class JobProcess(protocol.ProcessProtocol):
    """Talks to one child: sends the job, collects output and the outcome."""

    def __init__(self, job: dict, nice: int, max_output: int, limits: dict) -> None:
        self.job = job
        self.nice = nice
        self.limits = limits
        self.output = OutputBuffer(max_output)
        self.outcome = bytearray()
        self.done = defer.Deferred()
        self.reason: str | None = None

    def connectionMade(self) -> None:
        message = {"kind": self.job["kind"], "payload": self.job["payload"], "files": self.job.get("files"),
                   "name": self.job.get("name"), "nice": self.nice,
                   "limits": dict(self.limits, cpu=int(self.job["timeout"]) + 1)}
        self.transport.write(msgpack.packb(message, use_bin_type=True))
        self.transport.closeStdin()

    def childDataReceived(self, fd: int, data: bytes) -> None:
        if fd == 3:
            self.outcome += data
        else:
            self.output.write(data)

    def processEnded(self, reason) -> None:
        self.done.callback(reason.value)


class JobRunner:
    """Runs jobs as child processes; `run()` fires with the report for the server."""

    log = Logger()

    def __init__(self, reactor, *, nice: int = 10, max_output: int = 1 << 20, limits: dict | None = None) -> None:
        self.reactor = reactor
        self.nice = nice
        self.max_output = max_output
        #: resource limits of each job: memory (bytes of address space), open_files, file_size (bytes).
        self.limits = dict(limits or {})
        self.running: dict[tuple[int, int], tuple[JobProcess, object]] = {}

    def run(self, job: dict) -> defer.Deferred:
        """Run a leased job; fires with a report dict (outcome, result/error, output, times)."""
        return defer.Deferred.fromCoroutine(self._run(job))

    async def _run(self, job: dict) -> dict:
        key = (job["job_id"], job["attempt"])
        workdir = tempfile.mkdtemp(prefix=f"dsage-job{job['job_id']}-")
        env = {k: v for k, v in os.environ.items() if k in ENV_KEEP}
        env.update(PYTHONUNBUFFERED="1", TMPDIR=workdir, DSAGE_JOB_ID=str(job["job_id"]))
        proc = JobProcess(job, self.nice, self.max_output, self.limits)
        start = time.monotonic()
        transport = self.reactor.spawnProcess(
            proc, sys.executable, [sys.executable, "-m", "dsage.worker.child"], env=env, path=workdir,
            childFDs={0: "w", 1: "r", 2: "r", 3: "r"})
        self.running[key] = (proc, transport)
        timer = self.reactor.callLater(job["timeout"], self._stop, key,
                                       f"timed out after {job['timeout']:g} s")
        try:
            ended = await proc.done
        finally:
            if timer.active():
                timer.cancel()
            self.running.pop(key, None)
            shutil.rmtree(workdir, ignore_errors=True)
        report = {"job_id": job["job_id"], "attempt": job["attempt"], "output": proc.output.text(),
                  "wall_time": time.monotonic() - start, "cpu_time": None, "result": None, "error": None}
        try:
            outcome = msgpack.unpackb(bytes(proc.outcome), raw=False) if proc.outcome else None
        except Exception:
            outcome = None
        if proc.reason is not None:
            report.update(outcome="failed", error=f"dsage: the job was stopped: {proc.reason}")
            report["killed"] = proc.reason == "killed"
        elif isinstance(outcome, dict) and outcome.get("ok"):
            report.update(outcome="completed", result=outcome["result"], cpu_time=outcome.get("cpu_time"))
        elif isinstance(outcome, dict):
            report.update(outcome="failed", error=outcome.get("error"), cpu_time=outcome.get("cpu_time"))
        else:
            report.update(outcome="failed", error=f"dsage: the job's process died: {_describe(ended)}")
        return report

    def _stop(self, key: tuple[int, int], reason: str) -> None:
        entry = self.running.get(key)
        if entry is None:
            return
        proc, transport = entry
        if proc.reason is None:
            proc.reason = reason
        self._signal(transport, signal.SIGTERM)
        self.reactor.callLater(KILL_GRACE, self._signal, transport, signal.SIGKILL)

    def _signal(self, transport, sig: int) -> None:
        pid = transport.pid
        if pid is None:
            return
        try:
            os.killpg(pid, sig)
        except (ProcessLookupError, PermissionError):
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass

    def kill(self, job_id: int, attempt: int | None = None) -> bool:
        """Stop a running attempt (TERM, then KILL); False if it is not running here."""
        for key in list(self.running):
            if key[0] == job_id and (attempt is None or key[1] == attempt):
                self._stop(key, "killed")
                return True
        return False

    def held(self) -> list[list[int]]:
        """The (job id, attempt) pairs running now."""
        return [list(k) for k in self.running]

    def stop_all(self) -> None:
        """Kill every running job (worker shutdown)."""
        for key in list(self.running):
            self._stop(key, "worker shut down")


def _describe(ended) -> str:
    sig = getattr(ended, "signal", None)
    if sig:
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = str(sig)
        return f"killed by signal {sig} ({name})"
    return f"exit status {getattr(ended, 'exitCode', '?')} without reporting an outcome"
