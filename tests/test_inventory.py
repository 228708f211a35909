"""An S3 Inventory report as the manifest: images only, by modification time, column-wise."""

from __future__ import annotations

import gzip
import io
import json
from datetime import datetime, timedelta, timezone

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import s3fs

from pipeline.config import load_config
from pipeline.restore.manifest import ManifestError
from pipeline.restore.plan import plan_restore


def test_inventory_lists_new_images_as_s3_uris(s3, tmp_path):
    options, bucket = s3
    now = datetime.now(timezone.utc)
    objects = [("thumbs/2026/a.jpg", now - timedelta(days=3)),
               ("thumbs/2026/b.PNG", now - timedelta(hours=1)),
               ("thumbs/2026/notes.txt", now - timedelta(hours=1)),
               ("thumbs/2026/c.webp", now - timedelta(minutes=5))]
    inventory = pa.table({
        "bucket": [bucket] * len(objects),
        "key": [k for k, _ in objects],
        "size": [1000] * len(objects),
        "last_modified_date": pa.array([t for _, t in objects], pa.timestamp("ms", tz="UTC")),
    })
    path = tmp_path / "inventory.parquet"
    pq.write_table(inventory, path)
    config = tmp_path / "job.yaml"
    endpoint = options["s3"]["client_kwargs"]["endpoint_url"]
    config.write_text(f"input: {{manifest: '{path}'}}\noutput: {{uri: '{tmp_path / 'out'}'}}\n"
                      f"model: {{checkpoint: null}}\nstorage: {{endpoint_url: '{endpoint}'}}\n")

    every = plan_restore(load_config(config))
    assert every.rows["source_uri"].to_pylist() == [
        f"s3://{bucket}/thumbs/2026/{n}" for n in ("a.jpg", "b.PNG", "c.webp")]
    assert every.rows["id"].to_pylist() == ["thumbs/2026/a", "thumbs/2026/b", "thumbs/2026/c"]

    since = (now - timedelta(days=1)).isoformat()
    recent = plan_restore(load_config(config, {"input.since": since}))
    assert recent.rows["id"].to_pylist() == ["thumbs/2026/b", "thumbs/2026/c"]
    assert "2 rows in the input modified since" in recent.render()


def _publish_report(fs, bucket: str, fmt: str, files: list[bytes], schema: str) -> str:
    """An inventory report as S3 publishes one: data files and a manifest.json naming them,
    in the destination bucket; returns the manifest's URI."""
    base = f"inventory/{bucket}/nightly"
    keys = []
    for n, data in enumerate(files):
        keys.append(f"{base}/data/part-{n}.{fmt.lower()}{'.gz' if fmt == 'CSV' else ''}")
        fs.pipe(f"{bucket}/{keys[-1]}", data)
    manifest = {"sourceBucket": bucket, "destinationBucket": f"arn:aws:s3:::{bucket}",
                "version": "2016-11-30", "creationTimestamp": "1764979200000",
                "fileFormat": fmt, "fileSchema": schema,
                "files": [{"key": k, "size": 1, "MD5checksum": "0"} for k in keys]}
    fs.pipe(f"{bucket}/{base}/2026-12-06T01-00Z/manifest.json", json.dumps(manifest).encode())
    return f"s3://{bucket}/{base}/2026-12-06T01-00Z/manifest.json"


def _plan(tmp_path, options, manifest, since=None):
    config = tmp_path / "job.yaml"
    endpoint = options["s3"]["client_kwargs"]["endpoint_url"]
    config.write_text(f"input: {{manifest: '{manifest}'}}\noutput: {{uri: '{tmp_path / 'out'}'}}\n"
                      f"model: {{checkpoint: null}}\nstorage: {{endpoint_url: '{endpoint}'}}\n")
    return plan_restore(load_config(config, {"input.since": since} if since else None))


def test_a_csv_report_is_planned_from_its_manifest_json(s3, tmp_path):
    options, bucket = s3
    fs = s3fs.S3FileSystem(**options["s3"])
    lines = [
        (f'"{bucket}","thumbs/old+photo.jpg","","true","10","2026-11-01T00:00:00.000Z"'),
        (f'"{bucket}","thumbs/a%2Bb.png","","true","10","2026-12-05T20:00:00.000Z"'),
        (f'"{bucket}","thumbs/readme.txt","","true","10","2026-12-05T20:00:00.000Z"'),
    ]
    parts = [gzip.compress((line + "\n").encode()) for line in (lines[0], "\n".join(lines[1:]))]
    manifest = _publish_report(fs, bucket, "CSV", parts,
                               "Bucket, Key, VersionId, IsLatest, Size, LastModifiedDate")
    every = _plan(tmp_path, options, manifest)
    assert every.rows["source_uri"].to_pylist() == [f"s3://{bucket}/thumbs/old photo.jpg",
                                                    f"s3://{bucket}/thumbs/a+b.png"]
    assert every.rows["id"].to_pylist() == ["thumbs/old photo", "thumbs/a+b"]
    recent = _plan(tmp_path, options, manifest, since="2026-12-01T00:00:00Z")
    assert recent.rows["id"].to_pylist() == ["thumbs/a+b"]


def test_a_parquet_report_is_planned_from_its_manifest_json(s3, tmp_path):
    options, bucket = s3
    fs = s3fs.S3FileSystem(**options["s3"])
    when = datetime(2026, 12, 5, tzinfo=timezone.utc)
    files = []
    for names in (["a.jpg", "b.txt"], ["c.webp"]):
        buf = io.BytesIO()
        pq.write_table(pa.table({
            "bucket": [bucket] * len(names), "key": [f"t/{n}" for n in names],
            "last_modified_date": pa.array([when] * len(names), pa.timestamp("ms", tz="UTC"))}),
            buf)
        files.append(buf.getvalue())
    manifest = _publish_report(fs, bucket, "Parquet", files, "message s3.inventory { }")
    assert _plan(tmp_path, options, manifest).rows["id"].to_pylist() == ["t/a", "t/c"]
    assert _plan(tmp_path, options, manifest, since="2026-12-06T00:00:00Z").rows.num_rows == 0


def test_a_manifest_json_that_is_not_an_inventory_says_so(s3, tmp_path):
    options, bucket = s3
    fs = s3fs.S3FileSystem(**options["s3"])
    fs.pipe(f"{bucket}/x/manifest.json", b'{"files": []}')
    with pytest.raises(ManifestError, match="not an S3 Inventory manifest"):
        _plan(tmp_path, options, f"s3://{bucket}/x/manifest.json")
    missing = _publish_report(fs, bucket, "CSV", [], "Bucket, Key")
    manifest = json.loads(fs.cat_file(missing.removeprefix("s3://")))
    manifest["files"] = [{"key": "inventory/gone.csv.gz"}]
    fs.pipe(missing.removeprefix("s3://"), json.dumps(manifest).encode())
    with pytest.raises(ManifestError, match="cannot read inventory file .*gone.csv.gz"):
        _plan(tmp_path, options, missing)
