from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
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
FIXTURES = Path(__file__).resolve().parent / "fixtures"
# Photographs never trained on: the demo thumbnails come from the images training holds out.
PHOTOS = sorted((REPO / "samples" / "thumbnails").iterdir())

# state_dict_spec.json names the networks as the official code does.
OFFICIAL_NAMES = {"mimo-unet": "MIMO-UNet", "mimo-unet-plus": "MIMO-UNetPlus"}


def official_spec(name: str) -> list[tuple[str, list[int]]]:
    """Every key of the official network's state dict, in the official order, with its shape."""
    spec = json.loads((FIXTURES / "state_dict_spec.json").read_text())
    return [(key, shape) for key, shape in spec[OFFICIAL_NAMES[name]]]


def seeded_official_weights(name: str) -> dict[str, torch.Tensor]:
    """The weights behind golden_seeded.npz, rebuilt by the rule in tests/fixtures/README.md."""
    rs = np.random.RandomState(20210811)
    weights = {}
    for key, shape in official_spec(name):
        std = 0.7 / np.sqrt(np.prod(shape[1:])) if len(shape) > 1 else 0.01
        weights[key] = torch.from_numpy((rs.standard_normal(shape) * std).astype(np.float32))
    return weights


@pytest.fixture(scope="session")
def official_checkpoint(tmp_path_factory) -> Path:
    """A MIMO-UNet checkpoint saved as the official releases are: legacy (non-zip) pickle of
    ``{'model': state_dict}``."""
    path = tmp_path_factory.mktemp("official") / "MIMO-UNet-seeded.pkl"
    torch.save({"model": seeded_official_weights("mimo-unet")}, path,
               _use_new_zipfile_serialization=False)
    return path


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


# The environment's executables (ray, python): test clusters run the project's Ray.
BIN = Path(sys.executable).parent


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def session_pids(sid: int) -> list[int]:
    """The live processes of session ``sid`` (one started with start_new_session and all it
    spawned), read from /proc so that no other process on the machine is touched."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # after "pid (comm)": state, ppid, pgrp, session; zombies are gone but for their parent
        if int(fields[3]) == sid and fields[0] != "Z":
            pids.append(int(stat.parent.name))
    return pids


def kill_session(sid: int) -> None:
    """SIGKILL every process in session ``sid`` (a Ray head started with start_new_session and
    all it spawned)."""
    import signal

    for pid in session_pids(sid):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


@pytest.fixture(scope="session")
def ray_cluster():
    """One real local Ray for the whole session (starting Ray costs seconds). A new one even
    where a test beside it (pytest -n) has started one, which Ray would otherwise join."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False,
             object_store_memory=500 * 1024**2, log_to_driver=False)
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
