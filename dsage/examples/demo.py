"""`dsage demo` (what `make demo` runs): a local cluster factoring a number with
DistributedFactor, a live progress bar, the factorization printed, everything cleaned up
(on Ctrl-C too)."""
from __future__ import annotations

#: (2**64 + 1) times primes of 24, 26 and 27 digits: trial division finds 274177, ECM the
#: rest, in some tens of seconds on two workers.
DEFAULT_NUMBER = ((2**64 + 1) * 300000000000000000006827 * 50000000000000000000004373
                  * 200000000000000000000098837)


def run_demo(workers: int = 2, number: int | None = None) -> int:
    """Start a server and `workers` workers, factor `number`, print the result; exit code."""
    from tqdm import tqdm

    import dsage
    from dsage.examples.factor import DistributedFactor

    n = DEFAULT_NUMBER if number is None else number
    print(f"starting a local dsage cluster: 1 server, {workers} workers ...", flush=True)
    D, cluster = dsage.start_all(workers=workers)
    try:
        web = cluster.web_url or "-"
        print(f"server at {D.client.address} (home {cluster.home}), dashboard at {web}\nfactoring {n} ({len(str(n))} digits) "
              f"with DistributedFactor (trial division, then ECM curves on the workers)", flush=True)
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
                    bar.set_postfix(curves=f.curves_run, factors=sum(f.factors.values()),
                                    left=len(f.composites))
        product = " * ".join(f"{p}^{e}" if e > 1 else str(p) for p, e in f.result.items())
        print(f"{n} =\n  {product}")
        print(f"{f.jobs_run} jobs, {f.curves_run} ECM curves in {f.elapsed:.1f} s on {workers} workers")
        check = 1
        for p, e in f.result.items():
            check *= p ** e
        return 0 if check == n else 1
    finally:
        D.close()
        cluster.stop()
