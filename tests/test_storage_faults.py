"""Transient storage errors are retried within the configured bound; permanent ones are not."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
import s3fs

from jobs import restore
from pipeline import storage
from pipeline.config import StorageConfig

from .conftest import _FAKE_AWS, make_image


def _options(endpoint: str, retries: int) -> dict:
    return StorageConfig(endpoint_url=endpoint, retries=retries).fsspec_options()


@pytest.fixture
def objects(s3):
    options, bucket = s3
    fs = s3fs.S3FileSystem(**options["s3"])
    for name in ("flaky", "throttled", "reset", "denied", "down"):
        fs.pipe(f"{bucket}/{name}.bin", name.encode())
    return bucket


@pytest.mark.parametrize("marker, faults", [
    ("flaky", [(503, "ServiceUnavailable"), (500, "InternalError")]),
    ("throttled", [(503, "SlowDown"), (503, "SlowDown"), (503, "SlowDown")]),
    ("reset", ["reset", "reset"]),
])
def test_transient_errors_are_retried(fault_proxy, objects, marker, faults):
    fault_proxy.rules = {f"/{marker}.bin": list(faults)}
    data = storage.read_bytes(f"s3://{objects}/{marker}.bin", _options(fault_proxy.endpoint, 5))
    assert data == marker.encode()
    # every fault was served and answered by a retry
    assert fault_proxy.rules[f"/{marker}.bin"] == []
    assert fault_proxy.hits[f"/{marker}.bin"] > len(faults)


def test_retries_stop_at_the_configured_bound(fault_proxy, objects):
    fault_proxy.rules = {"/down.bin": [(503, "ServiceUnavailable"), ...]}
    with pytest.raises(OSError):
        storage.read_bytes(f"s3://{objects}/down.bin", _options(fault_proxy.endpoint, 3))
    assert fault_proxy.hits["/down.bin"] == 3


def test_permanent_errors_fail_at_once(fault_proxy, objects):
    fault_proxy.rules = {"/denied.bin": [(403, "AccessDenied"), ...]}
    with pytest.raises(PermissionError):
        storage.read_bytes(f"s3://{objects}/denied.bin", _options(fault_proxy.endpoint, 5))
    assert fault_proxy.hits["/denied.bin"] == 1
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(f"s3://{objects}/absent.bin", _options(fault_proxy.endpoint, 5))


def test_job_through_faults(ray_cluster, fault_proxy, s3, tmp_path, capsys):
    options, bucket = s3
    fs = s3fs.S3FileSystem(**options["s3"])
    for name in ("plain", "flaky", "denied"):
        fs.put(str(make_image(tmp_path / f"{name}.png", (16, 16))), f"{bucket}/in/{name}.png")
    fs.pipe(f"{bucket}/in/m.jsonl", "".join(
        json.dumps({"uri": f"{n}.png"}) + "\n" for n in ("plain", "flaky", "denied")).encode())
    fault_proxy.rules = {"/in/flaky.png": [(503, "SlowDown"), (500, "InternalError")],
                         "/in/denied.png": [(403, "AccessDenied"), ...]}
    config = tmp_path / "job.yaml"
    config.write_text(
        f"input: {{manifest: 's3://{bucket}/in/m.jsonl'}}\n"
        f"output: {{uri: 's3://{bucket}/out'}}\nmodel: {{checkpoint: null}}\n"
        f"storage: {{endpoint_url: '{fault_proxy.endpoint}', retries: 4}}\n"
    )
    assert restore.main(["--config", str(config), "--device", "cpu"]) == 0
    printed = capsys.readouterr()
    rows = {r["id"]: r for r in pq.read_table(f"{bucket}/out/metrics", filesystem=fs).to_pylist()}
    assert rows["plain"]["status"] == rows["flaky"]["status"] == "ok"
    assert rows["denied"]["status"] == "error"
    assert rows["denied"]["error"].startswith("read: PermissionError")
    assert fault_proxy.hits["/in/denied.png"] == 1

    # credentials never leak into output, metrics or errors
    everything = printed.out + printed.err + json.dumps(list(rows.values()), default=str)
    assert _FAKE_AWS["AWS_SECRET_ACCESS_KEY"] not in everything
    assert _FAKE_AWS["AWS_ACCESS_KEY_ID"] not in everything
