"""``moleflow serve``: refuses what it cannot serve in one line, runs as a real process on a loopback port,
answers, never writes into the run directory, and stops cleanly."""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from serve_helpers import files, free_port, png, synthetic, tree_state

from moleflow.cli import main

ROOT = Path(__file__).resolve().parents[2]


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err
    return err


def test_serve_without_the_extra_names_it_in_one_line(tiny_run, monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "fastapi" else real(name, *a))
    assert main(["serve", str(tiny_run)]) == 2
    assert "pip install 'moleflow[serve]'" in _one_line_error(capsys)


def test_a_run_that_fails_its_checks_or_bad_settings_are_refused_before_serving(run_copy, tmp_path, capsys):
    pytest.importorskip("fastapi")
    assert main(["serve", str(tmp_path / "nothing")]) == 2
    assert "nothing" in _one_line_error(capsys)
    (run_copy / "checkpoints" / "tasks" / "disc.safetensors").write_bytes(b"not a checkpoint")
    assert main(["serve", str(run_copy), "--port", str(free_port())]) == 2
    assert "disc.safetensors" in _one_line_error(capsys)
    assert main(["serve", str(run_copy), "--queue-size", "2", "--max-images", "4"]) == 2
    assert "queue_size must be >= max_images (4)" in _one_line_error(capsys)


def test_the_parser_imports_no_server_library():
    code = "import sys, moleflow.cli as c; c.build_parser(); print(any(m in sys.modules for m in ('fastapi', 'uvicorn')))"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env).stdout.split() == ["False"]


def test_moleflow_serve_runs_on_loopback_answers_and_leaves_the_run_untouched(tiny_run, tmp_path):
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("fastapi")
    before = tree_state(tiny_run)
    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    log = (tmp_path / "serve.log").open("w+")
    proc = subprocess.Popen(
        [sys.executable, "-m", "moleflow", "serve", str(tiny_run), "--port", str(port), "--max-wait-ms", "1"],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        cwd=tmp_path,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not come up"
            time.sleep(0.3)
        answer = httpx.post(f"{url}/predict", files=files(("part.png", png(synthetic("disc", 0)))), timeout=60)
        page = httpx.get(url, timeout=10)
        tasks = httpx.get(f"{url}/tasks", timeout=10).json()
    finally:
        proc.send_signal(signal.SIGINT)
        code = proc.wait(60)
    output = (tmp_path / "serve.log").read_text()
    assert answer.status_code == 200 and answer.json()["results"][0]["routed"] in ("disc", "unknown product")
    assert page.status_code == 200 and "moleflow inspection" in page.text
    assert [p["name"] for p in tasks["products"]] == ["stripes", "disc"]
    assert f"http://127.0.0.1:{port}" in output and "model warmed up" in output
    assert code == 0, output
    assert tree_state(tiny_run) == before  # loaded, served, stopped: not one byte written in the run
