"""The automatic prefetch: its sizing, and the order in which jobs fetched ahead run."""
from __future__ import annotations

import collections

from dsage.worker.service import MAX_AHEAD, automatic_ahead, enqueue


def test_no_prefetch_without_history_or_after_a_long_job():
    """Nothing is leased ahead before jobs were seen, or when one of them took 0.1 s or more."""
    assert automatic_ahead(2, []) == 0
    assert automatic_ahead(2, [0.001, 0.2, 0.001, 0.001]) == 0


def test_about_fifty_milliseconds_of_work_per_slot():
    """Short jobs: ~50 ms of them per slot, at least one and at most MAX_AHEAD per slot."""
    assert automatic_ahead(2, [0.01, 0.005, 0.01, 0.008]) == 2 * 5
    assert automatic_ahead(4, [0.09] * 8) == 4 * 1
    assert automatic_ahead(2, [0.0001] * 4) == 2 * MAX_AHEAD


def test_jobs_waiting_here_run_by_priority_then_in_order():
    """A job of priority 0 fetched after three of priority 9 runs first; equals keep their order."""
    queue: collections.deque = collections.deque()
    for job in ({"job_id": 1, "priority": 9}, {"job_id": 2, "priority": 9}, {"job_id": 3, "priority": 9},
                {"job_id": 4, "priority": 0}, {"job_id": 5}, {"job_id": 6, "priority": 9}):
        enqueue(queue, job)
    assert [job["job_id"] for job in queue] == [4, 5, 1, 2, 3, 6]
