"""The HTML report: written by the job, self-contained, and showing its pictures and charts
when a real browser (headless Chromium) renders it."""

from __future__ import annotations

import base64
import html
import io
import os
import re
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from jobs import report, restore
from pipeline.restore import report_page

from .conftest import PHOTOS

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu",
                  "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--no-first-run", "--hide-scrollbars",
                  "--force-device-scale-factor=1"]


@pytest.fixture(scope="module")
def restored(ray_cluster, tmp_path_factory):
    """Three photographs and one broken file restored with the shipped checkpoint, the report
    written by the job itself (output.report)."""
    tmp = tmp_path_factory.mktemp("report")
    inputs = tmp / "in"
    inputs.mkdir()
    for photo in PHOTOS[:3]:
        shutil.copy(photo, inputs / photo.name)
    (inputs / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    config = tmp / "job.yaml"
    config.write_text(f"input: {{manifest: '{inputs}'}}\n"
                      f"output: {{uri: '{tmp / 'out'}', report: true}}\n")
    assert restore.main(["--config", str(config), "--device", "cpu"]) == 0
    return tmp / "out"


def test_the_job_writes_a_self_contained_page(restored):
    page = (restored / "report.html").read_text()
    # Nothing fetched from elsewhere: no scripts, no remote images, fonts or styles.
    assert "<script" not in page and "@import" not in page and "url(" not in page
    assert not re.search(r"""(src|href)\s*=\s*['"]?(https?:)?//""", page)
    images = re.findall(r"src='data:image/png;base64,", page)
    # 3 ok images in the gallery (largest gain, smallest gain, a sample): 4 pictures each.
    assert len(images) == 12
    assert "ok</td><td class=n>3</td>" in page and "error</td><td class=n>1</td>" in page
    assert "decode: ImageError" in page  # the top error reason
    # The newest run's settings and checkpoint.
    run = sorted((restored / "runs").iterdir())[-1].stem.removeprefix("run-")
    assert f"Newest run: {run}" in page and "178ff20e37d0" in page
    assert '"report": true' in html.unescape(page)


def test_report_command_writes_the_page_anywhere(restored, tmp_path, capsys):
    page = tmp_path / "elsewhere" / "page.html"
    assert report.main([str(restored), "--html", str(page)]) == 0
    assert f"report page: {page}" in capsys.readouterr().out
    assert page.read_text().count("data:image/png;base64,") == 12


def _chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if not found:
        if os.environ.get("REQUIRE_CHROMIUM"):
            pytest.fail("REQUIRE_CHROMIUM is set but no chromium is on PATH")
        pytest.skip("no chromium on PATH (Debian: apt-get install chromium); .ci/run installs it")
    return found


def _locate(shot: np.ndarray, spectrum: np.ndarray, patch: np.ndarray) -> float:
    """Mean absolute difference (0-255) of ``patch`` at its best match in ``shot``, found by
    FFT cross-correlation of the grey levels."""
    s, p = shot.mean(axis=2), patch.mean(axis=2)
    h, w = p.shape
    corr = np.fft.irfft2(spectrum * np.fft.rfft2(p[::-1, ::-1], s=s.shape), s=s.shape)
    corr = corr[h - 1:, w - 1:]
    c = np.pad((s ** 2).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    windows = c[h:, w:] - c[:-h, w:] - c[h:, :-w] + c[:-h, :-w]
    y, x = np.unravel_index(np.argmin(windows - 2 * corr), windows.shape)
    return float(np.abs(shot[y:y + h, x:x + w] - patch).mean())


def test_chromium_shows_the_pictures_and_charts(restored, tmp_path):
    binary = _chromium()
    shot_path = tmp_path / "shot.png"
    subprocess.run([binary, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}",
                    "--window-size=1280,3600", f"--screenshot={shot_path}",
                    (restored / "report.html").as_uri()],
                   check=True, capture_output=True, timeout=120)
    shot = np.asarray(Image.open(shot_path).convert("RGB")).astype(np.float64)

    # The charts: bars in each series' colour, and the stage bars.
    for colour in (report_page.BEFORE, report_page.AFTER, report_page.STAGE):
        rgb = np.array([int(colour[i:i + 2], 16) for i in (1, 3, 5)])
        assert (np.abs(shot - rgb).sum(axis=2) < 6).sum() > 300, f"no {colour} chart on screen"

    # The pictures: a piece of every inlined image is on screen, pixel for pixel.
    page = (restored / "report.html").read_text()
    spectrum = np.fft.rfft2(shot.mean(axis=2))
    for data in re.findall(r"src='data:image/png;base64,([^']+)'", page):
        img = np.asarray(Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB"))
        h, w = img.shape[:2]
        patch = img[h // 2 - 16:h // 2 + 16, w // 2 - 16:w // 2 + 16].astype(np.float64)
        assert patch.std() > 5  # a piece of a photograph, not a flat area that matches anywhere
        assert _locate(shot, spectrum, patch) < 2.0
