"""The Job description and the status lifecycle."""
from __future__ import annotations

import pathlib

import cloudpickle
import pytest

from dsage.job import BadTransition, Job, as_job, check_transition


def test_code_job_to_wire():
    """A code job travels as UTF-8 with its options."""
    wire = Job(code="x = 1\nx + 1", timeout=5, priority=1, max_failures=2, files={"a.txt": "hi"}).to_wire()
    assert wire["kind"] == "code" and wire["payload"] == b"x = 1\nx + 1"
    assert (wire["timeout"], wire["priority"], wire["max_failures"]) == (5.0, 1, 2)
    assert wire["files"] == {"a.txt": b"hi"} and wire["name"] == "x = 1"


def test_no_timeout_is_the_longest_one():
    """timeout=None asks for no limit: the longest a job may run, 30 days."""
    assert Job(code="1", timeout=None).to_wire()["timeout"] == 30 * 86400.0


def test_callable_job_pickles_closures():
    """A callable with its arguments is pickled with cloudpickle."""
    k = 3
    wire = Job(func=lambda x, y=0: x * k + y, args=(2,), kwargs={"y": 1}).to_wire()
    func, args, kwargs = cloudpickle.loads(wire["payload"])
    assert wire["kind"] == "callable" and func(*args, **kwargs) == 7


@pytest.mark.parametrize("kw", [{}, {"code": "1", "func": print}, {"code": "1", "timeout": 0},
                                {"code": "1", "max_failures": 0}, {"func": 3}, {"code": b"1"},
                                {"code": "1", "priority": "high"}, {"code": "1", "priority": 1.5},
                                {"code": "1", "priority": 10**30}, {"code": "1", "timeout": float("nan")},
                                {"code": "1", "timeout": float("inf")}, {"code": "1", "timeout": "60"},
                                {"code": "1", "max_failures": 2.5}, {"code": "1", "max_failures": 10**6},
                                {"code": "1", "files": [3]}, {"code": "1", "files": ["/no/such/file"]},
                                {"code": "1", "files": ["/a/x", "/b/x"]}, {"code": "1", "files": {"a": 5}},
                                {"code": "1", "files": {"a": None}}, {"code": "1", "files": {"": b"x"}},
                                {"code": "1", "files": {"../up": b"x"}}, {"code": "1", "files": {"/etc/x": b"x"}},
                                {"code": "1", "files": {"a//b": b"x"}}, {"code": "1", "files": {".": b"x"}}])
def test_invalid_jobs_are_refused(kw):
    """A Job needs exactly one of code or a callable, and sane options."""
    with pytest.raises((ValueError, TypeError)):
        Job(**kw)


def test_files_are_read_from_local_paths(tmp_path):
    """`files` takes {name: bytes or text}, {name: Path} or a list of local paths, each
    read now and sent under its base name."""
    (tmp_path / "a.txt").write_text("hello")
    (tmp_path / "b.bin").write_bytes(b"\0\1")
    expected = {"a.txt": b"hello", "b.bin": b"\0\1"}
    assert Job(code="1", files=[str(tmp_path / "a.txt"), tmp_path / "b.bin"]).files == expected
    assert Job(code="1", files={"a.txt": tmp_path / "a.txt", "b.bin": b"\0\1"}).files == expected
    assert Job(code="1", files=str(tmp_path / "a.txt")).files == {"a.txt": b"hello"}
    with pytest.raises(ValueError, match="cannot read the job's file .*nope: No such file"):
        Job(code="1", files={"x": pathlib.Path(tmp_path / "nope")})


def test_transitions():
    """Only the lifecycle's transitions are allowed."""
    check_transition("new", "processing")
    check_transition("processing", "new")
    check_transition("completed", "new")
    for old, new in [("new", "completed"), ("killed", "processing"), ("failed", "completed")]:
        with pytest.raises(BadTransition):
            check_transition(old, new)


def test_a_job_too_large_for_one_message_is_refused_before_it_is_sent(monkeypatch):
    """A job whose pickled call and files exceed MAX_JOB_BYTES is refused in the client, with
    the sizes, instead of being sent (the server would drop such a message)."""
    from dsage import errors, job

    monkeypatch.setattr(job, "MAX_JOB_BYTES", 1 << 20)
    assert Job(func=len, args=(bytes(1000 << 10),)).to_wire()["kind"] == "callable"
    with pytest.raises(errors.DsageError, match=r"carries 1\.1 MiB .* at most 1 MiB"):
        Job(func=len, args=(bytes(1100 << 10),)).to_wire()
    with pytest.raises(errors.DsageError, match="at most 1 MiB"):
        Job(code="1", files={"big": bytes(2 << 20)}).to_wire()


def test_submit_takes_a_call_or_one_described_job():
    """submit(f, *args) describes the call; submit(Job) takes no further arguments."""
    call = as_job(pow, (2, 5), {"mod": 3})
    assert call.func is pow and call.args == (2, 5) and call.kwargs == {"mod": 3}
    described = Job(code="1")
    assert as_job(described, (), {}) is described
    with pytest.raises(TypeError, match=r"submit\(Job\) takes no further arguments"):
        as_job(described, (5,), {})
