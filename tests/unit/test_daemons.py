"""The daemons' commands, before they start anything."""
from __future__ import annotations

import os

from dsage import daemons


def test_the_daemons_refuse_in_one_line_where_they_cannot_run(monkeypatch, capsys, tmp_path):
    """On Windows the server and the worker say where they run (one line, status 1), not a
    traceback from a module only Unix has."""
    monkeypatch.setenv("DSAGE_HOME", str(tmp_path))
    monkeypatch.setattr(os, "name", "nt")
    assert daemons.server_main([]) == 1
    assert daemons.worker_main(["--cert", str(tmp_path / "w.pem")]) == 1
    lines = capsys.readouterr().err.splitlines()
    assert lines == ["dsage_server: error: the dsage server runs on Linux or another Unix (macOS), not on nt; "
                     "this machine can be a client",
                     "dsage_worker: error: a dsage worker runs on Linux or another Unix (macOS), not on nt; "
                     "this machine can be a client"]
