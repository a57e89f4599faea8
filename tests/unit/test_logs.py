"""The daemons' log file: rotated by size, the number of old ones bounded."""
from __future__ import annotations

import signal

from dsage import logs


def test_the_log_file_is_rotated_by_size_keeping_log_keep_old_ones(tmp_path, monkeypatch):
    """Past LOG_ROTATE_BYTES the file becomes FILE.1 (the older ones move up) and a new one
    starts; no more than LOG_KEEP old ones stay."""
    monkeypatch.setattr(logs, "LOG_ROTATE_BYTES", 100)
    monkeypatch.setattr(logs, "LOG_KEEP", 2)
    handler = signal.getsignal(signal.SIGHUP)
    path = tmp_path / "server.log"
    try:
        stream = logs.rotating_file(str(path))
        for i in range(10):
            stream.write(f"line {i} " + "x" * 52 + "\n")
        stream.close()
    finally:
        signal.signal(signal.SIGHUP, handler)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["server.log", "server.log.1", "server.log.2"]
    assert path.read_text().startswith("line 8 ") and (tmp_path / "server.log.2").read_text().startswith("line 4 ")
