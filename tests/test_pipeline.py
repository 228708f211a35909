"""The restore job end to end on a real local Ray: files and Parquet read back."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from jobs import restore
from pipeline import imaging, sharpness
from pipeline.inference import resolve_precision

from .conftest import REPO, make_image


@pytest.fixture
def job(tmp_path, official_checkpoint):
    """A manifest of good, broken and duplicate rows, and a config for it."""
    imgs = tmp_path / "in"
    good = [
        make_image(imgs / "a.png", (24, 20), seed=1),
        make_image(imgs / "b.jpg", (17, 13), seed=2),
        make_image(imgs / "grey.png", (16, 16), mode="L", seed=3),
        make_image(imgs / "dir with space/ü.png", (20, 24), mode="RGBA", seed=4),
    ]
    (imgs / "text.jpg").write_text("this is not a jpeg\n")
    rows = [{"uri": str(p), "id": p.relative_to(imgs).with_suffix("").as_posix()} for p in good]
    rows += [
        {"uri": str(imgs / "text.jpg"), "id": "text"},
        {"uri": str(imgs / "absent.png"), "id": "absent"},
        {"uri": str(good[1]), "id": "a"},  # duplicate id
    ]
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = tmp_path / "job.yaml"
    config.write_text(
        f"input: {{manifest: '{manifest}', rows_per_block: 3}}\n"
        f"output: {{uri: '{tmp_path / 'out'}'}}\n"
        f"model: {{checkpoint: '{official_checkpoint}'}}\n"
        "inference: {batch_size: 2}\n"
    )
    return {"config": config, "rows": rows, "out": tmp_path / "out",
            "sha256": hashlib.sha256(official_checkpoint.read_bytes()).hexdigest()}


def test_restore_job_end_to_end(ray_cluster, job, capsys):
    cpu = torch.device("cpu")
    assert restore.main(["--config", str(job["config"]), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "7/7 rows, 4 ok, 3 error" in printed and "images/s" in printed

    table = pq.read_table(job["out"] / "metrics")
    assert table.num_rows == len(job["rows"])
    by_row = {r["row"]: r for r in table.to_pylist()}
    assert sorted(by_row) == list(range(len(job["rows"])))

    for i in range(4):
        r = by_row[i]
        assert r["status"] == "ok" and r["error"] is None, r["error"]
        assert r["checkpoint_sha256"] == job["sha256"] and r["model"] == "mimo-unet"
        assert (r["device"], r["precision"]) == ("cpu", resolve_precision("auto", cpu))
        source = imaging.decode(open(job["rows"][i]["uri"], "rb").read())
        assert (r["in_height"], r["in_width"]) == source.shape[:2]
        written = np.asarray(Image.open(r["output_uri"]))
        channels = 4 if Image.open(job["rows"][i]["uri"]).mode == "RGBA" else 3  # alpha kept
        assert written.shape == (2 * source.shape[0], 2 * source.shape[1], channels)
        assert r["alpha"] == ("kept" if channels == 4 else "none")
        assert (r["out_height"], r["out_width"]) == written.shape[:2]
        bicubic = imaging.upscale2x(source)
        assert r["lapvar_in"] == pytest.approx(sharpness.laplacian_variance(bicubic))
        assert r["tenengrad_out"] == pytest.approx(sharpness.tenengrad(written))
        assert r["output_uri"] == str(job["out"] / "images" / f"{r['id']}.png")

    assert by_row[4]["status"] == "error" and "decode: " in by_row[4]["error"]
    assert "looks like text" in by_row[4]["error"]
    assert by_row[5]["status"] == "error" and "read: FileNotFoundError" in by_row[5]["error"]
    assert "duplicate id 'a'" in by_row[6]["error"]
    # the duplicate did not overwrite the first 'a'
    first_a = np.asarray(Image.open(job["out"] / "images" / "a.png"))
    assert first_a.shape == (40, 48, 3)


def test_bad_config_and_manifest_exit_2_before_work(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("input: {manifest: x}\nmodels: {}\n")
    assert restore.main(["--config", str(bad)]) == 2
    assert "models: unknown key" in capsys.readouterr().err

    assert restore.main(["--manifest", str(tmp_path / "nothing-here")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_everything_on_s3(ray_cluster, s3, official_checkpoint, tmp_path):
    """Manifest, images, checkpoint, restored images and Parquet metrics all on s3://."""
    import s3fs

    options, bucket = s3
    fs = s3fs.S3FileSystem(**options["s3"])
    endpoint = options["s3"]["client_kwargs"]["endpoint_url"]
    for i, size in enumerate([(24, 20), (16, 12)]):
        fs.put(str(make_image(tmp_path / f"{i}.png", size, seed=i)), f"{bucket}/in/img {i}.png")
    fs.pipe(f"{bucket}/in/manifest.csv", b"uri,id\nimg 0.png,zero\nimg 1.png,one\nnope.png,gone\n")
    fs.put(str(official_checkpoint), f"{bucket}/models/m.pkl")
    config = tmp_path / "s3.yaml"
    config.write_text(
        f"input: {{manifest: 's3://{bucket}/in/manifest.csv'}}\n"
        f"output: {{uri: 's3://{bucket}/out'}}\n"
        f"model: {{checkpoint: 's3://{bucket}/models/m.pkl'}}\n"
        f"storage: {{endpoint_url: '{endpoint}', retries: 2}}\n"
    )
    assert restore.main(["--config", str(config), "--device", "cpu"]) == 0

    files = fs.find(f"{bucket}/out/metrics")
    assert files and all(f.endswith(".parquet") for f in files)
    table = pq.read_table(f"{bucket}/out/metrics", filesystem=fs)
    rows = {r["id"]: r for r in table.to_pylist()}
    assert {k: v["status"] for k, v in rows.items()} == {"zero": "ok", "one": "ok",
                                                         "gone": "error"}
    assert "read: FileNotFoundError" in rows["gone"]["error"]
    assert rows["zero"]["output_uri"] == f"s3://{bucket}/out/images/zero.png"
    with fs.open(f"{bucket}/out/images/one.png", "rb") as f:
        assert Image.open(f).size == (32, 24)


def test_dry_run_plans_and_touches_nothing(ray_cluster, job, capsys):
    args = ["--config", str(job["config"]), "--device", "cpu"]
    assert restore.main([*args, "--dry-run"]) == 0
    assert capsys.readouterr().out.strip() == "7 rows in the input, 0 already done, 7 to do"
    assert not job["out"].exists()

    assert restore.main(args) == 0
    run = capsys.readouterr()
    assert "7/7 rows" in run.out and "rows, " in run.err  # the summary, and the progress line
    files = sorted((job["out"] / "metrics").iterdir())
    assert len(files) == 1  # the run's rows in one ledger file, not one per block

    assert restore.main([*args, "--dry-run"]) == 0
    plan = capsys.readouterr().out
    assert "7 rows in the input, 4 already done, 3 to do" in plan  # errors are retried
    assert "at the last run's" in plan and "images/s: about" in plan
    assert sorted((job["out"] / "metrics").iterdir()) == files


def test_a_dry_run_loads_neither_ray_nor_torch(job):
    # Planning is Arrow alone: a dry run over millions of rows must not pay for the rest.
    code = ("import sys; from jobs import restore; "
            f"status = restore.main(['--config', {str(job['config'])!r}, '--dry-run']); "
            "print(status, 'torch' in sys.modules, 'ray' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                         text=True, check=True).stdout.split()
    assert out[-3:] == ["0", "False", "False"]


def test_the_summary_finds_missing_and_repeated_rows_and_groups_errors():
    from pipeline.restore.blocks import to_table
    from pipeline.restore.ledger import METRICS_SCHEMA
    from pipeline.restore.summary import summarize

    def row(n, status="ok", error=None):
        return {"row": n, "status": status, "error": error, "lapvar_in": 1.0, "lapvar_out": 3.0}

    table = to_table([row(0), row(1), row(1), row(3, "error", "read: FileNotFoundError: a"),
                      row(4, "error", "read: FileNotFoundError: b"),
                      row(5, "error", "decode: UnidentifiedImageError: c:d")], METRICS_SCHEMA)
    summary = summarize(table, expected_rows=pa.array(range(6)), seconds=2.0, images_uri="i",
                        metrics_uri="m", run_id="r")
    assert (summary.missing_rows, summary.duplicate_rows) == ([2], [1])
    assert summary.top_errors == [("read: FileNotFoundError", 2),
                                  ("decode: UnidentifiedImageError", 1)]
    assert (summary.ok, summary.errors, summary.complete) == (3, 3, False)
    assert summary.mean_lapvar_gain == pytest.approx(3.0)


def test_progress_line_counts_rows_and_time_left():
    import io

    from pipeline.restore.progress import Progress

    stream = io.StringIO()
    progress = Progress(total=4, stream=stream, interval_s=0)
    progress.advance(1)
    progress.advance(3)
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("1/4 rows, ") and lines[-1].startswith("4/4 rows, ")
    assert lines[-1].endswith("00:00:00 left") and "images/s" in lines[-1]


def test_known_ray_noise_is_dropped_from_stderr_and_nothing_else(capfd):
    from pipeline.restore.progress import without_known_noise

    noise = (b"[2026-11-27 02:07:58,466 E 14051 14051] core_worker.cc:2465: Actor with class "
             b"name: 'MapWorker(MapBatches(RestoreActor))' and ID: 'ab12' has constructor "
             b"arguments in the object store and max_restarts > 0. If the arguments ...\n")
    with without_known_noise():
        os.write(2, b"before\n" + noise + b"E other error line stays\n")
        os.write(2, b"3/8 rows\r4/8 rows")  # a line redrawn in place, no newline yet
    os.write(2, b"\nafter\n")
    err = capfd.readouterr().err
    assert err == "before\nE other error line stays\n3/8 rows\r4/8 rows\nafter\n"


def test_the_noise_filter_never_blocks_when_stderr_is_gone():
    import subprocess
    import sys

    # stderr into a pipe whose reader exits at once, as `2>&1 | head -1` does
    code = ("import os\nfrom pipeline.restore.progress import without_known_noise\n"
            "with without_known_noise():\n"
            "    for _ in range(2000):\n"
            "        try:\n"
            "            os.write(2, b'x' * 200 + b'\\n')\n"
            "        except OSError:\n"
            "            pass\n"
            "print('done', flush=True)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=REPO)
    proc.stderr.close()
    try:
        out, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0 and out.strip() == b"done"


def test_rerun_skips_done_rows_and_force_redoes_them(ray_cluster, job, tmp_path, capsys):
    args = ["--config", str(job["config"]), "--device", "cpu"]
    assert restore.main(args) == 0
    capsys.readouterr()

    # a rerun does only the error rows (they may have been fixed) and skips the 4 restored
    assert restore.main(args) == 0
    assert "3/3 rows, 0 ok, 3 error; 4 skipped (already restored)" in capsys.readouterr().out

    # a new manifest row is the only new work
    manifest = tmp_path / "manifest.jsonl"
    extra = make_image(tmp_path / "in" / "new.png", (12, 12), seed=9)
    manifest.write_text(manifest.read_text() + json.dumps({"uri": str(extra), "id": "new"}) + "\n")
    assert restore.main(args) == 0
    out = capsys.readouterr().out
    assert "4/4 rows, 1 ok, 3 error; 4 skipped" in out

    assert restore.main([*args, "--force"]) == 0
    assert "8/8 rows, 5 ok, 3 error" in capsys.readouterr().out

    from pipeline.restore.ledger import latest_per_item, read_metrics

    everything = read_metrics(str(job["out"] / "metrics"))
    assert everything.num_rows == 7 + 3 + 4 + 8
    merged = latest_per_item(everything)
    keys = list(zip(merged["id"].to_pylist(), merged["source_uri"].to_pylist()))
    assert len(keys) == len(set(keys)) == 8

    from jobs import report

    assert report.main([str(job["out"])]) == 0
    printed = capsys.readouterr().out
    assert "4 run(s), 22 rows, 8 images" in printed and "ok: 5" in printed
    assert "read: FileNotFoundError" in printed

    # compacting keeps the newest row per image in one file, and reruns still skip from it
    assert report.main([str(job["out"]), "--compact"]) == 0
    assert "compacted 4 metrics file(s) into one of 8 rows" in capsys.readouterr().out
    assert len(list((job["out"] / "metrics").iterdir())) == 1
    compacted = read_metrics(str(job["out"] / "metrics"))
    order = [("id", "ascending"), ("source_uri", "ascending")]
    assert compacted.sort_by(order).to_pylist() == merged.sort_by(order).to_pylist()
    assert restore.main(args) == 0
    assert "5 skipped (already restored)" in capsys.readouterr().out


def test_partial_metrics_file_is_skipped_and_its_rows_redone(ray_cluster, job, capsys):
    args = ["--config", str(job["config"]), "--device", "cpu"]
    assert restore.main(args) == 0
    files = sorted((job["out"] / "metrics").glob("*.parquet"))
    # a driver killed mid-write leaves a truncated file
    files[0].write_bytes(files[0].read_bytes()[:100])
    capsys.readouterr()
    assert restore.main(args) == 0
    assert "skipping unreadable metrics file" in capsys.readouterr().out

    from pipeline.restore.ledger import latest_per_item, read_metrics

    merged = latest_per_item(read_metrics(str(job["out"] / "metrics")))
    assert sorted(merged["row"].to_pylist()) == list(range(7))
    assert merged["status"].to_pylist().count("ok") == 4


def test_unloadable_checkpoint_exits_2_before_work(tmp_path, capsys):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    assert restore.main(["--checkpoint", str(bad), "--output", str(tmp_path / "out")]) == 2
    assert "cannot load checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_actors_that_would_starve_the_cpu_stages_are_refused(ray_cluster, job, capsys):
    config = job["config"]
    config.write_text(config.read_text() + "resources: {actors: 1, cpus_per_actor: 2}\n")
    assert restore.main(["--config", str(config), "--device", "cpu"]) == 2
    assert "leave none of the cluster's 2 CPUs" in capsys.readouterr().err


def test_changed_output_settings_redo_images_and_mostly_errors_fail_the_run(ray_cluster, job,
                                                                            tmp_path, capsys):
    args = ["--config", str(job["config"]), "--device", "cpu"]
    assert restore.main(args) == 0
    capsys.readouterr()
    # JPEG output is another output: the 4 restored as PNG are redone, not skipped
    jpeg = tmp_path / "jpeg.yaml"
    jpeg.write_text(job["config"].read_text().replace(
        f"output: {{uri: '{job['out']}'}}", f"output: {{uri: '{job['out']}', format: jpeg}}"))
    assert restore.main(["--config", str(jpeg), "--device", "cpu"]) == 0
    assert "7/7 rows, 4 ok, 3 error" in capsys.readouterr().out
    assert len(list((job["out"] / "images").glob("*.jpg"))) == 3  # ids a, b, grey; ü in a dir
    # 3 error rows of 7 are under the default limit (half); a limit of a quarter fails the run
    strict = tmp_path / "strict.yaml"
    strict.write_text(jpeg.read_text() + "limits: {max_error_rate: 0.25}\n")
    assert restore.main(["--config", str(strict), "--device", "cpu"]) == 3
    assert "TOO MANY ERRORS: 43% of the input" in capsys.readouterr().out


def test_the_latest_row_of_an_item_decides_whether_it_is_done():
    from datetime import datetime, timedelta, timezone

    import pyarrow as pa

    from pipeline.restore.blocks import to_table
    from pipeline.restore.ledger import LEDGER_SCHEMA, METRICS_SCHEMA
    from pipeline.restore.manifest import ROWS_SCHEMA
    from pipeline.restore.plan import OutputKey, against_ledger

    t0 = datetime(2026, 1, 1, tzinfo=timezone.utc)

    def row(image_id, status, minutes, sha="s1", run="20260101T000000-aaaaaa", source=None):
        return {"row": 0, "id": image_id, "source_uri": source or f"{image_id}.png",
                "status": status, "model": "mimo-unet", "checkpoint_sha256": sha,
                "run_id": run, "finished_at": t0 + timedelta(minutes=minutes)}

    later = "20260102T000000-bbbbbb"
    ledger = to_table([
        row("a", "ok", 1), row("a", "error", 2),  # failed since: redo
        row("b", "error", 1), row("b", "ok", 2),  # fixed since: done
        row("c", "ok", 1, sha="s0"),  # another checkpoint: redo
        row("d", "ok", 1),  # one row: done
        # A later run decides, whatever the workers' clocks said: e's newest row is an error.
        row("e", "ok", 9), row("e", "error", 1, run=later),
        row("f", "ok", 1), row("f", "ok", 2, source="elsewhere.png"),  # f now holds another
    ], METRICS_SCHEMA)
    ledger = ledger.select(LEDGER_SCHEMA.names).cast(LEDGER_SCHEMA)
    ids = ["a", "b", "c", "d", "e", "f", "g"]
    rows = pa.Table.from_pylist([{"row": n, "id": i, "source_uri": f"{i}.png"}
                                 for n, i in enumerate(ids)], schema=ROWS_SCHEMA)
    todo = against_ledger(rows, ledger, OutputKey("mimo-unet", "s1", None))
    assert todo["id"].to_pylist() == ["a", "c", "e", "f", "g"]
    assert "already holds the image restored from elsewhere.png" in todo["error"][3].as_py()
    assert todo["error"].null_count == 4
    forced = against_ledger(rows, ledger, OutputKey("mimo-unet", "s1", None), force=True)
    assert forced.num_rows == len(ids) and forced["error"].null_count == len(ids) - 1


def test_auto_buckets_keep_the_output_key_of_the_fixed_default():
    # Outputs restored when the bucket was a fixed 64 stay done under auto (64 on GPUs).
    from pipeline.config import load_config
    from pipeline.restore.plan import output_settings_sha256

    auto = load_config(None)
    assert auto.inference.bucket == "auto"
    assert output_settings_sha256(auto) == output_settings_sha256(
        load_config(None, {"inference.bucket": 64}))
    assert output_settings_sha256(auto) != output_settings_sha256(
        load_config(None, {"inference.bucket": 4}))
