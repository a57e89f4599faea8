"""The Job description and the status lifecycle."""
from __future__ import annotations

import cloudpickle
import pytest

from dsage.job import BadTransition, Job, check_transition


def test_code_job_to_wire():
    """A code job travels as UTF-8 with its options."""
    wire = Job(code="x = 1\nx + 1", timeout=5, priority=1, max_failures=2, files={"a.txt": "hi"}).to_wire()
    assert wire["kind"] == "code" and wire["payload"] == b"x = 1\nx + 1"
    assert (wire["timeout"], wire["priority"], wire["max_failures"]) == (5.0, 1, 2)
    assert wire["files"] == {"a.txt": b"hi"} and wire["name"] == "x = 1"


def test_callable_job_pickles_closures():
    """A callable with its arguments is pickled with cloudpickle."""
    k = 3
    wire = Job(func=lambda x, y=0: x * k + y, args=(2,), kwargs={"y": 1}).to_wire()
    func, args, kwargs = cloudpickle.loads(wire["payload"])
    assert wire["kind"] == "callable" and func(*args, **kwargs) == 7


@pytest.mark.parametrize("kw", [{}, {"code": "1", "func": print}, {"code": "1", "timeout": 0},
                                {"code": "1", "max_failures": 0}, {"func": 3}, {"code": b"1"}])
def test_invalid_jobs_are_refused(kw):
    """A Job needs exactly one of code or a callable, and sane options."""
    with pytest.raises((ValueError, TypeError)):
        Job(**kw)


def test_transitions():
    """Only the lifecycle's transitions are allowed."""
    check_transition("new", "processing")
    check_transition("processing", "new")
    check_transition("completed", "new")
    for old, new in [("new", "completed"), ("killed", "processing"), ("failed", "completed")]:
        with pytest.raises(BadTransition):
            check_transition(old, new)
