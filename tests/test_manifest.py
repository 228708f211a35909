from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.restore.manifest import ManifestError, load_rows, output_key

from .conftest import make_image


@pytest.fixture
def images(tmp_path):
    return [make_image(tmp_path / "imgs" / name) for name in ("a.png", "b.jpg", "sub/c.png")]


def test_prefix_lists_images_with_relative_ids(tmp_path, images):
    (tmp_path / "imgs" / "notes.txt").write_text("not an image")
    rows = load_rows(str(tmp_path / "imgs"))
    assert rows["id"].to_pylist() == ["a", "b", "sub/c"]
    assert rows["source_uri"].to_pylist() == [str(p) for p in images]
    assert rows["error"].null_count == 3


@pytest.mark.parametrize("kind", ["csv", "jsonl", "parquet"])
def test_manifest_formats(tmp_path, images, kind):
    records = [{"uri": str(images[0]), "id": "007"}, {"uri": "imgs/b.jpg", "id": "x y/ü"}]
    path = tmp_path / f"m.{kind}"
    if kind == "csv":
        path.write_text("uri,id\n" + "".join(f"{r['uri']},{r['id']}\n" for r in records))
    elif kind == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    else:
        pq.write_table(pa.Table.from_pylist(records), path)
    rows = load_rows(str(path))
    assert rows["id"].to_pylist() == ["007", "x y/ü"]
    # relative URIs resolve against the manifest's directory
    assert rows["source_uri"].to_pylist() == [str(images[0]), str(tmp_path / "imgs/b.jpg")]


def test_ids_default_to_stems_and_duplicates_are_error_rows(tmp_path, images):
    path = tmp_path / "m.csv"
    path.write_text(f"uri\n{images[0]}\n{images[1]}\n{images[0]}\n\n")
    rows = load_rows(str(path)).to_pylist()
    assert [r["id"] for r in rows] == ["a", "b", "a"]
    assert rows[0]["error"] is None and rows[1]["error"] is None
    assert "duplicate id 'a' (first at manifest row 0)" in rows[2]["error"]


def test_broken_manifests_fail_fast(tmp_path):
    (tmp_path / "no_uri.csv").write_text("path\nx.png\n")
    with pytest.raises(ManifestError, match="no 'uri' column.*path"):
        load_rows(str(tmp_path / "no_uri.csv"))
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    with pytest.raises(ManifestError, match="cannot read manifest"):
        load_rows(str(tmp_path / "bad.parquet"))
    with pytest.raises(ManifestError, match="does not exist|no images"):
        load_rows(str(tmp_path / "absent"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ManifestError, match="no images"):
        load_rows(str(tmp_path / "empty"))


@pytest.mark.parametrize("bad", ["", "../x", "/etc/passwd", "a/../../b", "a\\b", "a\x00b",
                                 "a//b", "x" * 600])
def test_unsafe_ids_are_refused(bad):
    with pytest.raises(ValueError):
        output_key(bad)


def test_unsafe_id_is_an_error_row(tmp_path, images):
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps({"uri": str(images[0]), "id": "../../escape"}) + "\n")
    assert "unsafe id" in load_rows(str(path))["error"][0].as_py()
