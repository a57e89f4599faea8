"""The reactor thread behind the blocking client (crochet's design, in a few lines).

The reactor runs in a daemon thread started on first use; blocking calls hand a function to
it with `callFromThread` and wait on a `concurrent.futures.Future` with a timeout.  A
timeout or Ctrl-C cancels the Deferred.  Safe in scripts, REPLs and Jupyter kernels (which
run asyncio in the main thread, untouched by this)."""
from __future__ import annotations

import atexit
import concurrent.futures
import os
import threading
from typing import Any, Callable

from twisted.internet import defer

from dsage import errors
from dsage.clock import steady

_lock = threading.Lock()
_thread: threading.Thread | None = None
_owner = 0          # the process whose reactor thread that is
_ending = threading.Event()     # set when the program ends (atexit)


def _reactor():
    from twisted.internet import reactor

    return reactor


def ensure_running() -> None:
    """Start the reactor thread once."""
    global _thread, _owner
    with _lock:
        if _thread is not None and _thread.is_alive():
            return
        if _thread is not None and _owner != os.getpid():
            raise errors.DsageError("this process was forked from one that used dsage, whose connections "
                                    "cannot be shared: connect in a process started afresh (multiprocessing's "
                                    "'spawn' start method, or subprocess)")
        reactor = _reactor()
        if reactor.running:
            raise errors.DsageError("a Twisted reactor already runs in this program: "
                                    "use dsage.client.connect_async instead of dsage.connect")
        steady(reactor)         # the reactor is ours: its timers on the monotonic clock
        _owner = os.getpid()
        _thread = threading.Thread(target=reactor.run, kwargs={"installSignalHandlers": False},
                                   name="dsage-reactor", daemon=True)
        _thread.start()
        atexit.register(_stop)


def _stop() -> None:
    _ending.set()
    reactor = _reactor()
    if _thread is not None and _thread.is_alive():
        reactor.callFromThread(reactor.stop)
        _thread.join(5)


def ending() -> bool:
    """True once the program is ending: its connections are closing, not lost."""
    return _ending.is_set()


def in_reactor_thread() -> bool:
    """True when called from the reactor's own thread."""
    return _thread is not None and threading.current_thread() is _thread


def call(fn: Callable[..., Any], *args: Any, timeout: float | None = None, **kw: Any) -> Any:
    """Run `fn` (which may return a Deferred) in the reactor thread and wait for its result."""
    if in_reactor_thread():
        raise errors.DsageError("blocking dsage call from the reactor thread; use the async client")
    ensure_running()
    future: concurrent.futures.Future = concurrent.futures.Future()
    holder: dict[str, defer.Deferred] = {}

    def start() -> None:
        d = defer.maybeDeferred(fn, *args, **kw)
        holder["d"] = d
        d.addCallbacks(lambda v: future.done() or future.set_result(v),
                       lambda f: future.done() or future.set_exception(f.value))

    def cancel() -> None:
        d = holder.get("d")
        if d is not None and not d.called:
            d.cancel()
        if not future.done():
            future.cancel()

    _reactor().callFromThread(start)
    try:
        return future.result(timeout)
    except concurrent.futures.TimeoutError:
        _reactor().callFromThread(cancel)
        raise TimeoutError(f"no answer within {timeout:g} s") from None
    except concurrent.futures.CancelledError:
        raise TimeoutError("the call was cancelled") from None
    except KeyboardInterrupt:
        _reactor().callFromThread(cancel)
        raise
