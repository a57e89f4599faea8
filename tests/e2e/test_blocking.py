"""The blocking client in the places users run it: a script interrupted with Ctrl-C, and a
program whose main thread runs an asyncio loop (as a Jupyter kernel does)."""
from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time

from tests.support import interruptible


def python(cluster, code: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env={"DSAGE_HOME": str(cluster.home), "PATH": "/usr/bin:/bin"},
                            preexec_fn=interruptible)


def test_ctrl_c_interrupts_a_wait(cluster, D):
    """SIGINT during job.wait() raises KeyboardInterrupt at once; the job is untouched."""
    proc = python(cluster, f"""
        import dsage
        D = dsage.connect({cluster.address!r})
        job = D.eval("import time\\ntime.sleep(30)")
        print(job.job_id, flush=True)
        try:
            job.wait()
        except KeyboardInterrupt:
            print("interrupted", flush=True)
    """)
    job_id = int(proc.stdout.readline())
    time.sleep(0.5)
    start = time.monotonic()
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=20)
    assert "interrupted" in out, err
    assert time.monotonic() - start < 5
    assert D.job(job_id).status in ("new", "processing")
    D.job(job_id).kill()


def test_blocking_calls_inside_a_running_asyncio_loop(cluster, D):
    """Like a notebook cell: blocking calls made while the main thread runs asyncio."""
    proc = python(cluster, f"""
        import asyncio, dsage
        async def cell():
            D = dsage.connect({cluster.address!r})
            print(D.eval("40 + 2").wait(timeout=30), flush=True)
            print([j.wait(timeout=30) for j in D.map(abs, [-1, -2])], flush=True)
        asyncio.run(cell())
    """)
    out, err = proc.communicate(timeout=60)
    assert out.split() == ["42", "[1,", "2]"], err


def test_blocking_calls_from_the_reactor_thread_are_refused(cluster, D):
    """A blocking call made inside a callback of the client's own reactor thread would wait
    for that thread: it raises at once, a map of several batches included."""
    import pytest

    from dsage import errors
    from dsage.client import reactor as rt

    def inside():
        with pytest.raises(errors.DsageError, match="reactor thread"):
            D.map(abs, range(2500))             # three batches
        with pytest.raises(errors.DsageError, match="reactor thread"):
            D.eval("1")
        return "refused"
    before = D.status()["jobs"]
    assert rt.call(inside, timeout=30) == "refused"
    assert D.status()["jobs"] == before, "nothing was submitted"


def _connect_in_child(address: str, cert: str, answers) -> None:
    import dsage

    try:
        answers.put(("ok", dsage.connect(address, cert=cert, timeout=15).eval("6 * 7").wait(timeout=30)))
    except Exception as e:
        answers.put((type(e).__name__, str(e)))


def test_a_forked_child_is_told_to_start_afresh_and_a_spawned_one_works(cluster, D):
    """A process forked after dsage was used (multiprocessing's default on Linux) cannot use
    the parent's reactor thread: it says so, naming the remedy, instead of hanging."""
    import multiprocessing

    assert D.eval("1").wait(timeout=30) == 1
    cert = str(cluster.home / "client.pem")
    for method, expected in (("fork", "DsageError"), ("spawn", "ok")):
        context = multiprocessing.get_context(method)
        answers = context.Queue()
        child = context.Process(target=_connect_in_child, args=(cluster.address, cert, answers))
        child.start()
        try:
            kind, value = answers.get(timeout=60)
        finally:
            child.join(10)
            child.kill()
        assert kind == expected, value
        assert value == 42 if method == "spawn" else "'spawn' start method" in value


def test_a_script_that_ends_while_a_function_runs_says_nothing_of_a_lost_server(cluster, D):
    """The program's end closes its connection: the function's driver, stepping at that
    moment, must not report the server as lost (and wait for it)."""
    for attempt in range(3):        # the driver steps several times a second: most ends hit one
        proc = python(cluster, f"""
            import time, dsage
            class Many(dsage.DistributedFunction):
                def next_job(self):
                    return dsage.Job(func=abs, args=(-1,))
                def process_result(self, job):
                    pass
            D = dsage.connect({cluster.address!r})
            f = Many(D, name="many-{attempt}").start()
            while len(f.processed_jobs) < 20:
                time.sleep(0.05)
            print("running", flush=True)
        """)
        out, err = proc.communicate(timeout=60)
        assert out == "running\n", err
        assert "lost" not in err and proc.returncode == 0, err
