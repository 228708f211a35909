"""What a run costs in object-store requests, per layout, counted on a local S3 server.

``python -m jobs.benchmark_requests`` (needs the test extras: moto's server). For each layout
(files in and out; WebDataset shards in and out; Parquet in and out) it runs
``python -m jobs.restore`` on the local engine over generated thumbnails on a moto server behind
a request-recording proxy, twice (N and 4N images), so that each layout's requests split into
a part per image (the difference over 3N) and a part per run; then it prices 10 million
thumbnails at S3 Standard's list prices and its per-prefix request rates. With ``delay_ms``
every request waits that long at the proxy first (a far region), and the files layout runs
as this tree and as ``against`` (a git revision) have it, side by side.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import subprocess
import sys
import tarfile
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.restore.benchmark import make_thumbnails, revision_tree
from pipeline.restore.request_proxy import RequestProxy

# S3 Standard, us-east-1, list prices (aws.amazon.com/s3/pricing, 2026-12): per 1,000 requests.
PRICE_PER_1000 = {"PUT, COPY, POST, LIST": 0.005, "GET, HEAD and others": 0.0004}
# Requests a second per partitioned prefix (S3's documented rates).
PREFIX_RATE = {"PUT, COPY, POST, LIST": 3500, "GET, HEAD and others": 5500}
LAYOUTS = ("files", "webdataset", "parquet")
FAKE_AWS = {"AWS_ACCESS_KEY_ID": "AKIDBENCHMARK", "AWS_SECRET_ACCESS_KEY": "benchmark",
            "AWS_DEFAULT_REGION": "us-east-1"}


def _kind(method: str, path: str) -> str:
    query = urlsplit(path).query
    if method in ("PUT", "POST") or (method == "GET" and ("list-type" in query
                                                          or "prefix=" in query)):
        return "PUT, COPY, POST, LIST"
    return "GET, HEAD and others"


class Store:
    """A moto S3 server with one bucket, the sample inputs laid out for every layout."""

    def __init__(self, root: Path, images: int, per_shard: int):
        import s3fs
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # a line per request otherwise
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.server.start()
        host, port = self.server.get_host_and_port()
        self.endpoint = f"http://{host}:{port}"
        os.environ.update(FAKE_AWS)
        self.fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": self.endpoint})
        self.bucket = f"bench-{uuid.uuid4().hex[:8]}"
        self.fs.mkdir(self.bucket)
        self.root, self.per_shard = root, per_shard

    def inputs(self, name: str, count: int) -> dict[str, str]:
        """``count`` thumbnails as files, as tar shards and as Parquet of images, under
        ``name``; the manifest URI of each layout."""
        folder = self.root / name
        make_thumbnails(folder / "files", count, (40, 32))
        files = sorted((folder / "files").iterdir())
        (folder / "tar").mkdir()
        (folder / "parquet").mkdir()
        for n, start in enumerate(range(0, count, self.per_shard)):
            part = files[start:start + self.per_shard]
            with tarfile.open(folder / "tar" / f"{n:05d}.tar", "w") as tar:
                for f in part:
                    data = f.read_bytes()
                    info = tarfile.TarInfo(f"{f.stem}.jpg")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
            pq.write_table(pa.table({"key": [f.stem for f in part], "image": [
                {"bytes": f.read_bytes(), "path": f.name} for f in part]}),
                folder / "parquet" / f"{n:05d}.parquet")
        self.fs.put(str(folder) + "/", f"{self.bucket}/{name}/", recursive=True)
        base = f"s3://{self.bucket}/{name}"
        return {"files": f"{base}/files", "webdataset": f"{base}/tar",
                "parquet": f"{base}/parquet"}

    def close(self) -> None:
        self.server.stop()


def _run(store: Store, manifest: str, output: str, layout: str, delay_s: float,
         code: Path | None = None) -> tuple[Counter, float]:
    """One ``jobs.restore`` through a fresh proxy: its requests by kind and its seconds."""
    with RequestProxy(store.endpoint, delay_s) as proxy:
        config = store.root / f"{uuid.uuid4().hex[:8]}.yaml"
        config.write_text(f"input: {{manifest: '{manifest}'}}\n"
                          f"output: {{uri: '{output}'"
                          + (f", layout: {layout}, images_per_shard: {store.per_shard}"
                             if layout != "files" else "") + "}\n"
                          f"storage: {{endpoint_url: '{proxy.endpoint}'}}\n")
        env = {**os.environ, **FAKE_AWS}
        if code:
            env["PYTHONPATH"] = str(code)
        started = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "jobs.restore", "--config", str(config),
                               "--engine", "local", "--device", "cpu"],
                              capture_output=True, text=True, env=env, cwd=code)
        seconds = time.perf_counter() - started
        if proc.returncode:
            raise RuntimeError(f"jobs.restore failed:\n{proc.stderr[-2000:]}")
        return Counter(_kind(m, p) for m, p in proxy.requests), seconds


def measure(images: int = 100, per_shard: int = 100, delay_ms: float = 50.0,
            against: str | None = None) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(Path(tmp), images, per_shard)
        try:
            small, large = store.inputs("small", images), store.inputs("large", 4 * images)
            result: dict = {"images": [images, 4 * images], "images_per_shard": per_shard,
                            "layouts": {}}
            for layout in LAYOUTS:
                runs = [_run(store, inputs[layout], f"s3://{store.bucket}/out-{layout}-{n}",
                             layout, 0.0)[0] for n, inputs in enumerate((small, large))]
                kinds = sorted(set(runs[0]) | set(runs[1]))
                per_image = {k: (runs[1][k] - runs[0][k]) / (3 * images) for k in kinds}
                per_run = {k: runs[0][k] - per_image[k] * images for k in kinds}
                result["layouts"][layout] = {"per_image": per_image, "per_run": per_run}
            if delay_ms:
                result["delay_ms"] = delay_ms
                result["with_delay"] = _with_delay(store, small, delay_ms / 1000, against)
        finally:
            store.close()
    return result


def _with_delay(store: Store, inputs: dict, delay_s: float, against: str | None) -> dict:
    """Images/s of the files and webdataset layouts with every request delayed, and of the
    files layout as revision ``against`` has it, alternating (before, then after)."""
    out = {}
    with revision_tree(against) if against else contextlib.nullcontext() as old:
        runs = ([(f"files, {against}", "files", old)] if against else []) + [
            ("files", "files", None), ("webdataset", "webdataset", None)]
        for name, layout, code in runs:
            output = f"s3://{store.bucket}/delayed-{uuid.uuid4().hex[:6]}"
            out[name] = _run(store, inputs[layout], output, layout, delay_s, code)[1]
    return out


def cost_table(result: dict, thumbnails: int = 10_000_000) -> list[dict]:
    """Per layout: requests for ``thumbnails`` by kind, their price, and the thumbnails a
    second one prefix allows at S3's per-prefix rates (the tighter of the two kinds)."""
    rows = []
    for layout, counts in result["layouts"].items():
        requests = {k: counts["per_image"][k] * thumbnails + counts["per_run"][k]
                    for k in counts["per_image"]}
        price = sum(PRICE_PER_1000[k] * n / 1000 for k, n in requests.items())
        limit = min((PREFIX_RATE[k] / counts["per_image"][k] for k in counts["per_image"]
                     if counts["per_image"][k] > 0), default=float("inf"))
        rows.append({"layout": layout, "requests": requests, "dollars": price,
                     "prefix_limited_images_per_s": limit,
                     "per_image": sum(counts["per_image"].values())})
    return rows


def render(result: dict) -> str:
    lines = [f"Requests counted over {result['images'][0]} and {result['images'][1]} "
             f"thumbnails (40x32 JPEG), {result['images_per_shard']} a shard; per 10 million "
             "thumbnails at S3 Standard's list prices and per-prefix rates:", "",
             "| layout (in and out) | requests per image | PUT/LIST per 10M | GET/HEAD per 10M "
             "| request cost per 10M | one prefix allows |", "|---|---|---|---|---|---|"]
    for row in cost_table(result):
        put = row["requests"].get("PUT, COPY, POST, LIST", 0)
        get = row["requests"].get("GET, HEAD and others", 0)
        lines.append(f"| {row['layout']} | {row['per_image']:.3f} | {put:,.0f} | {get:,.0f} | "
                     f"${row['dollars']:,.2f} | {row['prefix_limited_images_per_s']:,.0f} "
                     "images/s |")
    if "with_delay" in result:
        lines += ["", f"With {result['delay_ms']:.0f} ms added to every request, "
                  f"{result['images'][0]} thumbnails, local engine, whole process:"]
        lines += [f"- {name}: {seconds:.1f} s, {result['images'][0] / seconds:.2f} images/s"
                  for name, seconds in result["with_delay"].items()]
    return "\n".join(lines)
