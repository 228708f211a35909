"""The CPU stages on their own: a block's object-store requests are in flight together, and its
pixels pass between the stages intact."""

from __future__ import annotations

import threading

import numpy as np
import pyarrow as pa

from pipeline import imaging, storage
from pipeline.restore.blocks import WORK_SCHEMA, to_rows, to_table
from pipeline.restore.manifest import ROWS_SCHEMA
from pipeline.restore.stages import StageContext, finish, prepare

from .conftest import make_image

N = 4


def _all_at_once(real, calls):
    """``real``, but each call waits until N calls are in flight: sequential calls would time
    out at the barrier and fail their rows."""
    barrier = threading.Barrier(N, timeout=10)

    def call(*args, **kwargs):
        calls.append(args[0])
        barrier.wait()
        return real(*args, **kwargs)

    return call


def test_a_blocks_reads_are_in_flight_together(tmp_path, monkeypatch):
    paths = [str(make_image(tmp_path / f"i{i}.png", (20, 16), seed=i)) for i in range(N)]
    calls = []
    monkeypatch.setattr(storage, "read_bytes", _all_at_once(storage.read_bytes, calls))
    block = pa.Table.from_pylist([{"row": i, "id": f"i{i}", "source_uri": p}
                                  for i, p in enumerate(paths)], schema=ROWS_SCHEMA)
    out = prepare(block, StageContext(output_uri=str(tmp_path / "out"), model="m",
                                      checkpoint_sha256=None, run_id="r"))
    assert out["status"].to_pylist() == ["ok"] * N, out["error"].to_pylist()
    assert out["row"].to_pylist() == list(range(N)) and sorted(calls) == sorted(paths)
    assert out["in_width"].to_pylist() == [20] * N


def test_a_blocks_writes_are_in_flight_together(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(storage, "write_bytes_atomic",
                        _all_at_once(storage.write_bytes_atomic, calls))
    rows = [{"row": i, "id": f"i{i}", "source_uri": f"/x/i{i}.png", "status": "ok",
             "out_height": 8, "out_width": 6,
             "pixels": np.full((8, 6, 3), 10 * i, np.uint8).tobytes()} for i in range(N)]
    ctx = StageContext(output_uri=str(tmp_path / "out"), model="m", checkpoint_sha256=None,
                       run_id="r")
    out = finish(to_table(rows, WORK_SCHEMA), ctx)
    assert out["status"].to_pylist() == ["ok"] * N, out["error"].to_pylist()
    assert out["output_uri"].to_pylist() == [ctx.image_uri(f"i{i}") for i in range(N)]
    assert sorted(calls) == sorted(out["output_uri"].to_pylist())
    assert all((tmp_path / "out" / "images" / f"i{i}.png").exists() for i in range(N))
    written = imaging.decode((tmp_path / "out" / "images" / "i3.png").read_bytes())
    assert written.shape == (8, 6, 3) and written[0, 0, 0] == 30


def test_pixels_pass_between_stages_intact():
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, shape, dtype=np.uint8) for shape in [(3, 5, 3), (1, 1, 3)]]
    rows = [{"row": 0, "pixels": images[0]}, {"row": 1, "pixels": None},
            {"row": 2, "pixels": images[1].tobytes()}, {"row": 3}, {"row": 4, "pixels": b""}]
    table = to_table(rows)
    table.validate(full=True)
    assert table.schema == WORK_SCHEMA
    expected = [images[0].tobytes(), None, images[1].tobytes(), None, b""]
    assert table.column("pixels").to_pylist() == expected
    # read back as views, from a slice and from a table of several chunks
    for part, want in [(table, expected), (table.slice(1, 3), expected[1:4]),
                       (pa.concat_tables([table, table.slice(2)]), expected + expected[2:])]:
        got = [None if r["pixels"] is None else r["pixels"].tobytes() for r in to_rows(part)]
        assert got == want
    assert [r["row"] for r in to_rows(table)] == [0, 1, 2, 3, 4]

