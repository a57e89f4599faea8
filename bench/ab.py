"""Compare builds side by side: local clusters in one client process, taking turns.

This VM drifts by 10-40% from one run to the next, which hides changes of 5-10% between
separate runs; clusters that take turns within one run see the same drift.  Each argument
names a cluster and the environment of its server and worker (``KEY:VALUE`` pairs, comma
separated), e.g. another build's source tree on PYTHONPATH:

    git archive HEAD~1 dsage | tar -x -C /tmp/old
    .venv/bin/python bench/ab.py lat old=PYTHONPATH:/tmp/old new=
    ROUNDS=6 .venv/bin/python bench/ab.py payload old=PYTHONPATH:/tmp/old new=

The pair ``db:URI`` is the server's database instead (``memory=db:memory://``: no disk).

Workloads: ``lat`` (100 round trips per round: median and p90 ms), ``req`` (300 requests
that touch no job, ``D.workers()``, per round: one client-server round trip), ``tp`` (``D.map`` of
5,000 no-op jobs per round: jobs/s), ``payload`` (200 x 1 MiB per round: MiB/s).  The
client side is this process' own build for every cluster.
"""
from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dsage.client.local import LocalCluster  # noqa: E402


def main(mode: str, specs: list[str]) -> None:
    clusters = {}
    for spec in specs:
        name, _, pairs = spec.partition("=")
        c = LocalCluster()
        c.env.update(dict(p.split(":", 1) for p in pairs.split(",") if p))
        db = c.env.pop("db", None)
        c.init()
        if db:
            c.configure(db=db)
        c.start_server()
        c.add_worker(slots=2)
        D = c.connect()
        c.wait_for_workers(D)
        [j.wait() for j in D.map(abs, range(100))]
        clusters[name] = (c, D)
    res: dict[str, list[float]] = {k: [] for k in clusters}
    try:
        for _ in range(int(os.environ.get("ROUNDS", 10))):
            for k, (_, D) in clusters.items():
                if mode == "lat":
                    for i in range(100):
                        t0 = time.perf_counter()
                        D.submit(abs, i).wait()
                        res[k].append((time.perf_counter() - t0) * 1000)
                elif mode == "req":
                    for i in range(300):
                        t0 = time.perf_counter()
                        D.workers()
                        res[k].append((time.perf_counter() - t0) * 1000)
                elif mode == "payload":
                    blobs = [os.urandom(64) + bytes((1 << 20) - 64) for _ in range(200)]
                    t0 = time.perf_counter()
                    [j.wait() for j in D.map(len, blobs)]
                    res[k].append(200 / (time.perf_counter() - t0))
                else:
                    t0 = time.perf_counter()
                    [j.wait() for j in D.map(abs, range(5000))]
                    res[k].append(5000 / (time.perf_counter() - t0))
    finally:
        for c, D in clusters.values():
            D.close()
            c.stop()
    for k, v in res.items():
        if mode in ("lat", "req"):
            v = sorted(v)
            print(f"{k:12} median {statistics.median(v):.3f} ms  p90 {v[int(len(v) * 0.9)]:.3f} ms")
        else:
            unit = "MiB/s" if mode == "payload" else "jobs/s"
            print(f"{k:12} median {statistics.median(v):.0f} {unit}  rounds {[round(x) for x in v]}")


if __name__ == "__main__":
    if len(sys.argv) < 3 or sys.argv[1] not in ("lat", "req", "tp", "payload"):
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2:])
