"""Every kind of bad or odd input ends as exactly one metrics row; the others are unaffected."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from jobs import restore

from .conftest import make_image


def _save(path, img, fmt, **kw):
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format=fmt, **kw)
    return path


def _catalog(d):
    """(id, path, expected status, expected reason or check) for each case."""
    rgb = Image.open(make_image(d / "base.png", (24, 16)))
    jpeg = io.BytesIO()
    rgb.save(jpeg, format="JPEG")
    png = io.BytesIO()
    rgb.save(png, format="PNG")
    exif = Image.Exif()
    exif[0x0112] = 6
    gif = d / "anim.gif"
    rgb.save(gif, save_all=True, append_images=[rgb.rotate(90)])

    def raw(name, data):
        (d / name).write_bytes(data)
        return d / name

    long_name = "n" * 200
    return [
        ("zero", raw("zero.png", b""), "error", "empty file"),
        ("trunc-jpeg", raw("t.jpg", jpeg.getvalue()[: len(jpeg.getvalue()) // 2]), "error",
         "decode:"),
        ("trunc-png", raw("t.png", png.getvalue()[:-40]), "error", "decode:"),
        ("random", raw("r.png", np.random.default_rng(0).bytes(4096)), "error",
         "not a recognised image"),
        ("text", raw("text.jpg", b"just some text\n"), "error", "looks like text"),
        ("html", raw("err.jpg", b"<html><body>502 Bad Gateway</body></html>"), "error",
         "HTML page"),
        ("missing", d / "missing.png", "error", "read: FileNotFoundError"),
        ("bomb", _save(d / "bomb.png", Image.new("1", (20000, 20000)), "PNG"), "error",
         "decompression bomb|above the limit"),
        ("too-many-pixels", _save(d / "big.png", Image.new("RGB", (200, 200)), "PNG"),
         "error", "above the limit of 30000"),
        ("too-many-bytes", raw("noise.png", _noise_png(120)), "error", "bytes, above the limit"),
        ("one", _save(d / "1x1.png", Image.new("RGB", (1, 1), (9, 9, 9)), "PNG"), "ok", (2, 2)),
        ("three", _save(d / "3x3.png", Image.new("RGB", (3, 3)), "PNG"), "ok", (6, 6)),
        ("sixteen", _save(d / "16.png", Image.fromarray(
            np.full((8, 8), 40000, np.uint16)), "PNG"), "ok", (16, 16)),
        ("cmyk", _save(d / "cmyk.jpg", rgb.convert("CMYK"), "JPEG"), "ok", (32, 48)),
        ("palette", _save(d / "p.png", rgb.convert("P"), "PNG"), "ok", (32, 48)),
        ("grey", _save(d / "g.png", rgb.convert("L"), "PNG"), "ok", (32, 48)),
        ("rgba", _save(d / "a.png", rgb.convert("RGBA"), "PNG"), "ok", (32, 48)),
        ("gif", gif, "ok", (32, 48)),
        ("exif", _save(d / "rot.jpg", rgb, "JPEG", exif=exif.tobytes()), "ok", (48, 32)),
        ("with space/ünï código", _save(d / "sp ace/ü.png", rgb, "PNG"), "ok", (32, 48)),
        (long_name, _save(d / f"{long_name}.png", rgb, "PNG"), "ok", (32, 48)),
        ("../escape", d / "base.png", "error", "unsafe id"),
        ("/abs", d / "base.png", "error", "unsafe id"),
        ("back\\slash", d / "base.png", "error", "unsafe id"),
        ("nul\x00byte", d / "base.png", "error", "unsafe id"),
        ("x" * 600, d / "base.png", "error", "unsafe id"),
        ("grey", d / "base.png", "error", "duplicate id 'grey'"),
    ]


def _noise_png(side):
    buf = io.BytesIO()
    noise = np.random.default_rng(1).integers(0, 256, (side, side, 3), dtype=np.uint8)
    Image.fromarray(noise).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.slow
def test_catalog_of_bad_inputs(ray_cluster, tmp_path, capsys):
    cases = _catalog(tmp_path / "in")
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps({"uri": str(p), "id": i}) + "\n"
                                for i, p, _, _ in cases))
    config = tmp_path / "job.yaml"
    config.write_text(
        f"input: {{manifest: '{manifest}', rows_per_block: 4}}\n"
        f"output: {{uri: '{tmp_path / 'out'}'}}\nmodel: {{checkpoint: null}}\n"
        "limits: {max_pixels: 30000, max_bytes: 40000, max_error_rate: 1.0}\n"
    )
    assert restore.main(["--config", str(config), "--device", "cpu"]) == 0
    table = pq.read_table(tmp_path / "out" / "metrics")
    assert sorted(table["row"].to_pylist()) == list(range(len(cases)))
    rows = {r["row"]: r for r in table.to_pylist()}
    import re

    for i, (image_id, _, status, expect) in enumerate(cases):
        row = rows[i]
        assert row["status"] == status, (image_id, row["error"])
        if status == "error":
            assert re.search(expect, row["error"]), (image_id, row["error"])
        else:
            written = Image.open(row["output_uri"])
            assert (written.height, written.width) == expect, image_id
            assert row["output_uri"].startswith(str(tmp_path / "out" / "images") + "/")
    # nothing was written outside the output's images folder
    outside = [p for p in tmp_path.rglob("*.png")
               if "out/images" not in p.as_posix() and "/in/" not in p.as_posix()]
    assert outside == []
