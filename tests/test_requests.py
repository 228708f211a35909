"""What a run costs in object-store requests, counted by a proxy in front of the S3 server."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from urllib.parse import unquote, urlsplit

import s3fs

from jobs import restore

from .conftest import make_image

CHECKPOINT = Path(__file__).resolve().parents[1] / "checkpoints" / "mimo-unet-thumb-x2.pt"


def _run(tmp_path: Path, proxy, options: dict, bucket: str, name: str, count: int,
         *extra: str) -> list:
    """A run over ``count`` images on s3 through ``proxy``; the requests it made."""
    fs = s3fs.S3FileSystem(**options["s3"])  # straight to the server: not counted
    for i in range(count):
        make_image(tmp_path / name / f"{i}.png", (20 + i % 3, 16), seed=i)
    fs.put(str(tmp_path / name) + "/", f"{bucket}/{name}/in/", recursive=True)
    config = tmp_path / f"{name}.yaml"
    config.write_text(f"input: {{manifest: 's3://{bucket}/{name}/in', rows_per_block: 4}}\n"
                      f"output: {{uri: 's3://{bucket}/{name}/out'}}\n"
                      f"model: {{checkpoint: '{CHECKPOINT}'}}\n"
                      f"storage: {{endpoint_url: '{proxy.endpoint}'}}\n")
    before = len(proxy.requests)
    assert restore.main(["--config", str(config), "--engine", "local", "--device", "cpu",
                         *extra]) == 0
    return proxy.requests[before:]


def _keys(requests: list, bucket: str) -> Counter:
    """(method, key) of each request, counted."""
    return Counter((method, unquote(urlsplit(path).path).removeprefix(f"/{bucket}/"))
                   for method, path in requests)


def test_an_image_costs_one_get_and_one_put(s3, fault_proxy, tmp_path):
    options, bucket = s3
    small = _run(tmp_path, fault_proxy, options, bucket, "small", 4)
    large = _run(tmp_path, fault_proxy, options, bucket, "large", 12)
    counted = _keys(large, bucket)
    for i in range(12):
        assert counted["GET", f"large/in/{i}.png"] == 1
        assert counted["PUT", f"large/out/images/{i}.png"] == 1
        assert counted["HEAD", f"large/in/{i}.png"] == 0  # no size asked before the read
    # Everything else (listing, lease, ledger, run record) is the run's, whatever its size:
    # eight more images cost sixteen more requests.
    assert len(large) - len(small) <= 2 * (12 - 4)
    assert len(large) / 12 < 2 + 40 / 12, Counter(m for m, _ in large)


def test_webdataset_output_costs_a_request_per_shard(s3, fault_proxy, tmp_path):
    options, bucket = s3
    requests = _run(tmp_path, fault_proxy, options, bucket, "wds", 200, "--layout",
                    "webdataset", "--images-per-shard", "100")
    counted = _keys(requests, bucket)
    shard_requests = sum(n for (_, key), n in counted.items() if key.startswith("wds/out/shards/"))
    assert 2 <= shard_requests <= 0.05 * 200  # one upload (or a few parts) per 100 images
    assert not any(key.startswith("wds/out/images/") for _, key in counted)
    assert sum(n for (m, key), n in counted.items() if key.startswith("wds/in/")) == 200


def test_webdataset_in_and_out_cost_a_few_requests_per_shard(s3, fault_proxy, tmp_path):
    from .test_shard_input import _sample, write_shard

    options, bucket = s3
    fs = s3fs.S3FileSystem(**options["s3"])
    for n in range(2):
        shard = write_shard(tmp_path / "shards" / f"{n:05d}.tar",
                            [_sample(100 * n + i, tmp_path) for i in range(100)])
        fs.put(str(shard), f"{bucket}/wds/in/{shard.name}")
    config = tmp_path / "wds.yaml"
    config.write_text(f"input: {{manifest: 's3://{bucket}/wds/in/{{00000..00001}}.tar'}}\n"
                      f"output: {{uri: 's3://{bucket}/wds/out', layout: webdataset, "
                      f"images_per_shard: 100}}\nmodel: {{checkpoint: '{CHECKPOINT}'}}\n"
                      f"storage: {{endpoint_url: '{fault_proxy.endpoint}'}}\n")
    before = len(fault_proxy.requests)
    assert restore.main(["--config", str(config), "--engine", "local", "--device", "cpu"]) == 0
    counted = _keys(fault_proxy.requests[before:], bucket)
    shard_requests = sum(n for (_, key), n in counted.items()
                         if key.startswith(("wds/in/", "wds/out/shards/")))
    # Each input shard: its size and one read to index it, one ranged read of its samples;
    # each output shard one upload.
    assert shard_requests <= 0.05 * 200, counted


def test_a_prefix_is_listed_folder_by_folder_side_by_side(s3, tmp_path):
    from pipeline import storage

    options, bucket = s3
    fs = s3fs.S3FileSystem(**options["s3"])
    keys = [f"in/{folder}/{i}.png" for folder in ("a", "b", "c/d") for i in range(3)]
    for key in keys + ["in/top.png"]:
        fs.pipe(f"{bucket}/{key}", b"x")
    s3, path = storage.filesystem(f"s3://{bucket}/in", options)
    assert storage.list_files(s3, path) == sorted(f"{bucket}/{k}" for k in keys + ["in/top.png"])
    fs.pipe(f"{bucket}/in/b/new.png", b"x")  # a later listing in this process sees it
    assert f"{bucket}/in/b/new.png" in storage.list_files(s3, path)
