"""What a hostile input or a careless config must not do: write a credential down, make the job
restore its own output, drive the terminal, or end in a traceback instead of a clear error."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from jobs import restore
from pipeline.restore.stages import _fail
from pipeline.safe_text import printable, redact

from .conftest import make_image

REPO = Path(__file__).resolve().parents[1]
PLANTED = {"user": "PlantedUser", "password": "PlantedPassw0rd", "query": "PlantedQueryT0ken",
           "env": "PlantedEnvS3cret", "session": "PlantedSessionT0ken"}


def _job(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env={**os.environ, **(env or {})})


def test_no_planted_secret_is_written_by_a_run_or_its_report(tmp_path):
    for k in range(2):
        make_image(tmp_path / "in" / f"i{k}.png", seed=k)
    (tmp_path / "in" / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    config = tmp_path / "job.yaml"
    config.write_text(
        "input: {manifest: unused}\n"
        "output: {report: true}\n"
        "storage:\n"
        f"  endpoint_url: http://{PLANTED['user']}:{PLANTED['password']}@127.0.0.1:9/"
        f"?X-Amz-Security-Token={PLANTED['query']}\n"
        "  anonymous: true\n")
    env = {"AWS_SECRET_ACCESS_KEY": PLANTED["env"], "AWS_SESSION_TOKEN": PLANTED["session"]}
    out = tmp_path / "out"
    common = ["--config", str(config), "--manifest", str(tmp_path / "in"), "--output", str(out),
              "--checkpoint", "", "--device", "cpu", "--engine", "local"]
    runs = [_job("jobs.restore", *common, "--dry-run", env=env),
            _job("jobs.restore", *common, env=env),
            _job("jobs.report", str(out), "--config", str(config), "--html",
                 str(out / "page.html"), env=env)]
    assert [r.returncode for r in runs] == [0, 0, 0], [r.stderr for r in runs]
    written = [p for p in out.rglob("*") if p.is_file()]
    assert any(p.parent.name == "runs" for p in written) and (out / "report.html").exists()
    texts = [r.stdout + r.stderr for r in runs] + [
        p.read_bytes().decode("latin-1") for p in written]
    for name, secret in PLANTED.items():
        assert not any(secret in t for t in texts), name
    record = next((out / "runs").glob("run-*.json")).read_text()
    assert "http://***@127.0.0.1:9/?X-Amz-Security-Token=***" in record  # the rest stays


def test_error_reasons_are_redacted(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", PLANTED["env"])
    row = _fail({}, "read", OSError(f"denied for https://h/x.png?sig={PLANTED['query']} "
                                    f"with {PLANTED['env']}"))
    assert PLANTED["query"] not in row["error"] and PLANTED["env"] not in row["error"]
    assert row["error"].startswith("read: OSError: denied for https://h/x.png?sig=***")


def test_redaction_keeps_ordinary_text_and_inlined_images():
    text = "s3://bucket/key.png?versionId=3 /data/in/a.png http://127.0.0.1:9000/bucket"
    assert redact(text, known=[]) == text
    image = "<img src='data:image/png;base64,iVBORw0KGgoAkeyAsig+/session9x==' alt=x>"
    assert redact(image, known=[]) == image


def _listed(capsys, inputs: str, out: str) -> str:
    assert restore.main(["--manifest", inputs, "--output", out, "--dry-run"]) == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("spelling", ["dot", "symlinked input", "link inside the input"])
def test_the_output_is_never_listed_as_input_however_it_is_spelled(tmp_path, capsys, spelling):
    inputs = tmp_path / "in"
    for k in range(2):
        make_image(inputs / f"i{k}.png", seed=k)
    (inputs / "out" / "images").mkdir(parents=True)
    make_image(inputs / "out" / "images" / "i0.png", seed=5)  # a restored image of a run
    if spelling == "dot":
        listed = _listed(capsys, f"file://{inputs}", f"file://{inputs}/./out")
    elif spelling == "symlinked input":
        (tmp_path / "link").symlink_to(inputs)
        listed = _listed(capsys, f"file://{tmp_path / 'link'}", str(inputs / "out"))
    else:
        (inputs / "mirror").symlink_to(inputs / "out")
        listed = _listed(capsys, str(inputs), str(inputs / "out"))
    assert listed.startswith("2 rows in the input"), listed


def test_escape_codes_in_names_and_errors_never_reach_the_terminal(tmp_path, capsys):
    evil = "evil\x1b[2J\x1b]0;pwned\x07"
    (tmp_path / "in").mkdir()
    make_image(tmp_path / "in" / "fine.png")
    (tmp_path / "in" / f"{evil}.jpg").write_bytes(b"not an image")
    status = restore.main(["--manifest", str(tmp_path / "in"), "--output", str(tmp_path / "out"),
                           "--checkpoint", "", "--device", "cpu", "--engine", "local"])
    captured = capsys.readouterr()
    assert status == 0
    shown = captured.out + captured.err
    assert "\x1b" not in shown and "\x07" not in shown
    assert "error x1" in captured.out
    assert printable("a\x1b[31mb\nc", newlines=False) == "a\\x1b[31mb\\nc"


@pytest.mark.parametrize("case", ["directory", "empty", "not utf-8", "not yaml"])
def test_bad_config_and_checkpoint_files_are_clear_errors(tmp_path, capsys, case):
    make_image(tmp_path / "in" / "a.png")
    args = ["--manifest", str(tmp_path / "in"), "--output", str(tmp_path / "out")]
    if case == "directory":
        (tmp_path / "ckpt").mkdir()
        args += ["--checkpoint", str(tmp_path / "ckpt")]
    elif case == "empty":
        (tmp_path / "ckpt.pt").write_bytes(b"")
        args += ["--checkpoint", str(tmp_path / "ckpt.pt")]
    else:
        config = tmp_path / "job.yaml"
        config.write_bytes(b"output:\n  uri: caf\xe9\n" if case == "not utf-8" else b"[: x")
        args += ["--config", str(config)]
    assert restore.main(args) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and str(tmp_path) in err
    assert {"directory": "is a directory", "empty": "is empty", "not utf-8": "UTF-8",
            "not yaml": "not valid YAML"}[case] in err


def test_the_librarys_log_reaches_the_console_redacted_and_escaped(capsys, monkeypatch):
    import logging

    from pipeline.safe_text import console_logging

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", PLANTED["env"])
    log = logging.getLogger("pipeline.restore.run")
    with console_logging():
        log.info(f"note with {PLANTED['env']} and \x1b[2J")
        log.warning("a warning")
    log.warning("after: not on the console handler")
    captured = capsys.readouterr()
    assert captured.out == "note with *** and \\x1b[2J\n"
    assert captured.err.startswith("a warning\n")
    assert not logging.getLogger("pipeline").handlers  # nothing left attached


def test_a_device_that_is_not_there_stops_the_run_before_any_write(tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has the device")
    make_image(tmp_path / "in" / "a.png")
    status = restore.main(["--manifest", str(tmp_path / "in"), "--output", str(tmp_path / "out"),
                           "--checkpoint", "", "--device", "cuda", "--engine", "local"])
    assert status == 2 and "no CUDA device" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
