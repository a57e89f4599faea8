"""DistributedFunction subclasses used by the tests (importable by client processes)."""
from __future__ import annotations

import time

import dsage


class SumOfSquares(dsage.DistributedFunction):
    """Sums k*k for k in 1..n, one code job per chunk; remembers every job it processed."""

    window = 4

    def __init__(self, D, n: int, chunk: int, name: str, delay: float = 0.0) -> None:
        super().__init__(D, name=name)
        self.n, self.chunk, self.delay = n, chunk, delay
        self.next_start = 1
        self.total = 0
        self.seen: list[int] = []

    def next_job(self):
        if self.next_start > self.n:
            return None
        a, b = self.next_start, min(self.n, self.next_start + self.chunk - 1)
        self.next_start = b + 1
        return dsage.Job(code=f"sum(k * k for k in range({a}, {b + 1}))", name=f"{a}-{b}")

    def process_result(self, job) -> None:
        time.sleep(self.delay)
        self.total += job.result
        self.seen.append(job.job_id)
        if self.next_start > self.n and not self.outstanding_jobs:
            self.result = self.total
            self.done = True
