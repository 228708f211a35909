"""An S3 Inventory report as the manifest: images only, by modification time, column-wise."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import load_config
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
