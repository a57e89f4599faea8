"""The fast chaos rounds (make chaos runs many): random kill -9 of server, workers and client,
on the server's own FileStorage and on a real ZEO server and PostgreSQL."""
from __future__ import annotations

import random

import pytest

from tests.support.chaos import run_round


@pytest.mark.parametrize("db", ["file", "zeo", "postgres"])
def test_a_chaos_round_loses_and_duplicates_nothing(db):
    """Jobs and a DistributedFunction survive random kills: nothing lost, nothing applied
    twice, every answer right, nothing left processing."""
    seed = random.randrange(1 << 30)
    report = run_round(seed, kills=5, n_map=150, n_fn=600, chunk=5, db=db)
    print(report.line())
    assert report.ok, f"{db}: {report.line()}"
