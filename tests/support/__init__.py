"""Helpers shared by the tests."""
import signal


def interruptible() -> None:
    """In a test's child process before exec: Ctrl-C (SIGINT) as in a terminal, also when the
    suite itself was started with SIGINT ignored (in the background of a shell script)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
