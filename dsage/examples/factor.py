"""DistributedFactor: trial division, then many independent factoring jobs spread over the
workers; the first factor found splits the number, and the rest is refined until every
factor is prime.  `result` is {prime: exponent}, like `sympy.factorint`.

Engine: this version runs Pollard's rho (Brent's variant) in pure Python, each job with its
own polynomial constant; `B1` sets the work per job (B1 * 100 iterations) and `curves` the
number of jobs per composite before the bound is raised.  (GMP-ECM as an engine is
planned: see the project's issues.)"""
from __future__ import annotations

import math
import random
from collections import Counter

from dsage.client.distributed import DistributedFunction
from dsage.job import Job

SMALL_PRIMES = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41)


def is_probable_prime(n: int) -> bool:
    """Miller-Rabin; exact below 3.3e24 (the first 13 prime bases), else 24 more random bases."""
    if n < 2:
        return False
    for p in SMALL_PRIMES:
        if n % p == 0:
            return n == p
    d, s = n - 1, 0
    while d % 2 == 0:
        d, s = d // 2, s + 1
    rng = random.Random(n)
    bases = list(SMALL_PRIMES) + ([rng.randrange(2, n - 1) for _ in range(24)] if n >= 3_317_044_064_679_887_385_961_981 else [])
    for a in bases:
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(s - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


def trial_division(n: int, limit: int) -> tuple[dict, int]:
    """Divide out the primes below `limit`: ({prime: exponent}, cofactor)."""
    found: Counter = Counter()
    for p in (2, 3):
        while n % p == 0:
            found[p] += 1
            n //= p
    p, step = 5, 2
    while p < limit and p * p <= n:
        while n % p == 0:
            found[p] += 1
            n //= p
        p, step = p + step, 6 - step
    return dict(found), n


def rho(n: int, c: int, iterations: int) -> int | None:
    """Pollard-Brent rho with x -> x^2 + c; a proper factor of n, or None."""
    if n % 2 == 0:
        return 2
    y, r, q, g, m = 2, 1, 1, 1, 128
    done = 0
    x = ys = y
    while g == 1 and done < iterations:
        x = y
        for _ in range(r):
            y = (y * y + c) % n
        k = 0
        while k < r and g == 1:
            ys = y
            for _ in range(min(m, r - k)):
                y = (y * y + c) % n
                q = q * abs(x - y) % n
            g = math.gcd(q, n)
            k += m
        done += r
        r *= 2
    if g == n:
        g = 1
        while g == 1:
            ys = (ys * ys + c) % n
            g = math.gcd(abs(x - ys), n)
    return g if 1 < g < n else None


def rho_job(n: int, c: int, iterations: int) -> tuple[int, int | None]:
    """One factoring job: (n, a proper factor of n or None)."""
    return n, rho(n, c, iterations)


class DistributedFactor(DistributedFunction):
    """Factor `n` on the cluster; `result` is {prime: exponent} and `prime_factors` the primes."""

    def __init__(self, D, n: int, concurrent: int | None = None, B1: int = 2000, curves: int = 8,
                 trial_division_limit: int = 10_000, name: str | None = None) -> None:
        if not isinstance(n, int) or n < 2:
            raise ValueError("n must be an integer of at least 2")
        super().__init__(D, name=name or f"factor-{n}")
        self.n = n
        self.window = concurrent
        self.B1 = B1
        self.curves = curves
        self.trial_division_limit = trial_division_limit
        self.factors: Counter = Counter()
        self.composites: Counter = Counter()
        self.sent_trial = False
        self.jobs_run = 0
        self._next_c: dict[int, int] = {}

    @property
    def prime_factors(self) -> list[int]:
        """The primes found so far, sorted."""
        return sorted(self.factors)

    def next_job(self) -> Job | None:
        if not self.sent_trial:
            self.sent_trial = True
            return Job(func=trial_division, args=(self.n, self.trial_division_limit), name="trial division")
        if not self.composites:
            return None
        m = next(iter(self.composites))
        c = self._next_c.get(m, 1)
        self._next_c[m] = c + 1
        rounds = (c - 1) // max(1, self.curves)
        iterations = self.B1 * 100 * 2 ** rounds      # raise the bound as attempts fail
        return Job(func=rho_job, args=(m, c, iterations), name=f"rho c={c} on {str(m)[:12]}...")

    def process_result(self, job) -> None:
        self.jobs_run += 1
        if job.status != "completed":
            return
        value = job.result
        if job.name == "trial division":
            small, cofactor = value
            self.factors.update(small)
            self._add(cofactor, 1)
        else:
            m, factor = value
            k = self.composites.pop(m, 0) if factor else 0
            if k:
                self._add(factor, k)
                self._add(m // factor, k)
        if not self.composites and self.sent_trial and not self.done:
            self.result = dict(sorted(self.factors.items()))
            self.done = True

    def _add(self, m: int, k: int) -> None:
        """Record a cofactor `k` times: a prime, or a composite still to split."""
        if m == 1:
            return
        if is_probable_prime(m):
            self.factors[m] += k
        else:
            self.composites[m] += k
