"""Pieces of the worker that need no processes: output capping and the child's code runner."""
from __future__ import annotations

from dsage.worker.child import run_code
from dsage.worker.runner import OUTPUT_MARKER, OutputBuffer


def test_output_keeps_head_and_tail():
    """Past the limit the middle is dropped and marked."""
    buf = OutputBuffer(100)
    buf.write(b"H" * 60)
    for _ in range(100):
        buf.write(b"m" * 10)
    buf.write(b"T" * 50)
    text = buf.text()
    assert text.startswith("H" * 50) and text.endswith("T" * 50)
    assert OUTPUT_MARKER.decode() in text and buf.dropped > 0


def test_small_output_is_kept_whole():
    """Under the limit nothing is dropped or marked."""
    buf = OutputBuffer(100)
    buf.write("héllo\n".encode())
    assert buf.text() == "héllo\n"


def test_code_result_is_last_expression_or_dsage_result():
    """The value of the last expression, unless DSAGE_RESULT is set."""
    assert run_code("x = 2\nx ** 10") == 1024
    assert run_code("DSAGE_RESULT = 'set'\n1 + 1") == "set"
    assert run_code("y = 1") is None
    assert run_code("def f(n):\n    return n + 1\nf(4)") == 5
