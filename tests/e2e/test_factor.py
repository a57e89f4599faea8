"""DistributedFactor on real workers with GMP-ECM."""
from __future__ import annotations

import pytest

import dsage
from dsage.examples.factor import DistributedFactor
from tests.e2e.conftest import start_cluster, wait_for

P24 = 300000000000000000006827
P20 = 10000000000000002029


def product(factors: dict) -> int:
    out = 1
    for p, e in factors.items():
        out *= p ** e
    return out


def test_factor_with_ecm_and_proofs(cluster, D):
    """Small primes by trial division, larger ones by ECM; powers and proofs handled."""
    n = 2**5 * 3**2 * (2**64 + 1) * P24 * P20**2
    f = DistributedFactor(D, n, seed=1)
    result = f.start().wait(timeout=300)
    assert result == {2: 5, 3: 2, 274177: 1, 67280421310721: 1, P24: 1, P20: 2}
    assert product(result) == n and f.curves_run > 0 and f.done


def test_prime_input_is_proven_prime(cluster, D):
    """A large prime needs no curves, only its proof."""
    f = DistributedFactor(D, 2**127 - 1)
    assert f.start().wait(timeout=120) == {2**127 - 1: 1}
    assert f.curves_run == 0


def test_worker_without_gmp_ecm_fails_clearly(tmp_path_factory):
    """Without the ecm command the jobs fail with a message naming it; nothing hangs."""
    cluster = start_cluster(tmp_path_factory, workers=0)
    try:
        cluster.add_worker(slots=2, env={"PATH": "/nonexistent"})
        D = cluster.connect()
        wait_for(lambda: D.workers(), what="the worker")
        f = DistributedFactor(D, P24 * P20, concurrent=1)
        with pytest.raises(dsage.DsageError, match="GMP-ECM is not installed"):
            f.start().wait(timeout=120)
        D.close()
    finally:
        cluster.stop()
