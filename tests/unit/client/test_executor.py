"""An executor Future's cancel() against the push of its own kill (the race of the two)."""
from __future__ import annotations

import concurrent.futures

from dsage.client import executor


class Handle:
    job_id = 7

    class dsage:
        @staticmethod
        def _call(verb, **args):
            """The session's request, asked again through reconnections (`retrying`)."""
            assert (verb, args) == ("kill", {"job_id": 7, "queued_only": True})
            return {"status": "killed"}


def test_cancel_wins_over_its_own_kill_pushed_meanwhile(monkeypatch):
    """The server pushes the end of a job that cancel() killed right after its reply; when
    that push is handled between cancel()'s reply and its cancelling the Future, the Future
    is still cancelled (it used to end with JobKilled, and cancel() returned False)."""
    future = executor.JobFuture(Handle())
    cancel = concurrent.futures.Future.cancel

    def pushed_first(self):
        self.finished({"job_id": 7, "status": "killed"})     # the reactor's thread, just then
        return cancel(self)
    monkeypatch.setattr(concurrent.futures.Future, "cancel", pushed_first)
    assert future.cancel() is True
    assert future.cancelled() and future.done()


def test_a_kill_by_someone_else_is_the_futures_end():
    """A job killed by another (its end pushed with no cancel() under way) ends the Future
    with JobKilled, and a later cancel() says it was not cancelled."""
    from dsage import errors

    future = executor.JobFuture(Handle())
    future.finished({"job_id": 7, "status": "killed"})
    assert isinstance(future.exception(timeout=0), errors.JobKilled)
    assert future.cancel() is False and not future.cancelled()


def test_cancel_all_sends_the_kills_together_and_asks_again_for_one_lost_with_the_link():
    """`cancel_all` (a map given up, shutdown(cancel_futures=True)) sends every kill before
    any answer; a kill that was killed is cancelled, one that found the job started is not,
    and one lost with the link is asked again through the session's retrying call."""
    from twisted.internet import defer

    from dsage import errors

    sent, answers = [], {}

    class Session:
        class client:
            @staticmethod
            def kill(job_id, queued_only):
                assert queued_only
                sent.append(job_id)
                answers[job_id] = defer.Deferred()
                if len(sent) == 4:                  # every kill is out: answer them now
                    answers[1].callback({"status": "killed"})
                    answers[2].callback({"status": "processing"})
                    answers[3].errback(errors.ConnectionLost("link lost"))
                    answers[4].errback(errors.RemoteError("no job 4"))
                return answers[job_id]

        @staticmethod
        def _call(verb, **args):
            assert (verb, args) == ("kill", {"job_id": 3, "queued_only": True})
            return {"status": "killed"}

    def handle(job_id):
        return type("Handle", (), {"job_id": job_id, "dsage": Session})()
    futures = [executor.JobFuture(handle(i)) for i in (1, 2, 3, 4)]
    done = executor.JobFuture(handle(5))
    done.set_result(5)
    executor.cancel_all(Session, futures + [done])
    assert sent == [1, 2, 3, 4]
    assert [f.cancelled() for f in futures + [done]] == [True, False, True, False, False]
