"""DistributedPOVRay: strips rendered on workers, stitched into the same image as one render."""
from __future__ import annotations

import shutil
import subprocess

import pytest
from PIL import Image, ImageChops

import dsage
from dsage.examples.povray import SCENE, DistributedPOVRay, povray_command, row_ranges


def test_row_ranges_cover_the_image():
    """Strips are contiguous, cover every row once and are nearly equal."""
    ranges = row_ranges(100, 7)
    assert ranges[0][0] == 1 and ranges[-1][1] == 100
    assert all(b[0] == a[1] + 1 for a, b in zip(ranges, ranges[1:]))
    assert row_ranges(3, 10) == [(1, 1), (2, 2), (3, 3)]


@pytest.mark.skipif(shutil.which("povray") is None, reason="POV-Ray could not be installed here (make system)")
def test_stitched_render_equals_a_single_render(cluster, D, tmp_path):
    """The stitched PNG has exactly the pixels of a one-process render of the scene."""
    out = tmp_path / "distributed.png"
    f = DistributedPOVRay(D, SCENE, 160, 120, 5, output=out)
    assert f.start().wait(timeout=300) == str(out)
    single = tmp_path / "single.png"
    cmd = povray_command(str(SCENE), str(single), 160, 120, 1, 120)
    subprocess.run(cmd, check=True, capture_output=True)
    with Image.open(out) as a, Image.open(single) as b:
        assert a.size == (160, 120)
        assert ImageChops.difference(a.convert("RGB"), b.convert("RGB")).getbbox() is None
    assert len(f.processed_jobs) == 5


def test_a_broken_scene_fails_clearly(cluster, D, tmp_path):
    """A scene POV-Ray cannot parse fails the function with POV-Ray's message."""
    bad = tmp_path / "bad.pov"
    bad.write_text("sphere { <0, 0, 0> 1 pigment { colour Nonsense } }\n")
    f = DistributedPOVRay(D, bad, 40, 30, 2, output=tmp_path / "bad.png")
    f.window = 1
    with pytest.raises(dsage.DsageError, match="povray failed"):
        f.start().wait(timeout=120)
