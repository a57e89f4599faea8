"""What users read when a job fails."""
from dsage.errors import JobFailed


def test_job_failed_names_the_exception_then_gives_the_traceback():
    """The headline is the traceback's last line; a one-line error is not said twice."""
    tb = 'Traceback (most recent call last):\n  File "<job>", line 1, in <module>\nValueError: bad input\n'
    e = JobFailed(7, tb)
    assert str(e) == f"job 7 failed: ValueError: bad input\n{tb}" and e.traceback == tb
    died = "dsage: the job's process died: signal 11 (SIGSEGV) without reporting an outcome"
    assert str(JobFailed(8, died)) == f"job 8 failed: {died}"
    assert str(JobFailed(9, None)) == "job 9 failed: (no traceback)"
