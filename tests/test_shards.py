"""output.layout webdataset and parquet: the restored images in shards, read back by tarfile,
WebDataset, Ray Data and pyarrow; each row names its shard and member; orphans are counted."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from jobs import report, restore
from pipeline.restore import shard_stream, shards
from pipeline.restore.blocks import to_table
from pipeline.restore.ledger import latest_per_item, read_metrics
from pipeline.restore.stages import ENCODED_SCHEMA, StageContext

from .conftest import make_image

CHECKPOINT = Path(__file__).resolve().parents[1] / "checkpoints" / "mimo-unet-thumb-x2.pt"
IDS = ["a", "b.v2", "dir/c", "100%", "e", "f", "g"]  # a dot and a % in ids, a folder


def _run(tmp_path: Path, layout: str, *extra: str, status: int = 0) -> Path:
    inputs, out = tmp_path / "in", tmp_path / f"out-{layout}"
    if "--output" in extra:
        out = Path(extra[extra.index("--output") + 1])
    for i, image_id in enumerate(IDS):
        if not (inputs / f"{image_id}.png").exists():
            make_image(inputs / f"{image_id}.png", (20 + 2 * (i % 2), 16), seed=i)
    assert restore.main(["--manifest", str(inputs), "--output", str(out), "--checkpoint",
                         str(CHECKPOINT), "--device", "cpu", "--engine", "local",
                         "--layout", layout, "--images-per-shard", "3", *extra]) == status
    return out


def _same_pixels(a: bytes, b: bytes) -> bool:
    """The same image (each output's XMP names its own run, so the bytes differ)."""
    return np.array_equal(np.asarray(Image.open(io.BytesIO(a))),
                          np.asarray(Image.open(io.BytesIO(b))))


def _rows(out: Path) -> dict:
    return {r["id"]: r for r in latest_per_item(read_metrics(str(out / "metrics"))).to_pylist()}


def test_webdataset_shards_hold_every_image_and_its_metrics(tmp_path):
    files = _rows(_run(tmp_path, "files"))
    out = _run(tmp_path, "webdataset")
    rows = _rows(out)
    shard_files = sorted((out / "shards").glob("*.tar"))
    assert len(shard_files) == 3  # 7 images, 3 a shard
    assert not (out / "images").exists()
    members = {}
    for path in shard_files:
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                members[path, member.name] = tar.extractfile(member).read()
    assert len(members) == 2 * len(IDS)  # the image and its JSON, per sample
    for image_id, row in rows.items():
        assert row["status"] == "ok"
        shard = Path(row["output_uri"])
        assert shard in shard_files and row["output_member"].endswith(".png")
        key = row["output_member"][:-len(".png")]
        assert "." not in key.rsplit("/", 1)[-1]  # WebDataset splits a name at its first dot
        data = members[shard, row["output_member"]]
        assert data == shards.read_output(row)  # the ranged read of its offset
        assert len(data) == row["bytes_out"]
        # the same pixels as the files layout wrote, and its metrics beside it
        assert _same_pixels(data, Path(files[image_id]["output_uri"]).read_bytes())
        sample = json.loads(members[shard, f"{key}.metrics.json"])
        assert sample["id"] == image_id and sample["lapvar_out"] == row["lapvar_out"]

    import webdataset as wds

    samples = list(wds.WebDataset([str(p) for p in shard_files], shardshuffle=False))
    assert sorted(json.loads(s["metrics.json"])["id"] for s in samples) == sorted(IDS)
    for s in samples:
        image_id = json.loads(s["metrics.json"])["id"]
        assert _same_pixels(s["png"], Path(files[image_id]["output_uri"]).read_bytes())


def test_ray_data_reads_the_webdataset_shards(ray_cluster, tmp_path):
    import ray

    out = _run(tmp_path, "webdataset")
    samples = ray.data.read_webdataset(str(out / "shards"), decoder=None).take_all()
    assert sorted(json.loads(s["metrics.json"])["id"] for s in samples) == sorted(IDS)
    assert all(Image.open(io.BytesIO(s["png"])).size[1] == 32 for s in samples)


def test_parquet_shards_hold_every_image_as_hugging_face_does(tmp_path):
    files = _rows(_run(tmp_path, "files"))
    out = _run(tmp_path, "parquet")
    rows = _rows(out)
    table = pq.read_table(out / "shards")
    assert table.num_rows == len(IDS) and len(list((out / "shards").glob("*.parquet"))) == 3
    assert table.schema.field("image").type.names == ["bytes", "path"]
    by_id = {r["id"]: r for r in table.to_pylist()}
    for image_id, row in rows.items():
        assert row["output_member"] == by_id[image_id]["__key__"]
        data = by_id[image_id]["image"]["bytes"]
        assert data == shards.read_output(row)
        assert _same_pixels(data, Path(files[image_id]["output_uri"]).read_bytes())
        assert json.loads(by_id[image_id]["json"])["source_uri"] == row["source_uri"]


def test_a_rerun_skips_what_the_shards_hold_and_orphans_are_counted_and_removed(tmp_path,
                                                                              capsys):
    out = _run(tmp_path, "webdataset")
    committed = sorted((out / "shards").glob("*.tar"))
    # A shard a killed run left: published, but named by no ledger row.
    stray = out / "shards" / "20261206T000000-000000-000000000000-deadbeef.tar"
    stray.write_bytes(committed[0].read_bytes())
    assert _run(tmp_path, "webdataset") == out
    assert "0 of 7 rows to do" in capsys.readouterr().out
    assert report.main([str(out)]) == 0
    said = capsys.readouterr().out
    assert f"orphaned shards: 1, {stray.stat().st_size:,} bytes" in said
    assert "--remove-orphans" in said
    assert report.main([str(out), "--remove-orphans"]) == 0
    assert "removed 1 orphaned shard(s)" in capsys.readouterr().out
    assert not stray.exists() and sorted((out / "shards").glob("*.tar")) == committed
    assert all(shards.read_output(row) for row in _rows(out).values())


def test_a_shard_that_cannot_be_written_fails_its_rows_and_leaves_nothing(tmp_path):
    out = tmp_path / "out"
    uri = shards.shard_uri(str(out), "webdataset", "r", 0)
    with pytest.raises(RuntimeError):
        with shards.ShardWriter(uri, "webdataset") as shard:
            shard.add("x", ".png", b"\x89PNG", {"id": "x"})
            raise RuntimeError("the encoder broke")
    assert list((out / "shards").iterdir()) == []  # no partial shard, no temporary file
    (out / "shards").rmdir()
    (out / "shards").write_text("a file where the shards go")
    assert _run(tmp_path, "webdataset", "--output", str(out), status=3) == out
    rows = _rows(out)
    assert {r["status"] for r in rows.values()} == {"error"}
    assert all(r["error"].startswith("write: ") for r in rows.values())


def test_a_killed_writers_unfinished_upload_is_counted_and_aborted(tmp_path, s3, capsys):
    """A shard over one upload part, its writer killed: its parts stay on S3, billed, in no
    listing; the report counts them and --remove-orphans aborts the upload."""
    import subprocess
    import sys

    options, bucket = s3
    endpoint = options["s3"]["client_kwargs"]["endpoint_url"]
    out = f"s3://{bucket}/out"
    config = tmp_path / "job.yaml"
    make_image(tmp_path / "in" / "a.png", (20, 16), seed=0)
    config.write_text(f"input: {{manifest: '{tmp_path / 'in'}'}}\n"
                      f"output: {{uri: '{out}', layout: webdataset}}\n"
                      f"model: {{checkpoint: '{CHECKPOINT}'}}\n"
                      f"storage: {{endpoint_url: '{endpoint}'}}\n")
    assert restore.main(["--config", str(config), "--engine", "local", "--device", "cpu"]) == 0
    killed = (
        "import os, sys\nfrom pipeline.restore import shards\n"
        f"options = {options!r}\n"
        f"uri = shards.shard_uri({out!r}, 'webdataset', 'r', 0)\n"
        "writer = shards.ShardWriter(uri, 'webdataset', options)\n"
        "writer.add('big', '.png', os.urandom(3 * shards.UPLOAD_PART // 2), {})\n"
        "writer.stream.flush()\n"
        "os._exit(9)  # killed: neither completed nor aborted\n")
    run = subprocess.run([sys.executable, "-c", killed], cwd=Path(__file__).parents[1],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 9, run.stderr
    [(path, _, size)] = shards.unfinished_uploads(out, options)
    assert path.startswith(f"{bucket}/out/shards/") and size >= shards.UPLOAD_PART
    assert path not in {p for p, _ in shards.orphans(out, set(), options)}  # nor any listing

    assert report.main([out, "--config", str(config)]) == 0
    assert f"unfinished shard uploads: 1, {size:,} bytes" in capsys.readouterr().out
    assert report.main([out, "--config", str(config), "--remove-orphans"]) == 0
    assert "aborted 1 unfinished shard upload(s)" in capsys.readouterr().out
    assert shards.unfinished_uploads(out, options) == []


def test_tar_member_offsets_hold_for_long_and_non_ascii_names(tmp_path):
    uri = str(tmp_path / "s.tar")
    names = ["short", "x" * 150, "dir/ünïcode name", "y/" * 60 + "deep"]
    data = {n: np.random.default_rng(i).bytes(100 + 700 * i) for i, n in enumerate(names)}
    placed = {}
    with shards.ShardWriter(uri, "webdataset") as shard:
        for n in names:
            placed[n] = shard.add(n, ".bin", data[n], {"id": n})
        shard.commit()
    raw = Path(uri).read_bytes()
    for n, (member, offset) in placed.items():
        assert raw[offset:offset + len(data[n])] == data[n]
        assert shards.read_member(uri, member, offset, len(data[n])) == data[n]


def test_the_ray_engine_writes_shards_of_images_per_shard(ray_cluster, tmp_path):
    """Through Ray Data: shard inputs in, blocks of 4 rows (rows_per_block auto on a CPU) cut
    into shards of images_per_shard by the writers; every row names a member its shard
    holds."""
    from .test_shard_input import _sample, write_shard

    shard = write_shard(tmp_path / "shards" / "00000.tar",
                        [_sample(i, tmp_path) for i in range(7)])
    out = tmp_path / "out"
    assert restore.main(["--manifest", str(shard), "--output", str(out), "--checkpoint",
                         str(CHECKPOINT), "--device", "cpu", "--engine", "ray", "--layout",
                         "webdataset", "--images-per-shard", "3"]) == 0
    rows = _rows(out)
    assert sorted(rows) == [f"{i:09d}" for i in range(7)]
    written = sorted((out / "shards").glob("*.tar"))
    names = {}
    for path in written:
        with tarfile.open(path) as tar:
            names[str(path)] = {m.name for m in tar.getmembers()}
    assert sorted(len([n for n in v if n.endswith(".png")]) for v in names.values()) == [1, 3, 3]
    for row in rows.values():
        assert row["status"] == "ok" and row["output_member"] in names[row["output_uri"]]
        assert f"{row['id']}.txt" in names[row["output_uri"]]  # carried through Ray too
        assert shards.read_output(row)[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_shard_is_written_a_block_at_a_time_and_published_whole(tmp_path):
    """No task holds a shard's images: each block's images are in the shard's temporary file
    before the next block is taken, and the shard appears under its name only when full."""
    ctx = StageContext(output_uri=str(tmp_path / "out"), model="m", checkpoint_sha256=None,
                       run_id="r", layout="webdataset")
    folder = tmp_path / "out" / "shards"
    rng = np.random.default_rng(0)
    images = [rng.bytes(50_000) for _ in range(10)]
    seen = []

    def blocks():
        for start in range(0, 10, 3):  # blocks of 3 rows into shards of 4 images
            seen.append((sum(p.stat().st_size for p in folder.glob(".tmp-*")),
                         len(list(folder.glob("*.tar")))) if folder.exists() else (0, 0))
            yield to_table([{"row": i, "id": f"i{i}", "status": "ok", "encoded": images[i],
                             "write_s": 0.0, "bytes_out": len(images[i]),
                             "members": [("txt", b"caption")]}
                            for i in range(start, min(start + 3, 10))], ENCODED_SCHEMA)

    rows = shard_stream.write(blocks(), ctx, per_shard=4).to_pylist()
    # Before each block: the images taken so far, written, of the shard still open.
    assert [published for _, published in seen] == [0, 0, 1, 2]
    assert [taken for taken, _ in seen][1:3] == [pytest.approx(3 * 50_000, rel=0.1),
                                                 pytest.approx(2 * 50_000, rel=0.1)]
    assert [r["row"] for r in rows] == list(range(10))
    written = sorted(folder.glob("*.tar"))
    assert len(written) == 3 and not list(folder.glob(".tmp-*"))
    for row in rows:
        assert shards.read_output(row) == images[row["row"]]
    with tarfile.open(written[-1]) as tar:  # the last two, with their carried captions
        assert sorted(m.name for m in tar.getmembers()) == [
            "i8.metrics.json", "i8.png", "i8.txt", "i9.metrics.json", "i9.png", "i9.txt"]


def test_key_spread_puts_keys_under_hashed_prefixes(tmp_path, capsys):
    import hashlib
    import re

    out = tmp_path / "spread"
    config = tmp_path / "spread.yaml"
    config.write_text("output: {key_spread: 2}\n")
    _run(tmp_path, "files", "--output", str(out), "--config", str(config))
    for image_id, row in _rows(out).items():
        spread = hashlib.sha256(image_id.encode()).hexdigest()[:2]
        assert row["output_uri"] == str(out / "images" / spread / f"{image_id}.png")
        assert Path(row["output_uri"]).exists()
    out = tmp_path / "spread-shards"
    _run(tmp_path, "webdataset", "--output", str(out), "--config", str(config))
    written = sorted((out / "shards").rglob("*.tar"))
    assert len(written) == 3 and all(re.fullmatch(r"[0-9a-f]{2}", p.parent.name)
                                     for p in written)
    stray = written[0].parent / "20261206T000000-000000-000000000000-deadbeef.tar"
    stray.write_bytes(b"left by a killed run")
    assert report.main([str(out)]) == 0
    assert "orphaned shards: 1, 20 bytes" in capsys.readouterr().out
