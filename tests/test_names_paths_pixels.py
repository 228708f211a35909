"""No row may be misread, misfiled or silently swapped: hostile names, clashing paths, odd pixels.

The model here restores every image to its bicubic input exactly (its output convolutions are
zero), so each ``ok`` row's file can be checked against the picture of the source it names.
"""

from __future__ import annotations

import io
import json
import os
import warnings

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from jobs import report, restore
from pipeline import imaging
from pipeline.config import ConfigError, load_config
from pipeline.inference import InferenceSettings, Restorer
from pipeline.models import build_model
from pipeline.training.trainer import export, start_as_identity

from .conftest import make_image


@pytest.fixture(scope="module")
def identity_checkpoint(tmp_path_factory):
    model = build_model("mimo-unet")
    start_as_identity(model)
    path = tmp_path_factory.mktemp("identity") / "identity.pt"
    export(model, str(path), {"purpose": "tests: restores every image to its bicubic input"})
    return path


def _run(tmp_path, checkpoint, manifest, output, *extra, storage=""):
    config = tmp_path / "job.yaml"
    config.write_text(f"model: {{checkpoint: '{checkpoint}'}}\ninput: {{rows_per_block: 4}}\n"
                      + storage)
    return restore.main(["--config", str(config), "--manifest", str(manifest),
                         "--output", str(output), "--device", "cpu", *extra])


def _rows(output, options=None, source=None) -> dict:
    """The newest row per id of everything under ``{output}/metrics`` (of one source)."""
    from pipeline.restore.ledger import latest_per_item, read_metrics

    table = latest_per_item(read_metrics(f"{output}/metrics", options))
    return {r["id"]: r for r in table.to_pylist() if source in (None, r["source_uri"])}


def _reference(path) -> np.ndarray:
    """The source's picture as 8-bit RGB, converted independently of the pipeline's decoder."""
    img = Image.open(path)
    if img.mode.startswith("I;16"):
        grey = np.rint(np.asarray(img, np.float64) / 257).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if img.mode == "F":
        grey = np.rint(np.clip(np.asarray(img, np.float64), 0, 1) * 255).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    return np.asarray(img.convert("RGB"))


def assert_holds_its_source(row: dict, source_path, read=None) -> None:
    """The invariant: an ok row's output_uri is a regular file, twice its source's size,
    holding that source's picture."""
    assert row["status"] == "ok", row["error"]
    data = read(row["output_uri"]) if read else open(row["output_uri"], "rb").read()
    if not read:
        assert os.path.isfile(row["output_uri"]) and not os.path.islink(row["output_uri"])
    written = np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(int)
    source = _reference(source_path)
    assert written.shape == (2 * source.shape[0], 2 * source.shape[1], 3)
    assert np.abs(written - imaging.upscale2x(source).astype(int)).mean() < 2.0, row["id"]


def _files(root) -> set[str]:
    return {os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs}


def _distinct(path, seed, size=(20, 16)):
    """A picture unlike the others: a different size and a different colour cast."""
    return make_image(path, (size[0] + 2 * seed, size[1] + seed), seed=seed)


def test_hostile_names_land_exactly_where_their_rows_say(ray_cluster, tmp_path,
                                                         identity_checkpoint):
    src = tmp_path / "in"
    good, valid = _distinct(src / "good.png", 1), _distinct(src / "valid.webp", 2, (24, 20))
    sky = src / "sky16.png"
    Image.fromarray(np.linspace(10, 209, 32 * 24).reshape(24, 32).astype(np.uint16)).save(sky)
    flt = src / "float.tiff"
    Image.fromarray(np.linspace(0, 1, 24 * 20).reshape(20, 24).astype(np.float32)).save(flt)
    rows = [
        {"uri": "good.png", "id": "a::b"}, {"uri": "valid.webp", "id": "a::c"},
        {"uri": "good.png", "id": "::/etc/evil"},
        {"uri": "valid.webp", "id": "x.png/y"}, {"uri": "good.png", "id": "x"},
        {"uri": "sky16.png", "id": "sky"}, {"uri": "float.tiff", "id": "float"},
        {"uri": "good.png", "id": 7}, {"uri": "valid.webp", "id": 1e5},
        {"uri": "good.png", "id": "n" * 300}, {"uri": "good.png", "id": "字" * 100},
        {"uri": "valid.webp", "id": "字" * 80},
    ]
    manifest = src / "m.jsonl"
    # 1e5 as written, not as Python prints the float
    manifest.write_text("".join(json.dumps(r).replace("100000.0", "1e5") + "\n" for r in rows))
    before = _files(tmp_path)
    out = tmp_path / "out"
    assert _run(tmp_path, identity_checkpoint, manifest, out) == 0
    got = _rows(out)
    assert len(got) == len(rows)

    sources = {"a::b": good, "a::c": valid, "::/etc/evil": good, "sky": sky, "float": flt,
               "7": good, "1e5": valid, "字" * 80: valid}
    # every ok row is checked: those of sources, and the one of the file/directory pair below
    assert {i for i, r in got.items() if r["status"] == "ok"} - {"x", "x.png/y"} == set(sources)
    for image_id, path in sources.items():
        assert_holds_its_source(got[image_id], path)
        assert got[image_id]["output_uri"] == f"{out}/images/{image_id}.png"
    assert (out / "images").is_dir()
    # 16-bit and float images by their format's range: a dark sky stays dark
    assert np.asarray(Image.open(got["sky"]["output_uri"])).mean() < 2
    assert 120 < np.asarray(Image.open(got["float"]["output_uri"])).mean() < 135
    # a file and a directory cannot share a name: one of the two rows lands, the other says why
    clash = [got["x.png/y"], got["x"]]
    assert sorted(r["status"] for r in clash) == ["error", "ok"]
    assert all(r["error"].startswith("write:") for r in clash if r["status"] == "error")
    for r in clash:
        if r["status"] == "ok":
            assert_holds_its_source(r, valid if r["id"] == "x.png/y" else good)
    for long_id in ("n" * 300, "字" * 100):
        assert got[long_id]["status"] == "error"
        assert "300 bytes in UTF-8" in got[long_id]["error"]
    assert not any(".tmp-" in f for f in _files(out))
    new = _files(tmp_path) - before - {str(tmp_path / "job.yaml")}
    assert new <= _files(out)  # nothing written outside the output


def test_listed_names_are_literal_and_links_are_followed(ray_cluster, tmp_path,
                                                          identity_checkpoint):
    src = tmp_path / "in"
    make_image(src / "x", (30, 22), seed=9, fmt="PNG")  # no suffix: not listed, nor read for x::y
    chained = _distinct(src / "x::y.png", 2)
    real = _distinct(tmp_path / "elsewhere" / "linked.png", 3)
    os.symlink(tmp_path / "elsewhere", src / "link")
    os.symlink(src, src / "link" / "loop")  # a link loop must end
    out = tmp_path / "out"
    assert _run(tmp_path, identity_checkpoint, src, out) == 0
    got = _rows(out)
    assert_holds_its_source(got["x::y"], chained)
    assert_holds_its_source(got["link/linked"], real)
    assert "link/loop/x::y" not in got or got["link/loop/x::y"]["status"] == "ok"


def test_an_output_key_belongs_to_one_source(ray_cluster, tmp_path, identity_checkpoint,
                                            capsys):
    good, other = _distinct(tmp_path / "good.png", 1), _distinct(tmp_path / "multi.tiff", 4)
    m1, m2 = tmp_path / "m1.csv", tmp_path / "m2.csv"
    m1.write_text("uri, id\ngood.png,pic\n")  # a space after the comma, as people write
    m2.write_text("uri,id\nmulti.tiff,pic\n")
    out = tmp_path / "out"
    assert _run(tmp_path, identity_checkpoint, m1, out) == 0
    assert _run(tmp_path, identity_checkpoint, m2, out) == 3  # its one row is an error
    row = _rows(out, source=str(other))["pic"]
    assert row["status"] == "error"
    assert f"already holds the image restored from {good}" in row["error"]
    assert _run(tmp_path, identity_checkpoint, m2, out, "--force") == 3  # force is no override
    assert _rows(out, source=str(other))["pic"]["status"] == "error"
    capsys.readouterr()
    assert _run(tmp_path, identity_checkpoint, m1, out) == 0
    assert "0 of 1 rows to do" in capsys.readouterr().out  # done, and truly so:
    assert_holds_its_source(_rows(out, source=str(good))["pic"], good)


def test_output_inside_the_input_is_not_listed(ray_cluster, tmp_path, identity_checkpoint,
                                               capsys):
    src = tmp_path / "photos"
    _distinct(src / "a.png", 1)
    _distinct(src / "b.png", 2)
    for _ in range(2):
        assert _run(tmp_path, identity_checkpoint, src, src / "restored") == 0
    printed = capsys.readouterr().out
    assert "0 of 2 rows to do" in printed
    assert not (src / "restored" / "images" / "restored").exists()


def test_unusable_outputs_and_manifests_exit_2_before_any_work(tmp_path, identity_checkpoint,
                                                               capsys):
    _distinct(tmp_path / "good.png", 1)
    manifest = tmp_path / "m.csv"
    manifest.write_text("uri\ngood.png\n")
    (tmp_path / "taken").write_text("a file, not a directory")
    for output in (tmp_path / "taken", tmp_path / "taken" / "sub"):
        assert _run(tmp_path, identity_checkpoint, manifest, output) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "cannot be written" in err
    binary = tmp_path / "m.parquet"
    pq.write_table(pa.table({"uri": pa.array([b"good.png"], pa.binary())}), binary)
    numbers = tmp_path / "ids.parquet"
    pq.write_table(pa.table({"uri": ["good.png"], "id": [7]}), numbers)
    for bad, column in ((binary, "'uri'"), (numbers, "'id'")):
        assert _run(tmp_path, identity_checkpoint, bad, tmp_path / "out") == 2
        assert f"column {column} must hold text" in capsys.readouterr().err


def test_unusable_s3_output_exits_2(tmp_path, identity_checkpoint, s3, capsys):
    options, bucket = s3
    _distinct(tmp_path / "good.png", 1)
    manifest = tmp_path / "m.csv"
    manifest.write_text("uri\ngood.png\n")
    storage = f"storage: {{endpoint_url: '{options['s3']['client_kwargs']['endpoint_url']}'}}\n"
    assert _run(tmp_path, identity_checkpoint, manifest, "s3://no-such-bucket-here/out",
                storage=storage) == 2
    assert "cannot be written" in capsys.readouterr().err


def test_chained_names_on_s3_are_literal_keys(ray_cluster, tmp_path, identity_checkpoint, s3,
                                              capsys):
    import s3fs

    options, bucket = s3
    fs = s3fs.S3FileSystem(**options["s3"])
    good, valid = _distinct(tmp_path / "good.png", 1), _distinct(tmp_path / "v.png", 2, (24, 20))
    fs.put(str(good), f"{bucket}/in/x::y.png")
    fs.put(str(valid), f"{bucket}/in/x.png")
    storage = f"storage: {{endpoint_url: '{options['s3']['client_kwargs']['endpoint_url']}'}}\n"
    out = f"s3://{bucket}/in/restored"  # inside the input: never listed as input
    for _ in range(2):
        assert _run(tmp_path, identity_checkpoint, f"s3://{bucket}/in", out,
                    storage=storage) == 0
    assert "0 of 2 rows to do" in capsys.readouterr().out
    got = _rows(out, options)
    assert set(got) == {"x::y", "x"}
    assert got["x::y"]["output_uri"] == f"{out}/images/x::y.png"
    assert_holds_its_source(got["x::y"], good, read=lambda uri: fs.cat_file(uri))
    assert_holds_its_source(got["x"], valid, read=lambda uri: fs.cat_file(uri))


def test_report_skips_parquet_that_is_not_ours(tmp_path, capsys):
    from pipeline.restore.blocks import to_table
    from pipeline.restore.ledger import METRICS_SCHEMA

    (tmp_path / "metrics").mkdir()
    pq.write_table(pa.table({"price": [1.5, 2.5]}), tmp_path / "metrics" / "foreign.parquet")
    pq.write_table(to_table([{"row": 0, "id": "a", "source_uri": "s", "status": "ok",
                              "run_id": "r1"}], METRICS_SCHEMA),
                   tmp_path / "metrics" / "run-r1_0.parquet")
    assert report.main([str(tmp_path)]) == 0
    captured = capsys.readouterr()
    assert "ok: 1" in captured.out and "not a metrics file of this job" in captured.err


def test_config_with_a_key_given_twice_is_refused(tmp_path):
    config = tmp_path / "dup.yaml"
    config.write_text("inference:\n  batch_size: 2\ninference:\n  device: cpu\n")
    with pytest.raises(ConfigError, match="duplicate key 'inference'"):
        load_config(config)


def test_read_only_pixels_restore_without_warnings(identity_checkpoint):
    pixels = np.frombuffer(np.arange(80 * 72 * 3, dtype=np.uint8).tobytes(), np.uint8)
    img = pixels.reshape(80, 72, 3)  # read-only, as rows carry them; larger than a tile
    restorer = Restorer(build_model("mimo-unet", str(identity_checkpoint)),
                        torch.device("cpu"), InferenceSettings(tile=64, tile_overlap=8))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.testing.assert_array_equal(restorer.restore([img])[0], img)
