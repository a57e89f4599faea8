"""Scatter/gather: one function over many argument sets, results gathered in order, new work
added while earlier results are looked at (without blocking).

    python -m dsage.examples.scatter            # on a local cluster it starts itself
"""
from __future__ import annotations

import math


def simulate(seed: int, steps: int = 20_000, drift: float = 0.0) -> float:
    """A small random walk: the mean of its positions."""
    import random

    rng = random.Random(seed)
    x = total = 0.0
    for _ in range(steps):
        x += rng.gauss(drift, 1.0)
        total += x
    return total / steps


def sweep(D, drifts=(0.0, 0.01, 0.02), seeds: int = 8) -> dict[float, float]:
    """Scatter one job per (seed, drift), gather the means per drift, in order."""
    import dsage

    items = [((seed,), {"drift": drift}) for drift in drifts for seed in range(seeds)]
    jobs = D.starmap(simulate, items)
    # While they run, add a refinement for the first drift whose first results look noisy.
    extra = []
    for job in dsage.as_completed(jobs[:seeds], timeout=600):
        if abs(job.result) > 50 and not extra:
            extra = D.starmap(simulate, [((seed,), {"drift": drifts[0], "steps": 40_000}) for seed in range(seeds)])
    values = [j.wait(timeout=600) for j in jobs]
    out = {d: sum(values[i * seeds:(i + 1) * seeds]) / seeds for i, d in enumerate(drifts)}
    if extra:
        out["refined"] = sum(j.wait(timeout=600) for j in extra) / seeds
    return out


if __name__ == "__main__":
    import dsage

    D, cluster = dsage.start_all(workers=2)
    try:
        for drift, mean in sweep(D).items():
            print(f"drift {drift}: mean position {mean:.3f}" + ("" if math.isfinite(mean) else " (?)"))
    finally:
        D.close()
        cluster.stop()
