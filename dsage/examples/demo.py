"""`dsage demo` (what `make demo` runs): a local cluster factoring a number with
DistributedFactor, a live progress bar, the factorization printed, everything cleaned up."""
from __future__ import annotations

import time

#: 2**64 + 1 times two 13-digit primes: trial division finds 274177, the rest takes the
#: cluster a little while.
DEFAULT_NUMBER = (2**64 + 1) * 1000000000039 * 1000000000061


def run_demo(workers: int = 2, number: int | None = None) -> int:
    """Start a server and `workers` workers, factor `number`, print the result; exit code."""
    from tqdm import tqdm

    import dsage
    from dsage.examples.factor import DistributedFactor

    n = number or DEFAULT_NUMBER
    print(f"starting a local dsage cluster: 1 server, {workers} workers ...", flush=True)
    D, cluster = dsage.start_all(workers=workers)
    try:
        deadline = time.monotonic() + 30
        while len(D.workers()) < workers and time.monotonic() < deadline:
            time.sleep(0.1)
        print(f"server at {D.client.address}; factoring {n} with DistributedFactor", flush=True)
        f = DistributedFactor(D, n)
        f.start()
        with tqdm(desc="jobs done", unit="job") as bar:
            seen = 0
            while True:
                try:
                    f.wait(timeout=0.2)
                    break
                except TimeoutError:
                    pass
                finally:
                    bar.update(f.jobs_run - seen)
                    seen = f.jobs_run
                    bar.set_postfix(factors=sum(f.factors.values()), outstanding=len(f.outstanding_jobs))
        product = " * ".join(f"{p}^{e}" if e > 1 else str(p) for p, e in f.result.items())
        print(f"{n} = {product}")
        print(f"{f.jobs_run} jobs in {f.elapsed:.1f} s on {workers} workers")
        check = 1
        for p, e in f.result.items():
            check *= p ** e
        return 0 if check == n else 1
    finally:
        D.close()
        cluster.stop()
