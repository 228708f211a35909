"""WebDataset tar shards as input, made the way img2dataset makes them: each sample its image,
caption and JSON; bad members are error rows; a truncated shard loses only what it lacks."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from jobs import report, restore
from pipeline.restore import shard_input, shards
from pipeline.restore.ledger import latest_per_item, read_metrics

from .conftest import make_image

CHECKPOINT = Path(__file__).resolve().parents[1] / "checkpoints" / "mimo-unet-thumb-x2.pt"


def _jpeg(seed: int, tmp_path: Path) -> bytes:
    path = make_image(tmp_path / "src" / f"{seed}.jpg", (20 + seed % 3, 16), seed=seed)
    return path.read_bytes()


def write_shard(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> Path:
    """A tar of samples as img2dataset writes one: members <key>.<ext>, a sample's together."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def _sample(i: int, tmp_path: Path, image: bytes | None = None) -> tuple[str, dict]:
    key = f"{i:09d}"
    return key, {"jpg": image if image is not None else _jpeg(i, tmp_path),
                 "txt": f"caption {i}".encode(),
                 "json": json.dumps({"key": key, "url": f"http://x/{i}.jpg"}).encode()}


def _run(manifest: str, out: Path, *extra: str, status: int = 0) -> dict:
    assert restore.main(["--manifest", manifest, "--output", str(out), "--checkpoint",
                         str(CHECKPOINT), "--device", "cpu", "--engine", "local",
                         *extra]) == status
    return {r["id"]: r for r in latest_per_item(read_metrics(str(out / "metrics"))).to_pylist()}


@pytest.fixture
def two_shards(tmp_path):
    folder = tmp_path / "shards"
    first = [_sample(i, tmp_path) for i in range(5)]
    first[2] = _sample(2, tmp_path, image=b"\xff\xd8 not really a jpeg")
    second = [_sample(i, tmp_path) for i in range(5, 9)]
    second.append(("000000009", {"txt": b"a caption without its image"}))
    write_shard(folder / "00000.tar", first)
    write_shard(folder / "00001.tar", second)
    (folder / "00000.parquet").write_bytes(b"img2dataset's per-shard metadata, not a shard")
    return folder


def test_brace_ranges_expand_as_webdataset_writes_them():
    assert shard_input.expand("s3://b/s/{000..002}.tar") == [
        "s3://b/s/000.tar", "s3://b/s/001.tar", "s3://b/s/002.tar"]
    assert shard_input.expand("d/{a,b}-{8..10}.tar") == [
        "d/a-8.tar", "d/a-9.tar", "d/a-10.tar", "d/b-8.tar", "d/b-9.tar", "d/b-10.tar"]
    assert not shard_input.is_pattern("d/{literal}.tar")
    assert shard_input.split_name("./000123.seg.png") == ("000123", "seg.png")
    assert shard_input.split_name("a.b/000123.jpg") == ("a.b/000123", "jpg")


def test_blocks_of_shard_rows_read_each_shard_once_where_they_can():
    from pipeline.restore.engine import SHARD_READ_ROWS, blocks

    def cut(shard_sizes: list[int], rows_per_block: int = 4) -> list[list[str]]:
        names = [f"s{i}.tar" for i, size in enumerate(shard_sizes) for _ in range(size)]
        table = pa.table({"row": range(len(names)), "source_shard": names})
        got = blocks(table, rows_per_block)
        assert pa.concat_tables(got)["row"].to_pylist() == list(range(len(names)))
        return [sorted(set(b["source_shard"].to_pylist())) for b in got]

    # Shards of 100: two whole shards a block, one ranged read each; none split.
    assert cut([100] * 5) == [["s0.tar", "s1.tar"], ["s2.tar", "s3.tar"], ["s4.tar"]]
    # One long shard: blocks of twice SHARD_READ_ROWS, each one read.
    long = cut([5 * SHARD_READ_ROWS])
    assert len(long) == 3 and all(b == ["s0.tar"] for b in long)
    # Many small shards fill a block; files (no shard) and the retry pass keep their blocks.
    assert cut([5] * 10) == [[f"s{i}.tar" for i in range(10)]]
    files = blocks(pa.table({"row": range(10), "source_shard": pa.nulls(10, pa.string())}), 4)
    assert [b.num_rows for b in files] == [4, 4, 2]
    assert len(cut([100], rows_per_block=1)) == 100  # a row a block


def test_shards_in_and_out_carry_every_member(two_shards, tmp_path):
    out = tmp_path / "out"
    rows = _run(f"{two_shards}/{{00000..00001}}.tar", out, "--layout", "webdataset",
                status=0)
    assert sorted(rows) == [f"{i:09d}" for i in range(10)]  # one row per sample
    assert rows["000000002"]["status"] == "error"
    assert rows["000000002"]["error"].startswith("decode: ")
    assert rows["000000009"]["status"] == "error"
    assert "no image member (it has: txt)" in rows["000000009"]["error"]
    assert rows["000000000"]["source_uri"] == f"{two_shards}/00000.tar#000000000.jpg"
    [shard] = (out / "shards").glob("*.tar")
    with tarfile.open(shard) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    for i in (0, 1, 3, 4, 5, 6, 7, 8):
        key = f"{i:09d}"
        assert members[f"{key}.txt"] == f"caption {i}".encode()  # carried unchanged
        assert json.loads(members[f"{key}.json"])["url"] == f"http://x/{i}.jpg"
        assert json.loads(members[f"{key}.metrics.json"])["id"] == key
        assert Image.open(io.BytesIO(members[f"{key}.png"])).size[1] == 32
        assert shards.read_output(rows[key]) == members[f"{key}.png"]
    # The report's gallery reads both sides from shards: the restored member, the source's.
    page = tmp_path / "report.html"
    assert report.main([str(out), "--html", str(page)]) == 0
    assert "<img" in page.read_text() and "cannot show it" not in page.read_text()
    assert shard_input.read_source(rows["000000004"]["source_uri"]) == _jpeg(4, tmp_path)
    # A prefix of shards is the same input: everything is done already.
    assert len(_run(str(two_shards), out, "--layout", "webdataset")) == 10
    assert not (out / "images").exists()


def test_files_output_writes_the_carried_members_beside_each_image(two_shards, tmp_path):
    out = tmp_path / "out"
    rows = _run(str(two_shards / "00000.tar"), out)
    assert sorted(rows) == [f"{i:09d}" for i in range(5)]
    assert (out / "images" / "000000000.png").exists()
    assert (out / "images" / "000000000.txt").read_bytes() == b"caption 0"
    assert not (out / "images" / "000000002.txt").exists()  # its image failed: no copy


def test_a_truncated_shard_loses_only_what_it_does_not_hold(two_shards, tmp_path):
    whole = (two_shards / "00000.tar").read_bytes()
    samples = shard_input.index(str(two_shards / "00000.tar"))
    cut_in = samples[3].image  # the cut falls inside sample 3's image
    cut = two_shards.parent / "cut" / "cut.tar"
    cut.parent.mkdir()
    cut.write_bytes(whole[:cut_in.offset_data + cut_in.size // 2])
    rows = _run(str(cut), tmp_path / "out")  # 2 errors of 4: not above the limit of half
    assert [rows[f"{i:09d}"]["status"] for i in range(4)] == ["ok", "ok", "error", "error"]
    assert "truncated shard" in rows["000000003"]["error"]
    assert "000000004" not in rows  # not in what is left of the shard


def test_a_shard_that_is_not_a_tar_is_an_error_row(tmp_path):
    bad = tmp_path / "in" / "bad.tar"
    bad.parent.mkdir()
    bad.write_bytes(b"\x00garbage" * 100)
    rows = _run(str(bad), tmp_path / "out", status=3)
    [row] = rows.values()
    assert row["error"].startswith("manifest: cannot index shard: OSError: not a readable tar")


def _hf_parquet(path: Path, tmp_path: Path, keys: list[str], row_group_size: int = 3) -> Path:
    """Parquet as Hugging Face datasets write images: a struct of bytes and path, beside
    other columns."""
    images = [{"bytes": _jpeg(i, tmp_path), "path": f"{k}.jpg"} for i, k in enumerate(keys)]
    images[1] = {"bytes": None, "path": "lost.jpg"}
    table = pa.table({"key": keys, "image": images,
                      "caption": [f"caption {k}" for k in keys],
                      "label": list(range(len(keys)))})
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def test_a_parquet_dataset_of_images_is_restored_with_its_columns_carried(tmp_path):
    keys = [f"k{i}" for i in range(7)]
    data = _hf_parquet(tmp_path / "ds" / "train-00000-of-00001.parquet", tmp_path, keys)
    out = tmp_path / "out"
    rows = _run(str(data.parent), out, "--layout", "parquet")
    assert sorted(rows) == keys
    assert rows["k1"]["status"] == "error" and "holds no image bytes" in rows["k1"]["error"]
    assert rows["k5"]["source_uri"] == f"{data}#5"
    table = pq.read_table(out / "shards")
    by_id = {r["id"]: r for r in table.to_pylist()}
    assert sorted(by_id) == [k for k in keys if k != "k1"]
    assert dict(by_id["k6"]["members"]) == {"caption": b"caption k6", "label": b"6"}
    assert Image.open(io.BytesIO(by_id["k6"]["image"]["bytes"])).size[1] == 32
    assert shard_input.read_source(rows["k5"]["source_uri"]) == _jpeg(5, tmp_path)


def test_parquet_columns_can_be_named_and_a_wrong_name_is_an_error_row(tmp_path):
    data = _hf_parquet(tmp_path / "one.parquet", tmp_path, ["a", "b", "c"])
    config = tmp_path / "job.yaml"
    config.write_text(f"input: {{manifest: '{data}', id_column: caption, "
                      "image_column: image}\n")
    assert restore.main(["--config", str(config), "--output", str(tmp_path / "out"),
                         "--checkpoint", str(CHECKPOINT), "--device", "cpu", "--engine",
                         "local"]) == 0
    rows = latest_per_item(read_metrics(str(tmp_path / "out" / "metrics"))).to_pylist()
    assert sorted(r["id"] for r in rows) == ["caption a", "caption b", "caption c"]
    config.write_text(f"input: {{manifest: '{data}', image_column: picture}}\n")
    # no column "picture": not a dataset of images, so read as a manifest, which has no uri
    assert restore.main(["--config", str(config), "--output", str(tmp_path / "out2"),
                         "--checkpoint", str(CHECKPOINT), "--device", "cpu"]) == 2
