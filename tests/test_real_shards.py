"""Shards as img2dataset and Hugging Face datasets write them, broken as archives break
(tests/fixtures/real_shards, made by its make.py), through the job from an S3 server in both
shard layouts: one metrics row per sample, every good image and what its sample carried in
the output, each bad member an error row with its reason, and few requests."""

from __future__ import annotations

import json
import tarfile
from collections import Counter
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pyarrow.parquet as pq
import pytest
import s3fs

from jobs import restore
from pipeline.restore import shards
from pipeline.restore.ledger import latest_per_item, read_metrics

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "real_shards"
CHECKPOINT = Path(__file__).resolve().parents[1] / "checkpoints" / "mimo-unet-thumb-x2.pt"

# Each fixture's samples: id -> the start of its error, or None for an image that restores.
IMG2DATASET_TARS = {
    "000000": "decode: ", "000001": None, "000002": None, "000003": None, "000004": None,
    "000011": "decode: ", "000012": "manifest: sample has no image member (it has: json, txt)",
    "000013": None, "000020": None, "000021": None, "000022": None,
    "000023": "manifest: truncated shard: member 000023.jpg holds"}
IMG2DATASET_PARQUET = {
    **{key: None for key in ("000000", "000001", "000002", "000003", "000004", "000011",
                             "000012", "000013", "000020", "000021", "000022", "000023")},
    "000010": "read: ValueError: row 0 of", "000014": "read: ValueError: row 4 of"}
HF_PARQUET = {**{f"train-0000{i // 6}-of-00002/{i % 6}": None for i in range(12)},
              "train-00000-of-00002/3": "decode: ",
              "train-00001-of-00002/2": "read: ValueError: row 2 of"}
CASES = {"img2dataset_webdataset": IMG2DATASET_TARS, "img2dataset_parquet": IMG2DATASET_PARQUET,
         "hf_parquet": HF_PARQUET}


def _inputs(name: str) -> dict[str, dict[str, bytes]]:
    """What each sample of a fixture carries besides its image, by id, as the job carries it."""
    carried: dict[str, dict[str, bytes]] = {}
    if name == "img2dataset_webdataset":
        for path in sorted((FIXTURES / name).glob("*.tar")):
            with tarfile.open(path) as tar:
                try:
                    for m in tar:
                        if not m.name.endswith(".jpg"):
                            key, ext = m.name.split(".", 1)
                            carried.setdefault(key, {})[ext] = tar.extractfile(m).read()
                except tarfile.ReadError:
                    pass  # the truncated shard
        return carried
    for path in sorted((FIXTURES / name).rglob("*.parquet")):
        for i, row in enumerate(pq.read_table(path).to_pylist()):
            key = row.pop("key", None) or f"{path.stem}/{i}"
            row.pop("jpg", None), row.pop("image", None)
            carried[key] = {k: v.encode() if isinstance(v, str) else json.dumps(v).encode()
                            for k, v in row.items() if v is not None}
    return carried


@pytest.mark.parametrize("layout", ["webdataset", "parquet"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_real_shards_restore_with_one_row_per_sample(name, layout, s3, fault_proxy, tmp_path):
    options, bucket = s3
    fs = s3fs.S3FileSystem(**options["s3"])
    fs.put(str(FIXTURES / name) + "/", f"{bucket}/in/", recursive=True)
    out = tmp_path / "out"
    config = tmp_path / "job.yaml"
    config.write_text(f"input: {{manifest: 's3://{bucket}/in'}}\n"
                      f"output: {{uri: '{out}', layout: {layout}, images_per_shard: 5}}\n"
                      f"model: {{checkpoint: '{CHECKPOINT}'}}\n"
                      f"storage: {{endpoint_url: '{fault_proxy.endpoint}'}}\n")
    assert restore.main(["--config", str(config), "--engine", "local", "--device",
                         "cpu"]) == 0
    expected = CASES[name]
    rows = {r["id"]: r for r in latest_per_item(read_metrics(str(out / "metrics"))).to_pylist()}
    assert sorted(rows) == sorted(expected)  # one row per sample, none lost, none made up
    for image_id, error in expected.items():
        row = rows[image_id]
        if error is None:
            assert row["status"] == "ok", row["error"]
        else:
            assert row["status"] == "error" and row["error"].startswith(error), row["error"]

    ok = {i for i, r in rows.items() if r["status"] == "ok"}
    carried = _inputs(name)
    written = sorted((out / "shards").iterdir())
    assert len(written) == -(-len(ok) // 5)  # shards of 5 images
    held: dict[str, dict[str, bytes]] = {}
    if layout == "webdataset":
        for path in written:
            with tarfile.open(path) as tar:
                for m in tar:
                    key, ext = m.name.split(".", 1)
                    held.setdefault(key, {})[ext] = tar.extractfile(m).read()
        by_id = {json.loads(v["metrics.json"])["id"]: v for v in held.values()}
    else:
        by_id = {r["id"]: {"png": r["image"]["bytes"], **dict(r["members"] or ())}
                 for r in pq.read_table(out / "shards").to_pylist()}
    assert set(by_id) == ok
    for image_id in ok:
        sample = by_id[image_id]
        assert sample["png"] == shards.read_output(rows[image_id])
        assert sample["png"][:8] == b"\x89PNG\r\n\x1a\n"
        others = {k: v for k, v in sample.items() if k not in ("png", "metrics.json")}
        assert others == carried[image_id]  # captions, JSON, labels: unchanged

    # Requests: the input's objects are listed, indexed and read a few times each, not once
    # per image.
    requests = Counter(unquote(urlsplit(path).path).removeprefix(f"/{bucket}/")
                       for method, path in fault_proxy.requests if method == "GET")
    for key, n in requests.items():
        if key.endswith((".tar", ".parquet")):
            assert n <= 4, (key, n)
