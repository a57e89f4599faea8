"""Where the daemons' log goes: stderr, or a file rotated by size and reopened on SIGHUP;
Python's `logging` (ZODB's) routed into Twisted's log."""
from __future__ import annotations

import os
import signal
import sys

#: a log file is rotated when it reaches this size (the newest old one is FILE.1) ...
LOG_ROTATE_BYTES = 10 << 20
#: ... and this many old ones are kept.
LOG_KEEP = 5


def rotating_file(path: str):
    """The log file at `path`, appended to, rotated by size (`LOG_ROTATE_BYTES`, keeping
    `LOG_KEEP`), and reopened on SIGHUP (for logrotate and the like, which move it away)."""
    from twisted.python.logfile import LogFile

    stream = LogFile.fromFullPath(os.path.abspath(path), rotateLength=LOG_ROTATE_BYTES, maxRotatedFiles=LOG_KEEP)

    def reopen(*_) -> None:
        from twisted.internet import reactor

        reactor.callFromThread(stream.reopen)      # not in the middle of a write
    signal.signal(signal.SIGHUP, reopen)
    return stream


def start_logging(log_file: str | None = None) -> None:
    """Twisted's log to stderr (or a file), with Python's `logging` (ZODB's) routed into it."""
    import logging

    from twisted.logger import (FilteringLogObserver, LogLevel, LogLevelFilterPredicate, Logger,
                                globalLogBeginner, textFileLogObserver)

    try:
        stream = rotating_file(log_file) if log_file else sys.stderr
    except OSError as e:
        raise ValueError(f"cannot write the log file {log_file}: {e.strerror or e}") from None
    try:
        level = LogLevel.levelWithName(os.environ.get("DSAGE_LOG_LEVEL", "info").lower())
    except Exception:
        level = LogLevel.info
    observer = FilteringLogObserver(textFileLogObserver(stream), [LogLevelFilterPredicate(level)])
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)
    levels = {logging.DEBUG: LogLevel.debug, logging.INFO: LogLevel.info, logging.WARNING: LogLevel.warn,
              logging.ERROR: LogLevel.error, logging.CRITICAL: LogLevel.critical}

    class ToTwisted(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            level = levels.get(record.levelno, LogLevel.info)
            Logger(namespace=record.name).emit(level, "{message}", message=record.getMessage())

    logging.getLogger().addHandler(ToTwisted())
    logging.getLogger().setLevel(logging.INFO)
