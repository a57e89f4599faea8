"""DistributedPOVRay: a POV-Ray scene rendered in strips of rows, one job per strip (the
scene travels as a job file), stitched by the client into one PNG identical to a
single-process render with the same options.

Anti-aliasing uses POV-Ray's adaptive method 2 without jitter (+AM2 -J): with it each
pixel depends only on the scene, so strips rendered apart join without a seam.  The
workers need POV-Ray (the `povray` command, Debian package povray)."""
from __future__ import annotations

import io
import os
import shutil
import subprocess
from pathlib import Path

from dsage import errors
from dsage.client.distributed import DistributedFunction
from dsage.job import Job

#: the scene shipped with dsage.
SCENE = Path(__file__).with_name("scene.pov")
DEFAULT_OPTIONS = ("+A0.3", "+AM2", "-J")


def povray_command(scene: str, output: str, width: int, height: int, first: int, last: int,
                   options: tuple[str, ...] = DEFAULT_OPTIONS) -> list[str]:
    """The povray command line rendering rows first..last (1-based, inclusive) to a PNG."""
    povray = shutil.which("povray")
    if povray is None:
        raise RuntimeError("POV-Ray is not installed on this worker: the `povray` command is missing "
                           "(Debian package povray)")
    return [povray, f"+I{scene}", f"+O{output}", f"+W{width}", f"+H{height}", f"+SR{first}", f"+ER{last}",
            "-D", "+FN", "-GA", "-V", *options]


def render_strip(index: int, width: int, height: int, first: int, last: int,
                 options: tuple[str, ...] = DEFAULT_OPTIONS) -> tuple[int, bytes]:
    """One job: render rows first..last of scene.pov (in the job's folder); (index, PNG of the strip)."""
    from PIL import Image

    command = povray_command("scene.pov", "strip.png", width, height, first, last, options)
    out = subprocess.run(command, capture_output=True, text=True)
    if out.returncode != 0 or not os.path.exists("strip.png"):
        tail = " / ".join(line.strip() for line in (out.stderr or out.stdout).strip().splitlines()[-4:])
        raise RuntimeError(f"povray failed with status {out.returncode}: {tail}")
    with Image.open("strip.png") as image:
        strip = image.convert("RGB").crop((0, first - 1, width, last))
        buffer = io.BytesIO()
        strip.save(buffer, "PNG")
    return index, buffer.getvalue()


def row_ranges(height: int, splits: int) -> list[tuple[int, int]]:
    """`splits` nearly equal ranges of rows (1-based, inclusive) covering the image."""
    splits = max(1, min(splits, height))
    bounds = [round(i * height / splits) for i in range(splits + 1)]
    return [(bounds[i] + 1, bounds[i + 1]) for i in range(splits)]


class DistributedPOVRay(DistributedFunction):
    """Render `scene_file` at width x height in `splits` strips; `result` is the PNG's path."""

    def __init__(self, D, scene_file: str | os.PathLike = SCENE, width: int = 320, height: int = 240,
                 splits: int = 8, output: str | os.PathLike | None = None,
                 options: tuple[str, ...] = DEFAULT_OPTIONS, name: str | None = None) -> None:
        if width < 1 or height < 1 or splits < 1:
            raise ValueError("width, height and splits must be positive")
        scene = Path(scene_file)
        try:
            self.scene = scene.read_bytes()
        except OSError as e:
            raise ValueError(f"cannot read the scene {scene}: {e.strerror}") from None
        super().__init__(D, name=name)
        self.width, self.height, self.options = width, height, tuple(options)
        self.output = str(Path(output) if output else Path.cwd() / (scene.stem + ".png"))
        self.ranges = row_ranges(height, splits)
        self.strips: dict[int, bytes] = {}
        self._next = 0

    def next_job(self) -> Job | None:
        if self._next >= len(self.ranges):
            return None
        i = self._next
        self._next += 1
        first, last = self.ranges[i]
        return Job(func=render_strip, args=(i, self.width, self.height, first, last, self.options),
                   files={"scene.pov": self.scene}, name=f"rows {first}-{last}")

    def process_result(self, job) -> None:
        if job.status != "completed":
            error = (job.error or "").strip().splitlines()[-1:] or ["failed"]
            raise errors.DsageError(f"{self.name}: strip {job.name} {job.status}: {error[0]}")
        index, png = job.result
        self.strips[index] = png
        if len(self.strips) == len(self.ranges):
            self.result = self.stitch()
            self.done = True

    def stitch(self) -> str:
        """Join the strips into one PNG at `output`; its path."""
        from PIL import Image

        image = Image.new("RGB", (self.width, self.height))
        for index, (first, _) in enumerate(self.ranges):
            with Image.open(io.BytesIO(self.strips[index])) as strip:
                image.paste(strip, (0, first - 1))
        Path(self.output).parent.mkdir(parents=True, exist_ok=True)
        image.save(self.output, "PNG")
        return self.output
