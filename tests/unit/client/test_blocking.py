"""The blocking client's retries, on the client's real reactor thread."""
from __future__ import annotations

import logging

import pytest
from twisted.internet import defer

from dsage import errors
from dsage.client import blocking
from dsage.client.blocking import retrying


def test_a_call_that_waited_for_a_lost_server_says_so(caplog, monkeypatch):
    """After the server went away, a call that runs out of time is ConnectionLost naming the
    whole wait (not 'no answer within' what was left of it), and the wait was announced."""
    monkeypatch.setattr(blocking, "_last_warning", float("-inf"))     # not warned in the last 30 s
    attempts = []

    def call():
        attempts.append(1)
        if len(attempts) == 1:
            return defer.fail(errors.ConnectionLost("the dsage server at lab:8081 is unreachable: refused"))
        return defer.Deferred()            # reconnecting: no answer
    with caplog.at_level(logging.WARNING, logger="dsage"):
        with pytest.raises(errors.ConnectionLost, match=r"^the dsage server at lab:8081 is unreachable: "
                                                        r"refused \(tried again for 1 s\)$"):
            retrying(call, timeout=1)
    assert len(attempts) == 2
    assert "unreachable: refused; waiting for up to 1 s" in caplog.text


def test_a_call_without_an_answer_is_a_timeout():
    """A server that is there but does not answer in time: TimeoutError with the timeout given."""
    with pytest.raises(TimeoutError, match=r"^no answer within 0.3 s$"):
        retrying(defer.Deferred, timeout=0.3)
