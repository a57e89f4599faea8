"""DistributedFactor: distributed integer factorization, as in the original DSage.

Trial division first (one job); then elliptic-curve (ECM) curves with distinct seeds spread
over the workers, with B1 raised level by level as curves fail (the GMP-ECM table of
expected curves per factor size); every factor found splits its composite, and gcds refine
the composites against each other.  A factor is called prime only once proven: by the
deterministic Miller-Rabin bases below 3.3e24, above that by PARI's APRCL test (cypari), in a
proving job on a worker.
When every factor is prime, `result` is {prime: exponent}, like `sympy.factorint`.

Engine: GMP-ECM (the `ecm` command, Debian package gmp-ecm), measured here at about 0.04 s
per curve at B1=50,000 on a 99-digit number.  A worker without it fails the job at once
with a message saying so.
"""
from __future__ import annotations

import math
import random
import shutil
import subprocess
from collections import Counter

from dsage import errors
from dsage.client.distributed import DistributedFunction
from dsage.job import Job

#: (B1, curves) per level: GMP-ECM's expected curves to find factors of 15, 20, ... 60 digits.
ECM_LEVELS = ((2_000, 25), (11_000, 90), (50_000, 300), (250_000, 700), (1_000_000, 1_800),
              (3_000_000, 5_100), (11_000_000, 10_600), (43_000_000, 19_300), (110_000_000, 49_000),
              (260_000_000, 124_000), (850_000_000, 210_000))
SMALL_PRIMES = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41)
MR_EXACT_BELOW = 3_317_044_064_679_887_385_961_981


def _miller_rabin(n: int) -> bool:
    """Miller-Rabin with the first 13 prime bases: a proof below `MR_EXACT_BELOW`."""
    for p in SMALL_PRIMES:
        if n % p == 0:
            return n == p
    d, s = n - 1, 0
    while d % 2 == 0:
        d, s = d // 2, s + 1
    for a in SMALL_PRIMES:
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


def is_prime(n: int) -> bool:
    """A proven primality test (Miller-Rabin below 3.3e24, else PARI's APRCL; main thread)."""
    if n < 2:
        return False
    if n < MR_EXACT_BELOW:
        return _miller_rabin(n)
    if not _miller_rabin(n):
        return False
    from cypari import pari

    return bool(pari.isprime(n))


def perfect_power(n: int) -> tuple[int, int]:
    """(r, e) with r**e == n and e as large as possible (e == 1 if n is no perfect power)."""
    for e in range(n.bit_length(), 1, -1):
        r = round(n ** (1.0 / e)) if n.bit_length() < 1000 else _iroot(n, e)
        for c in (r - 1, r, r + 1):
            if c > 1 and c ** e == n:
                root, power = perfect_power(c)
                return root, power * e
    return n, 1


def _iroot(n: int, e: int) -> int:
    lo, hi = 1, 1 << (n.bit_length() // e + 1)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if mid ** e <= n:
            lo = mid
        else:
            hi = mid - 1
    return lo


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
    if 1 < n < limit * limit:
        found[n] += 1
        n = 1
    return dict(found), n


def prove_prime(n: int) -> tuple[int, bool]:
    """One proving job: (n, whether n is prime), proven."""
    return n, is_prime(n)


def ecm_curves(n: int, B1: int, sigmas: list[int]) -> tuple[int, int | None, int]:
    """Run GMP-ECM curves on n, one per sigma, until a factor: (n, factor or None, curves run)."""
    ecm = shutil.which("ecm")
    if ecm is None:
        raise RuntimeError("GMP-ECM is not installed on this worker: the `ecm` command is missing "
                           "(Debian package gmp-ecm)")
    for done, sigma in enumerate(sigmas, 1):
        out = subprocess.run([ecm, "-q", "-sigma", str(sigma), str(B1)], input=f"{n}\n",
                             capture_output=True, text=True)
        if out.returncode & 1:
            raise RuntimeError(f"ecm failed: {out.stderr.strip() or out.stdout.strip()}")
        # With -q, ecm prints the factors it found, then the cofactor.
        for token in out.stdout.split():
            if token.isdigit() and 1 < int(token) < n and n % int(token) == 0:
                return n, int(token), done
    return n, None, len(sigmas)


class DistributedFactor(DistributedFunction):
    """Factor `n` on the cluster; `result` is {prime: exponent}, `prime_factors` the primes.

    Args:
        n: the integer to factor.
        concurrent: jobs kept outstanding (default: the cluster's slots).
        B1: the first ECM bound (later levels follow the GMP-ECM table).
        curves: curves per level before B1 is raised (default: the table's count).
        trial_division_limit: trial division by the primes below this.
        seed: seed of the curves' sigma values (random by default).
    """

    def __init__(self, D, n: int, concurrent: int | None = None, B1: int = 2_000, curves: int | None = None,
                 trial_division_limit: int = 100_000, seed: int | None = None, name: str | None = None) -> None:
        if not isinstance(n, int) or isinstance(n, bool) or n < 2:
            raise ValueError("n must be an integer of at least 2")
        if B1 < 1 or (curves is not None and curves < 1):
            raise ValueError("B1 and curves must be positive")
        super().__init__(D, name=name)
        self.n = n
        self.window = concurrent
        self.levels = [(B1, curves or ECM_LEVELS[0][1])] + [(b, curves or c) for b, c in ECM_LEVELS if b > B1]
        self.trial_division_limit = trial_division_limit
        self.factors: Counter = Counter()
        self.composites: dict[int, dict] = {}
        self.sent_trial = False
        self.jobs_run = 0
        self.curves_run = 0
        self._next_sigma = random.Random(seed).randrange(1_000, 1 << 30)

    @property
    def prime_factors(self) -> list[int]:
        """The primes found so far, sorted."""
        return sorted(self.factors)

    def next_job(self) -> Job | None:
        if not self.sent_trial:
            self.sent_trial = True
            return Job(func=trial_division, args=(self.n, self.trial_division_limit), name="trial division")
        for x, entry in self.composites.items():
            if entry["state"] == "unproven":
                entry["state"] = "proving"
                return Job(func=prove_prime, args=(x,), name=f"prove c{len(str(x))}")
        ready = [x for x, e in self.composites.items() if e["state"] == "composite"]
        if not ready:
            return None
        m = min(ready)
        entry = self.composites[m]
        B1, level_curves = self.levels[min(entry["level"], len(self.levels) - 1)]
        count = max(1, min(100, round(1.0 / (B1 * 8e-7 * max(1.0, len(str(m)) / 100))), level_curves))
        sigmas = list(range(self._next_sigma, self._next_sigma + count))
        self._next_sigma += count
        entry["scheduled"] += count
        if entry["scheduled"] >= level_curves and entry["level"] < len(self.levels) - 1:
            entry["level"] += 1              # raise the bound as curves fail
            entry["scheduled"] = 0
        return Job(func=ecm_curves, args=(m, B1, sigmas), name=f"ecm B1={B1} x{count} c{len(str(m))}")

    def process_result(self, job) -> None:
        self.jobs_run += 1
        if job.status != "completed":
            error = (job.error or "").strip().splitlines()[-1:] or ["failed"]
            raise errors.DsageError(f"{self.name}: job {job.job_id} ({job.name}) {job.status}: {error[0]}")
        if job.name == "trial division":
            small, cofactor = job.result
            self.factors.update(small)
            self._add(cofactor, 1)
        elif job.name.startswith("prove"):
            x, prime = job.result
            entry = self.composites.get(x)
            if entry is not None and prime:
                del self.composites[x]
                self.factors[x] += entry["k"]
            elif entry is not None:
                entry["state"] = "composite"
        else:
            m, factor, ran = job.result
            self.curves_run += ran
            if factor and m in self.composites:
                k = self.composites.pop(m)["k"]
                self._add(factor, k)
                self._add(m // factor, k)
        if self.sent_trial and not self.composites and not self.done:
            self.result = dict(sorted(self.factors.items()))
            self.done = True

    def _add(self, x: int, k: int) -> None:
        """Record the factor `x` (with multiplicity k): prime, or a composite to split further."""
        if x == 1:
            return
        root, power = perfect_power(x)
        if power > 1:
            return self._add(root, k * power)
        for c in list(self.composites):
            g = math.gcd(x, c)
            if g == 1 or g == x == c:
                continue
            kc = self.composites.pop(c)["k"]
            self._add(g, kc)
            self._add(c // g, kc)
            self._add(g, k)
            self._add(x // g, k)
            return
        if x in self.composites:
            self.composites[x]["k"] += k
        elif x < MR_EXACT_BELOW and _miller_rabin(x):
            self.factors[x] += k
        else:
            # A probable prime still needs its proof (a job); a Miller-Rabin witness is final.
            state = "unproven" if _miller_rabin(x) else "composite"
            self.composites[x] = {"k": k, "level": 0, "scheduled": 0, "state": state}
