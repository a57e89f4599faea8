"""Simulated worker slots for bench/scale.py: one TLS connection per bundle, speaking the real
worker protocol (hello, long-poll take, report, heartbeat) through `WorkerSession`, running
each job's function in this process at once.  Runs until stdin closes, then prints JSON:
jobs run and heartbeat round trips in ms.

    python bench/simworkers.py HOST:PORT BUNDLE_DIR NAME [NAME ...]
"""
from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

import cloudpickle
from twisted.internet import defer, reactor
from twisted.internet.protocol import Factory

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dsage import tls  # noqa: E402
from dsage.config import split_address  # noqa: E402
from dsage.worker.runner import lease_key  # noqa: E402
from dsage.worker.session import WorkerProtocol, WorkerSession  # noqa: E402

RTT: list[float] = []
JOBS = [0]


class TimedSession(WorkerSession):
    """A worker session that records how long each heartbeat takes to be answered."""

    def beat(self):
        t0 = time.perf_counter()
        d = super().beat()
        if d is not None:
            d.addCallback(lambda _: RTT.append((time.perf_counter() - t0) * 1000))
        return d


class SimWorker:
    """One 1-slot worker that runs each job's function inline."""

    slots = 1

    def __init__(self, bundle: tls.Bundle) -> None:
        self.bundle = bundle
        self.running: dict = {}
        self.session: TimedSession | None = None

    def room(self) -> int:
        return self.slots - len(self.running)

    def held(self) -> list:
        return [list(k) for k in self.running]

    def live_output(self, again: bool = False) -> list:
        return []                   # its jobs print nothing

    def job_memory(self) -> None:
        return None                 # says nothing: takes the jobs that need no stated memory

    def unsent_reports(self) -> list:
        return []

    def keep_report(self, report: dict) -> None:
        pass

    def drop(self, job_id: int, attempt=None) -> bool:
        return False

    def kill(self, data: dict) -> None:
        pass

    def connection_lost(self, proto) -> None:
        if self.session is not None:
            self.session.lost()

    def start_job(self, job: dict) -> None:
        self.running[lease_key(job)] = job
        reactor.callLater(0, self._run, job)

    def _run(self, job: dict) -> None:
        func, args, kwargs = cloudpickle.loads(job["payload"])
        self.running.pop(lease_key(job))
        JOBS[0] += 1
        self.session.send_report({"job_id": job["job_id"], "attempt": job["attempt"], "lease": job["lease"],
                                  "outcome": "completed",
                                  "result": cloudpickle.dumps(func(*args, **kwargs)), "output": "",
                                  "error": None, "cpu_time": 0.0, "wall_time": 0.0})


def start(address: str, path: Path) -> None:
    worker = SimWorker(tls.Bundle.load(path))
    host, port = split_address(address)
    factory = Factory.forProtocol(WorkerProtocol)
    factory.worker = worker
    endpoint = tls.client_endpoint(worker.bundle, reactor, host, port, timeout=60)

    def connected(proto) -> None:
        worker.session = TimedSession(proto, worker, reactor)
        defer.Deferred.fromCoroutine(worker.session.start()).addErrback(lambda f: print(f, file=sys.stderr))
    endpoint.connect(factory).addCallbacks(connected, lambda f: print(f, file=sys.stderr))


def main() -> None:
    address, folder, names = sys.argv[1], Path(sys.argv[2]), sys.argv[3:]
    for i, name in enumerate(names):
        reactor.callLater(i * 0.01, start, address, folder / f"{name}.pem")

    def wait_for_stdin() -> None:
        sys.stdin.read()
        reactor.callFromThread(reactor.stop)
    threading.Thread(target=wait_for_stdin, daemon=True).start()
    reactor.run()
    print(json.dumps({"jobs": JOBS[0], "rtt_ms": RTT}))


if __name__ == "__main__":
    main()
