"""Reconnector on a Clock: it keeps trying, and says so in the log without flooding it."""
from __future__ import annotations

from twisted.internet import defer
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.logger import capturedLogs

from dsage.reconnect import Reconnector


class Refusing:
    """An endpoint whose every connection attempt is refused."""

    def __init__(self) -> None:
        self.attempts = 0

    def connect(self, factory) -> defer.Deferred:
        self.attempts += 1
        return defer.fail(ConnectionRefusedError("Connection refused"))


def test_refused_attempts_are_retried_and_logged_at_1_2_4_8():
    clock, endpoint = Clock(), Refusing()
    link = Reconnector(endpoint, Factory.forProtocol(Protocol), lambda p: defer.succeed(None), clock,
                       max_delay=1.0, address="lab1:8081")
    with capturedLogs() as events:
        link.start()
        for _ in range(100):
            clock.advance(1.5)
        link.stop()
    warned = [e for e in events if e.get("log_namespace") == "dsage.reconnect.Reconnector"]
    assert endpoint.attempts > 90
    assert [e["n"] for e in warned] == [1, 2, 4, 8, 16, 32, 64]
    assert warned[0]["address"] == "lab1:8081" and "Connection refused" in warned[0]["why"]
