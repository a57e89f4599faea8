"""dsage against the peers, with the peers' workload definitions (../shared/bench/peers):

- throughput: 10,000 no-op jobs (each returns its int argument), first submit to last result;
- latency: 200 sequential round trips of one no-op job (submit, run, result in the client);
- payload: 200 jobs, each with a distinct 1 MiB bytes argument, returning its length;
- cpu: 16 jobs of ~0.5 s of pure-Python loop; efficiency = serial time / (2 x wall).

dsage runs a local server and one worker with 2 slots, every state change durable in ZODB
(FileStorage, fsync) before it is acknowledged.  The peers' figures are their latest results
in the harness (``--run-peers`` runs the harness first: its setup.sh once, then run.py).

    make bench                                   # all workloads, 3 repeats
    .venv/bin/python bench/dsage_bench.py --workload latency --repeats 5
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dsage.client.local import LocalCluster  # noqa: E402

PEERS_DIR = Path(__file__).resolve().parent.parent.parent / "shared" / "bench" / "peers"
PEERS = ["celery", "celery-aof", "dask", "dask-sat-inf", "rq-simple", "huey", "dramatiq"]
WORKLOADS = ["throughput", "latency", "payload", "cpu"]
CPU_ITERS = int(os.environ.get("BENCH_CPU_ITERS", "5500000"))


def cpu_work(iters: int) -> float:
    """~0.5 s of pure-Python work (the peers' task); returns its own duration."""
    t0 = time.perf_counter()
    s = 0
    for i in range(iters):
        s += i * i % 7
    return time.perf_counter() - t0


def throughput(D, n: int = 10_000) -> dict:
    start = time.perf_counter()
    jobs = D.map(abs, range(n))
    values = [j.wait(timeout=600) for j in jobs]
    elapsed = time.perf_counter() - start
    assert values == list(range(n))
    return {"value": n / elapsed, "unit": "jobs/s", "better": "higher"}


def latency(D, n: int = 200) -> dict:
    samples = []
    for i in range(n):
        t0 = time.perf_counter()
        assert D.submit(abs, i).wait(timeout=60) == i
        samples.append((time.perf_counter() - t0) * 1000)
    samples.sort()
    return {"value": statistics.median(samples), "unit": "median ms", "better": "lower",
            "p99": samples[int(0.99 * (n - 1))]}


def payload(D, n: int = 200, size: int = 1 << 20) -> dict:
    blobs = [os.urandom(64) + bytes(size - 64) for _ in range(n)]
    start = time.perf_counter()
    jobs = D.map(len, blobs)
    values = [j.wait(timeout=600) for j in jobs]
    elapsed = time.perf_counter() - start
    assert values == [size] * n
    return {"value": n * size / 2**20 / elapsed, "unit": "MiB/s", "better": "higher"}


def cpu(D, n: int = 16) -> dict:
    serial = sum(cpu_work(CPU_ITERS) for _ in range(n))
    start = time.perf_counter()
    jobs = D.map(cpu_work, [CPU_ITERS] * n)
    [j.wait(timeout=600) for j in jobs]
    wall = time.perf_counter() - start
    return {"value": serial / (2 * wall) * 100, "unit": "% efficiency", "better": "higher"}


def run_dsage(workloads: list[str], repeats: int, prefetch: int | None) -> dict[str, list[dict]]:
    cluster = LocalCluster()
    out: dict[str, list[dict]] = {w: [] for w in workloads}
    try:
        cluster.init()
        cluster.start_server()
        cluster.add_worker(slots=2, args=("--prefetch", str(prefetch)) if prefetch is not None else ())
        D = cluster.connect()
        cluster.wait_for_workers(D)
        [j.wait(timeout=60) for j in D.map(abs, range(100))]        # warm up
        for w in workloads:
            for _ in range(repeats):
                out[w].append(globals()[w](D))
        D.close()
    finally:
        cluster.stop()
    return out


def peer_results() -> dict[tuple[str, str], list[float]]:
    """The latest invocation's primary values per (peer, workload) from the harness."""
    raw = PEERS_DIR / "results" / "raw.jsonl"
    if not raw.exists():
        return {}
    latest: dict[tuple[str, str], tuple[str, list[float]]] = {}
    for line in raw.read_text().splitlines():
        r = json.loads(line)
        key = (r["peer"], r["workload"])
        value = r["primary"]["value"]
        if r["workload"] == "payload":
            value = r["metrics"].get("mib_s", value)
        if r["workload"] == "cpu":
            value = r["metrics"].get("efficiency", value) * 100
        run, values = latest.get(key, ("", []))
        if r["run_id"] > run:
            latest[key] = (r["run_id"], [value])
        elif r["run_id"] == run:
            values.append(value)
    return {k: v for k, (_, v) in latest.items()}


def run_peers(workloads: list[str], repeats: int) -> None:
    if not (PEERS_DIR / ".venv").exists():
        subprocess.run(["bash", "setup.sh"], cwd=PEERS_DIR, check=True)
    for peer in PEERS:
        for w in workloads:
            subprocess.run([str(PEERS_DIR / ".venv" / "bin" / "python"), "run.py", "--peer", peer, "--workload", w,
                            "--repeats", str(repeats)], cwd=PEERS_DIR, check=False)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workload", choices=WORKLOADS, action="append")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--prefetch", type=int, default=None, help="the worker's --prefetch (default: automatic)")
    ap.add_argument("--run-peers", action="store_true", help="run the peer harness first (long)")
    args = ap.parse_args()
    workloads = args.workload or WORKLOADS
    if args.run_peers and PEERS_DIR.exists():
        run_peers(workloads, args.repeats)
    ours = run_dsage(workloads, args.repeats, args.prefetch)
    peers = peer_results()
    print(f"{'workload':10} {'metric':13} {'dsage median (min..max)':>26}   " + "  ".join(f"{p:>12}" for p in PEERS))
    for w in workloads:
        values = [r["value"] for r in ours[w]]
        unit, better = ours[w][0]["unit"], ours[w][0]["better"]
        med = statistics.median(values)
        cells = []
        for p in PEERS:
            pv = peers.get((p, w))
            if not pv:
                cells.append(f"{'-':>12}")
                continue
            pm = statistics.median(pv)
            ratio = med / pm if better == "higher" else pm / med
            cells.append(f"{pm:7.4g} {ratio:4.2f}x")
        line = f"{w:10} {unit:13} {med:10.4g} ({min(values):.4g}..{max(values):.4g})".ljust(53)
        print(line + "  ".join(cells))
        if w == "latency":
            print(f"{'':10} {'p99 ms':13} {statistics.median(r['p99'] for r in ours[w]):10.4g}")
    print("(peer cells: the peer's median, then dsage's advantage: >1x means dsage is better)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
