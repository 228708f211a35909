from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# Fake credentials for the local S3 server, set before Ray starts so its workers inherit them;
# tests never talk to real AWS.
_FAKE_AWS = {"AWS_ACCESS_KEY_ID": "AKIDFAKEFORTESTS",
             "AWS_SECRET_ACCESS_KEY": "fake-secret-never-logged",
             "AWS_DEFAULT_REGION": "us-east-1"}
os.environ.update(_FAKE_AWS)
for _var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
    os.environ.pop(_var, None)

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SHARED_DIR", REPO.parent / "shared"))
OFFICIAL = SHARED / "fixtures" / "mimo_unet_official"


@pytest.fixture(scope="session")
def official_dir() -> Path:
    if not OFFICIAL.is_dir():
        pytest.fail(f"official fixtures not found at {OFFICIAL}; set SHARED_DIR")
    return OFFICIAL


def make_image(path: Path, size: tuple[int, int] = (24, 20), mode: str = "RGB", seed: int = 0,
               fmt: str | None = None) -> Path:
    """A small image with edges and texture, so that sharpness measures are non-trivial."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    base = ((xx // 4 + yy // 4) % 2) * 160 + 40
    pixels = np.stack([base, np.roll(base, 3, axis=1), 255 - base], axis=-1).astype(np.int16)
    pixels = np.clip(pixels + rng.integers(-20, 20, pixels.shape), 0, 255).astype(np.uint8)
    img = Image.fromarray(pixels, "RGB")
    if mode != "RGB":
        img = img.convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format=fmt)
    return path


@pytest.fixture(scope="session")
def ray_cluster():
    """One real local Ray for the whole session (starting Ray costs seconds)."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=500 * 1024**2,
             log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible server (moto) over HTTP on 127.0.0.1, as s3fs's own tests use."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3(s3_server):
    """A fresh bucket on the shared server; yields (storage options, bucket name)."""
    import uuid

    import s3fs

    options = {"s3": {"client_kwargs": {"endpoint_url": s3_server}}}
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server})
    bucket = f"test-{uuid.uuid4().hex[:12]}"
    fs.mkdir(bucket)
    yield options, bucket
    fs.rm(bucket, recursive=True)


@pytest.fixture
def fault_proxy(s3_server):
    """A fault-injecting proxy in front of the S3 server; set ``.rules`` in the test."""
    from .fault_proxy import FaultProxy

    with FaultProxy(s3_server) as proxy:
        yield proxy
