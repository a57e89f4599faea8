"""`dsage demo` (what `make demo` runs): it factors, prints, and cleans up, on Ctrl-C too."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import time

from dsage.client.local import command
from tests.support import interruptible


def demo(*args: str) -> subprocess.Popen:
    return subprocess.Popen(command("dsage") + ["demo", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True, env=dict(os.environ, DSAGE_HOME="/nonexistent"),
                            preexec_fn=interruptible)


def processes_with(text: str) -> list[str]:
    out = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if text in line]


def test_demo_factors_and_cleans_up():
    """The demo prints the factorization and leaves no process behind."""
    n = (2**64 + 1) * 1000000007
    proc = demo("--workers", "2", "--number", str(n))
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    assert "274177 * 1000000007 * 67280421310721" in out
    assert "ECM curves" in out


def test_ctrl_c_stops_the_demo_and_its_cluster():
    """Ctrl-C ends the demo; its server and workers are stopped and its home removed."""
    proc = demo("--workers", "1")
    lines = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        lines.append(line)
        if line.startswith("factoring"):
            break
    found = re.search(r"server at (\S+) \(home (\S+)\)", "".join(lines))
    assert found, "".join(lines)
    address, home = found.group(1), found.group(2)
    assert os.path.isdir(home)
    running = processes_with("dsage_worker")
    time.sleep(1.0)
    os.killpg(proc.pid, signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, out
    assert "interrupted" in out
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and any(address in p for p in processes_with(address)):
        time.sleep(0.2)
    assert not [p for p in processes_with("dsage_worker") if p not in running or address in p]
    assert not os.path.exists(home), "the demo's temporary home is removed"
