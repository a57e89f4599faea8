"""The fast chaos round (make chaos runs many): random kill -9 of server, workers and client."""
from __future__ import annotations

import random

from tests.support.chaos import run_round


def test_a_chaos_round_loses_and_duplicates_nothing():
    """Jobs and a DistributedFunction survive random kills: nothing lost, nothing applied
    twice, every answer right, nothing left processing."""
    seed = random.randrange(1 << 30)
    report = run_round(seed, kills=5, n_map=150, n_fn=600, chunk=5)
    print(report.line())
    assert report.ok, report.line()
