"""What users read when a job fails."""
import pickle

import pytest

from dsage.errors import JobFailed, JobKilled, job_failed


def test_job_failed_names_the_exception_then_gives_the_traceback():
    """The headline is the traceback's last line; a one-line error is not said twice."""
    tb = 'Traceback (most recent call last):\n  File "<job>", line 1, in <module>\nValueError: bad input\n'
    e = JobFailed(7, tb)
    assert str(e) == f"job 7 failed: ValueError: bad input\n{tb}" and e.traceback == tb
    died = "dsage: the job's process died: signal 11 (SIGSEGV) without reporting an outcome"
    assert str(JobFailed(8, died)) == f"job 8 failed: {died}"
    assert str(JobFailed(9, None)) == "job 9 failed: (no traceback)"


class Mine(Exception):
    def __str__(self):
        return f"mine: {self.detail}"         # an attribute the JobFailed does not have


@pytest.mark.parametrize("exception", [ValueError("v"), KeyError("k"), FileNotFoundError(2, "gone"), Mine("m"),
                                       UnicodeDecodeError("utf-8", b"x", 0, 1, "bad")])
def test_a_job_s_exception_makes_its_jobfailed_an_instance_of_its_class(exception):
    """The JobFailed of a job whose exception came back is an instance of both classes; it
    keeps dsage's message and pickles as it is."""
    tb = f"Traceback (most recent call last):\n{type(exception).__name__}: ...\n"
    e = job_failed(3, tb, exception)
    assert isinstance(e, JobFailed) and isinstance(e, type(exception)) and e.exception is exception
    assert str(e) == str(JobFailed(3, tb)) and e.args == JobFailed(3, tb).args
    assert repr(e).startswith("JobFailed('job 3 failed")
    with pytest.raises(type(exception)):
        raise e
    again = pickle.loads(pickle.dumps(e))
    assert type(again) is type(e) and again.job_id == 3 and str(again) == str(e)


@pytest.mark.parametrize("exception", [None, SystemExit(3), KeyboardInterrupt(), ExceptionGroup("g", [ValueError()])])
def test_what_cannot_be_both_is_a_plain_jobfailed(exception):
    """No class of both for BaseExceptions outside Exception (`except Exception` must still
    catch a failure), nor where Python forbids it."""
    e = job_failed(4, "x", exception)
    assert type(e) is JobFailed and e.exception is exception


def test_jobkilled_pickles():
    again = pickle.loads(pickle.dumps(JobKilled(5)))
    assert again.job_id == 5 and str(again) == "job 5 was killed"
