"""dsage at scale: a database of 1,000,000 jobs, and 1,000 connected worker slots.

- queue:   throughput of 5,000 no-op jobs (priority 0, 2 slots) with an empty queue and with
           N jobs queued behind them (priority 9): dispatch cost flat in queue length; the
           server's resident memory after each run.
- restart: with N jobs stored, seconds from starting dsage_server to listening and to the
           first job's result, after a clean stop (SIGTERM) and after kill -9; then after
           kill -9 at the end of a run of --since jobs since the start, with the index saved
           every 30 s (index_seconds, the default) and never (index_seconds = 0).
- slots:   1,000 simulated worker slots (connections in 4 processes; each takes jobs and
           reports them at once) heartbeating every 2 s while a client runs 10,000 jobs:
           heartbeat round trips (p50, p99) and jobs/s.
- steady:  rounds of 5,000 jobs with finished jobs kept 10 s (keep_days) and automatic
           packs: the database file's size after each round levels off.

    .venv/bin/python bench/scale.py                       # every cell, N = 1,000,000
    .venv/bin/python bench/scale.py --cell queue --jobs 100000
"""
from __future__ import annotations

import argparse
import json
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dsage import Job  # noqa: E402
from dsage.client.local import LocalCluster  # noqa: E402

CELLS = ["queue", "restart", "slots", "steady"]
FILL_BATCH = 10_000


def fill(cluster: LocalCluster, n: int) -> float:
    """Store n queued no-op jobs (priority 9, owner "filler") in the stopped server's
    database; seconds taken."""
    from dsage.config import load_server_config
    from dsage.server.service import open_db
    from dsage.server.store import JobStore

    store = JobStore(open_db(load_server_config(dsage_home=cluster.home).db_uri), threaded=False)
    spec = {"kind": "code", "payload": b"None", "name": "filler", "priority": 9, "max_failures": 1}
    t0 = time.perf_counter()
    try:
        for start in range(0, n, FILL_BATCH):
            failures = []
            store.submit("filler", [spec] * min(FILL_BATCH, n - start)).addErrback(failures.append)
            if failures:
                failures[0].raiseException()
    finally:
        store.stop()
    return time.perf_counter() - t0


def rss_mib(pid: int) -> float:
    """Resident memory of a process in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def connect(cluster: LocalCluster):
    D = cluster.connect()
    cluster.wait_for_workers(D)
    return D


def run_jobs(D, n: int) -> float:
    """jobs/s of n no-op jobs at priority 0."""
    t0 = time.perf_counter()
    jobs = D.map(abs, range(n), priority=0)
    values = [j.wait(timeout=600) for j in jobs]
    assert values == list(range(n))
    return n / (time.perf_counter() - t0)


def cell_queue(n: int, jobs: int, repeats: int) -> list[tuple[str, str]]:
    rows = []
    for queued in (0, n):
        with LocalCluster() as cluster:
            cluster.init()
            filled = fill(cluster, queued) if queued else 0.0
            cluster.start_server()
            cluster.add_worker(slots=2)
            D = connect(cluster)
            run_jobs(D, 200)                                    # warm up
            rates = [run_jobs(D, jobs) for _ in range(repeats)]
            rss = rss_mib(cluster.server.pid)
            D.close()
            size = sum(f.stat().st_size for f in (cluster.home / "db").glob("*.fs"))
        label = f"{queued:,} queued"
        if queued:
            rows.append((f"fill {label}", f"{filled:.1f} s ({queued / filled:,.0f} jobs/s), file {size / 2**20:,.0f} MiB"))
        rows.append((f"throughput, {label}", f"{statistics.median(rates):,.0f} jobs/s "
                                             f"({min(rates):,.0f}..{max(rates):,.0f})"))
        rows.append((f"server memory, {label}", f"{rss:,.0f} MiB resident"))
    return rows


def timed_start(cluster: LocalCluster) -> tuple[float, float]:
    """Seconds to listening, and to the first job's result."""
    t0 = time.perf_counter()
    cluster.start_server(timeout=600)
    listening = time.perf_counter() - t0
    D = cluster.connect()
    assert D.submit(Job(func=abs, args=(-1,), priority=-5)).wait(timeout=600) == 1
    first = time.perf_counter() - t0
    D.close()
    return listening, first


def cell_restart(n: int, since: int) -> list[tuple[str, str]]:
    rows = []
    with LocalCluster() as cluster:
        cluster.init()
        fill(cluster, n)
        t0 = time.perf_counter()
        cluster.start_server(timeout=600)
        rows.append((f"first start, {n:,} jobs stored", f"{time.perf_counter() - t0:.2f} s to listening"))
        cluster.add_worker(slots=2)
        cases = (("clean stop (SIGTERM)", signal.SIGTERM, False), ("kill -9", signal.SIGKILL, False),
                 ("kill -9, no index file (rebuilt from the whole file)", signal.SIGKILL, True))
        for how, sig, lose_index in cases:
            cluster.stop_server(sig)
            if lose_index:
                for index in (cluster.home / "db").glob("*.fs.index"):
                    index.unlink()
            listening, first = timed_start(cluster)
            rows.append((f"restart after {how}", f"{listening:.2f} s to listening, {first:.2f} s to a first result"))
        for every in (30.0, 0.0):
            cluster.stop_server()
            cluster.configure(index_seconds=every)
            cluster.start_server(timeout=600)
            D = connect(cluster)
            rate = run_jobs(D, since)
            D.close()
            cluster.stop_server(signal.SIGKILL)
            listening, first = timed_start(cluster)
            rows.append((f"kill -9 after {since:,} jobs ({rate:,.0f}/s), index every {every:g} s",
                         f"{listening:.2f} s to listening, {first:.2f} s to a first result"))
    return rows


def cell_slots(slots: int, procs: int, jobs: int, heartbeat: float) -> list[tuple[str, str]]:
    with LocalCluster() as cluster:
        cluster.init()
        cluster.configure(heartbeat_seconds=heartbeat, lease_seconds=max(60.0, 6 * heartbeat))
        cluster.start_server()
        D = cluster.connect()
        names = [f"sim{i}" for i in range(slots)]
        bundles = cluster.home / "sim"
        bundles.mkdir()
        t0 = time.perf_counter()
        for name in names:
            reply = D._call("add_identity", name=name, role="worker", force=False)
            (bundles / f"{name}.pem").write_bytes(reply["bundle"])
        issued = time.perf_counter() - t0
        per = [names[i::procs] for i in range(procs)]
        sims = [subprocess.Popen([sys.executable, str(Path(__file__).with_name("simworkers.py")), cluster.address,
                                  str(bundles), *group], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
                for group in per]
        deadline = time.monotonic() + 120
        while len(D.workers()) < slots and time.monotonic() < deadline:
            time.sleep(0.2)
        connected = len(D.workers())
        time.sleep(2 * heartbeat)                     # heartbeats with every slot idle
        rate = run_jobs(D, jobs) if connected else 0.0
        rss = rss_mib(cluster.server.pid)
        results = [json.loads(p.communicate("")[0]) for p in sims]
        D.close()
    rtts = sorted(x for r in results for x in r["rtt_ms"])
    done = sum(r["jobs"] for r in results)
    return [("worker slots connected", f"{connected:,} (1 slot each, {procs} processes; {slots:,} bundles issued in {issued:.1f} s)"),
            (f"heartbeats every {heartbeat:g} s", f"{len(rtts):,} answered, round trip p50 {rtts[len(rtts) // 2]:.1f} ms, "
                                                 f"p99 {rtts[int(0.99 * (len(rtts) - 1))]:.1f} ms, max {rtts[-1]:.1f} ms"),
            (f"throughput with {connected:,} slots", f"{rate:,.0f} jobs/s ({done:,} jobs run by the simulated slots)"),
            ("server memory", f"{rss:,.0f} MiB resident")]


def cell_steady(rounds: int, jobs: int) -> list[tuple[str, str]]:
    """Steady load with finished jobs kept 10 s: the database file levels off."""
    rows = []
    with LocalCluster() as cluster:
        cluster.init()
        cluster.configure(keep_days=10 / 86400, maintenance_seconds=2, pack_min_mb=1, pack_growth=2.0)
        cluster.start_server()
        cluster.add_worker(slots=2)
        D = connect(cluster)
        fs = cluster.home / "db" / "dsage.fs"
        sizes: list[float] = []
        disk: list[float] = []          # the whole db folder: the file, its index, blobs, a pack's leftovers
        t0 = time.perf_counter()
        for _ in range(rounds):
            values = [j.wait(timeout=600) for j in D.map(len, [bytes(1000)] * jobs)]
            assert values == [1000] * jobs
            sizes.append(fs.stat().st_size / 2**20)
            disk.append(sum(f.stat().st_size for f in fs.parent.rglob("*") if f.is_file()) / 2**20)
        elapsed = time.perf_counter() - t0
        done = D.status()
        D.close()
    rows.append((f"steady load, {rounds * jobs:,} jobs of 1 kB in {elapsed:.0f} s",
                 f"file after each round (MiB): {' '.join(f'{x:.0f}' for x in sizes)}"))
    rows.append(("the database's folder after each round (MiB)", " ".join(f"{x:.0f}" for x in disk)))
    rows.append(("jobs kept at the end (keep_days = 10 s)", f"{sum(done['jobs'].values()):,}"))
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cell", choices=CELLS, action="append")
    ap.add_argument("--jobs", type=int, default=1_000_000, help="jobs in the database (queue, restart)")
    ap.add_argument("--since", type=int, default=100_000, help="jobs run before the last kill -9 (restart)")
    ap.add_argument("--run", type=int, default=5000, help="jobs per throughput run")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--slots", type=int, default=1000)
    ap.add_argument("--procs", type=int, default=4)
    ap.add_argument("--heartbeat", type=float, default=2.0)
    ap.add_argument("--rounds", type=int, default=20, help="rounds of --run jobs (steady)")
    args = ap.parse_args()
    rows: list[tuple[str, str]] = []
    for cell in args.cell or CELLS:
        if cell == "queue":
            rows += cell_queue(args.jobs, args.run, args.repeats)
        elif cell == "restart":
            rows += cell_restart(args.jobs, args.since)
        elif cell == "slots":
            rows += cell_slots(args.slots, args.procs, args.run * 2, args.heartbeat)
        else:
            rows += cell_steady(args.rounds, args.run)
        for label, value in rows:
            print(f"{label:55} {value}", flush=True)
        rows = []
    return 0


if __name__ == "__main__":
    sys.exit(main())
