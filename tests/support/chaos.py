"""Chaos rounds: kill -9 the server, workers and a DistributedFunction's client, and stop
workers (SIGTERM: they give their jobs back), at random moments while several hundred jobs
run, then check that nothing was lost or applied twice.

    python -m tests.support.chaos --rounds 20 [--seed S] [--seconds 20]     (make chaos)

Each round prints its seed; a failing round can be replayed with --seed."""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from dsage.client.local import LocalCluster
from tests.support.databases import postgres_server, zeo_server

SCRIPT = str(Path(__file__).with_name("df_client.py"))


@dataclass
class Report:
    """What one round did and found."""

    seed: int
    kills: dict = field(default_factory=lambda: {"server": 0, "worker": 0, "worker stop": 0, "client": 0})
    jobs: int = 0
    lost: int = 0
    duplicated: int = 0
    wrong: int = 0
    stuck: int = 0
    longest_recovery: float = 0.0
    seconds: float = 0.0
    detail: str = ""

    @property
    def ok(self) -> bool:
        return not (self.lost or self.duplicated or self.wrong or self.stuck)

    def line(self) -> str:
        k = self.kills
        return (f"seed {self.seed}: kills server {k['server']} worker {k['worker']} client {k['client']}, "
                f"worker stops {k['worker stop']}; "
                f"jobs {self.jobs}, lost {self.lost}, duplicated {self.duplicated}, wrong {self.wrong}, "
                f"stuck {self.stuck}; longest recovery {self.longest_recovery:.2f} s; {self.seconds:.1f} s"
                + (f"\n{self.detail}" if self.detail else ""))


def _client(cluster: LocalCluster, name: str, mode: str, n: int, chunk: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, SCRIPT, cluster.address, str(cluster.home / "client.pem"), name,
                             mode, str(n), str(chunk), "0.005"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, env=dict(os.environ, PYTHONPATH=str(Path(SCRIPT).parents[2])))


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


def _database(stack: contextlib.ExitStack, db: str) -> str | None:
    """The URI of a fresh database of kind `db` (file: None, the cluster's own FileStorage;
    zeo and postgres: a real server, stopped with `stack`)."""
    if db == "zeo":
        folder = Path(tempfile.mkdtemp(prefix="dsage-zeo-"))
        stack.callback(shutil.rmtree, folder, ignore_errors=True)
        return stack.enter_context(zeo_server(folder)).uri()
    if db == "postgres":
        return stack.enter_context(postgres_server())
    return None


def run_round(seed: int, kills: int = 8, n_map: int = 300, n_fn: int = 1500, chunk: int = 5,
              n_big: int = 40, db: str = "file") -> Report:
    """One chaos round on a fresh cluster; the report of what happened."""
    rng = random.Random(seed)
    report = Report(seed)
    start = time.monotonic()
    cluster = LocalCluster(lease_seconds=2)
    stack = contextlib.ExitStack()
    try:
        uri = _database(stack, db)
        cluster.init()
        if uri:
            cluster.configure(db=uri)
        cluster.start_server()
        for _ in range(2):
            cluster.add_worker(slots=1)
        D = cluster.connect()
        name = f"chaos-{seed}"
        client = _client(cluster, name, "start", n_fn, chunk)
        client.stdout.readline()
        jobs = D.map(pow, range(n_map), [2] * n_map)
        # Large payloads and results too (stored as slices of one blob file per request).
        blobs = [rng.randbytes(100_000 + 997 * i) for i in range(n_big)]
        big = D.map(lambda b: b[::-1], blobs)     # a lambda travels by value
        for _ in range(kills):
            time.sleep(rng.uniform(0.2, 1.2))
            victim = rng.choice(["server", "worker", "worker stop", "client"])
            report.kills[victim] += 1
            if victim == "server":
                cluster.stop_server(signal.SIGKILL)
                time.sleep(rng.uniform(0.0, 1.0))
                cluster.start_server()
                t0 = time.monotonic()
                D.eval("'probe'", priority=0).wait(timeout=120)
                report.longest_recovery = max(report.longest_recovery, time.monotonic() - t0)
            elif victim.startswith("worker"):
                proc = rng.choice(cluster.workers)
                if victim == "worker stop":     # SIGTERM: it gives its jobs back as it goes
                    proc.send_signal(signal.SIGTERM)
                    proc.wait(timeout=60)
                else:
                    _kill(proc)
                cluster.workers.remove(proc)
                cluster.add_worker(slots=1)
            else:
                _kill(client)
                client = _client(cluster, name, "restore", n_fn, chunk)
                client.stdout.readline()
        # Let it finish: the function's last client runs to the end.
        # Read through the same buffered stream as readline() did (communicate() would skip
        # what that buffer already holds).
        out = client.stdout.read()
        err = client.stderr.read()
        client.wait(timeout=600)
        try:
            final = json.loads(out.strip().splitlines()[-1])
        except (ValueError, IndexError):
            final = {"result": None, "seen": []}
            report.detail = f"the last client ended with {client.returncode}: {err.strip()[-1500:]}"
        expected = sum(k * k for k in range(1, n_fn + 1))
        seen = final["seen"]
        report.jobs = n_map + n_fn // chunk
        report.wrong += final["result"] != expected
        report.duplicated += len(seen) - len(set(seen))
        report.lost += n_fn // chunk - len(set(seen))
        values = [j.wait(timeout=600) for j in jobs]
        report.wrong += sum(v != i * i for i, v in enumerate(values))
        report.wrong += sum(j.wait(timeout=600) != b[::-1] for j, b in zip(big, blobs))
        report.jobs += n_big
        report.stuck = D.status()["jobs"].get("processing", 0)
        D.close()
    finally:
        cluster.stop()
        stack.close()
    report.seconds = time.monotonic() - start
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--seed", type=int, default=None, help="the first round's seed (then seed+1, ...)")
    parser.add_argument("--kills", type=int, default=12, help="random kills per round")
    parser.add_argument("--db", choices=("file", "zeo", "postgres"), default="file",
                        help="the server's database: its FileStorage, or a real ZEO or PostgreSQL server")
    args = parser.parse_args()
    first = args.seed if args.seed is not None else random.randrange(1 << 30)
    reports = []
    for i in range(args.rounds):
        report = run_round(first + i, kills=args.kills, db=args.db)
        print(report.line(), "OK" if report.ok else "FAILED", flush=True)
        reports.append(report)
    kills = {k: sum(r.kills[k] for r in reports) for k in ("server", "worker", "worker stop", "client")}
    print(f"{len(reports)} rounds: kills {kills}, jobs {sum(r.jobs for r in reports)}, "
          f"lost {sum(r.lost for r in reports)}, duplicated {sum(r.duplicated for r in reports)}, "
          f"wrong {sum(r.wrong for r in reports)}, stuck {sum(r.stuck for r in reports)}, "
          f"longest recovery {max(r.longest_recovery for r in reports):.2f} s")
    return 0 if all(r.ok for r in reports) else 1


if __name__ == "__main__":
    sys.exit(main())
