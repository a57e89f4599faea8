"""Application benchmarks: DistributedFactor and DistributedPOVRay with 1 and 2 worker slots
on this machine, and the original DSage headline, 11^150+1 fully factored by
DistributedFactor against single-process PARI `factor` (cypari).

    .venv/bin/python bench/apps.py                 # speedups (a few minutes)
    .venv/bin/python bench/apps.py --headline      # also 11^150+1 against PARI (PARI alone > 5 min)
    .venv/bin/python bench/apps.py --runs 5 --only factor

Prints one table: medians, spreads (min..max) over the runs (ECM seeds differ per run), ratios.
"""
from __future__ import annotations

import argparse
import multiprocessing
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dsage.client.local import LocalCluster  # noqa: E402
from dsage.examples.demo import DEFAULT_NUMBER  # noqa: E402
from dsage.examples.factor import DistributedFactor  # noqa: E402
from dsage.examples.povray import SCENE, DistributedPOVRay, povray_command  # noqa: E402

HEADLINE = 11**150 + 1


def cluster_with(slots: int) -> tuple:
    cluster = LocalCluster()
    cluster.init()
    cluster.start_server()
    cluster.add_worker(slots=slots)
    D = cluster.connect()
    cluster.wait_for_workers(D)
    return D, cluster


def time_factor(D, n: int, seed: int) -> float:
    f = DistributedFactor(D, n, seed=seed)
    start = time.perf_counter()
    result = f.start().wait(timeout=7200)
    elapsed = time.perf_counter() - start
    check = 1
    for p, e in result.items():
        check *= p ** e
    assert check == n, "wrong factorization"
    return elapsed


def time_povray(D, width: int, height: int, splits: int) -> float:
    out = Path(tempfile.mkdtemp()) / "bench.png"
    start = time.perf_counter()
    DistributedPOVRay(D, SCENE, width, height, splits, output=out).start().wait(timeout=3600)
    return time.perf_counter() - start


def time_single_povray(width: int, height: int) -> float:
    out = Path(tempfile.mkdtemp()) / "single.png"
    start = time.perf_counter()
    subprocess.run(povray_command(str(SCENE), str(out), width, height, 1, height), check=True, capture_output=True)
    return time.perf_counter() - start


def pari_factor(n: int, queue) -> None:
    from cypari import pari

    pari.allocatemem(2 * 10**9)
    start = time.perf_counter()
    pari.factor(n)
    queue.put(time.perf_counter() - start)


def time_pari(n: int, limit: float) -> float | None:
    queue = multiprocessing.Queue()
    proc = multiprocessing.Process(target=pari_factor, args=(n, queue))
    proc.start()
    proc.join(limit)
    if proc.is_alive():
        proc.kill()
        return None
    return queue.get()


def summary(values: list[float]) -> str:
    return f"{statistics.median(values):8.2f} s  ({min(values):.2f}..{max(values):.2f})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--only", choices=["factor", "povray"], default=None)
    parser.add_argument("--headline", action="store_true", help="also 11^150+1 against PARI")
    parser.add_argument("--pari-limit", type=float, default=3600, help="seconds PARI may take")
    args = parser.parse_args()
    rows: list[tuple[str, str, str]] = []
    if args.only in (None, "factor") and shutil.which("ecm"):
        times = {}
        for slots in (1, 2):
            D, cluster = cluster_with(slots)
            try:
                times[slots] = [time_factor(D, DEFAULT_NUMBER, seed) for seed in range(args.runs)]
            finally:
                D.close()
                cluster.stop()
            rows.append((f"DistributedFactor demo number, {slots} slot(s)", summary(times[slots]), ""))
        rows.append(("  speedup 1 -> 2 slots", "", f"{statistics.median(times[1]) / statistics.median(times[2]):.2f}x"))
    if args.only in (None, "povray") and shutil.which("povray"):
        w, h, splits = 640, 480, 16
        single = [time_single_povray(w, h) for _ in range(args.runs)]
        rows.append((f"POV-Ray {w}x{h}, one process", summary(single), ""))
        times = {}
        for slots in (1, 2):
            D, cluster = cluster_with(slots)
            try:
                times[slots] = [time_povray(D, w, h, splits) for _ in range(args.runs)]
            finally:
                D.close()
                cluster.stop()
            rows.append((f"DistributedPOVRay {splits} strips, {slots} slot(s)", summary(times[slots]), ""))
        rows.append(("  speedup 1 -> 2 slots", "", f"{statistics.median(times[1]) / statistics.median(times[2]):.2f}x"))
        rows.append(("  2 slots against one process", "", f"{statistics.median(single) / statistics.median(times[2]):.2f}x"))
    if args.headline:
        D, cluster = cluster_with(2)
        try:
            dist = [time_factor(D, HEADLINE, 1000 + seed) for seed in range(args.runs)]
        finally:
            D.close()
            cluster.stop()
        rows.append(("11^150+1, DistributedFactor, 2 slots", summary(dist), ""))
        pari = time_pari(HEADLINE, args.pari_limit)
        if pari is None:
            rows.append(("11^150+1, PARI factor, one process", f"> {args.pari_limit:.0f} s (stopped)", ""))
            rows.append(("  PARI / dsage", "", f"> {args.pari_limit / statistics.median(dist):.1f}x"))
        else:
            rows.append(("11^150+1, PARI factor, one process", f"{pari:8.2f} s", ""))
            rows.append(("  PARI / dsage", "", f"{pari / statistics.median(dist):.1f}x"))
    width = max(len(r[0]) for r in rows) if rows else 10
    print(f"{'benchmark':{width}}  {'median (min..max)':28} ratio")
    for name, value, ratio in rows:
        print(f"{name:{width}}  {value:28} {ratio}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
