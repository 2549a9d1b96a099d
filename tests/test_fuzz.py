"""Bad input never costs a user their work: each bad input gets a message naming it, and changes nothing.

Every case builds its bad input in a temporary directory. Dataset problems are found by the up-front
check, before any feature is extracted; run-directory problems by the loaders; write failures leave the
run as it was.
"""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from moleflow.cli import main
from moleflow.data.io import read_image
from moleflow.detector import Detector
from moleflow.errors import DatasetError
from tests.helpers import learn_args

RNG = np.random.default_rng(0)


def _png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _huge_header_png(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width x height`` (a decompression bomb's calling card), tiny body."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + chunk + struct.pack(">I", zlib.crc32(chunk))


def _dataset(root: Path, n_good: int = 6) -> Path:
    """A valid MVTec-layout category with ``n_good`` train images, 2 good + 2 defective test images + masks."""
    for i in range(n_good):
        (root / "train" / "good").mkdir(parents=True, exist_ok=True)
        Image.fromarray(RNG.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / "train" / "good" / f"{i:03d}.png")
    for split, count in (("good", 2), ("bad", 2)):
        (root / "test" / split).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            Image.fromarray(RNG.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / "test" / split / f"{i:03d}.png")
    (root / "ground_truth" / "bad").mkdir(parents=True, exist_ok=True)
    for i in range(2):
        mask = np.zeros((32, 32), np.uint8)
        mask[4:9, 4:9] = 255
        Image.fromarray(mask).save(root / "ground_truth" / "bad" / f"{i:03d}_mask.png")
    return root


def _truncated_png() -> bytes:
    return _png_bytes(RNG.integers(0, 256, (32, 32, 3), dtype=np.uint8))[:200]


BAD_TRAIN_FILES = {
    "zero_bytes": lambda p: p.write_bytes(b""),
    "random_bytes": lambda p: p.write_bytes(RNG.integers(0, 256, 500, dtype=np.uint8).tobytes()),
    "text_as_png": lambda p: p.write_text("this is not an image"),
    "truncated": lambda p: p.write_bytes(_truncated_png()),
    "huge_header": lambda p: p.write_bytes(_huge_header_png(200_000, 200_000)),
    "dangling_link": lambda p: p.symlink_to(p.parent / "does-not-exist.png"),
    "link_loop": lambda p: p.symlink_to(p),
    "fifo": lambda p: os.mkfifo(p),
}


@pytest.mark.parametrize("kind", sorted(BAD_TRAIN_FILES))
def test_a_bad_training_image_is_named_before_any_work(tmp_path, capsys, kind):
    data = _dataset(tmp_path / "parts")
    bad = data / "train" / "good" / "999.png"
    BAD_TRAIN_FILES[kind](bad)
    run = tmp_path / "run"
    assert main(learn_args(run, f"parts={data}")) == 2
    err = capsys.readouterr().err
    assert "999.png" in err and "Traceback" not in err
    assert not (run / "tasks.json").exists()  # no run was made


def test_every_problem_of_every_product_is_listed_at_once(tmp_path, capsys):
    first, second = _dataset(tmp_path / "a"), _dataset(tmp_path / "b")
    (first / "test" / "bad" / "000.png").write_bytes(b"")
    (second / "train" / "good" / "001.png").write_text("text")
    run = tmp_path / "run"
    assert main(learn_args(run, f"a={first}", f"b={second}")) == 2
    err = capsys.readouterr().err
    assert "2 of 20 images cannot be used" in err and "a: " in err and "b: " in err
    assert "000.png" in err and "001.png" in err
    assert not (run / "tasks.json").exists()


def test_missing_and_mis_sized_masks_are_named(tmp_path, capsys):
    data = _dataset(tmp_path / "missing")
    (data / "ground_truth" / "bad" / "001_mask.png").unlink()
    assert main(learn_args(tmp_path / "r1", f"x={data}")) == 2
    assert "001.png" in capsys.readouterr().err
    data = _dataset(tmp_path / "sized")
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(data / "ground_truth" / "bad" / "001_mask.png")
    assert main(learn_args(tmp_path / "r2", f"x={data}")) == 2
    err = capsys.readouterr().err
    assert "001_mask.png" in err and "size" in err


def test_wrong_layouts_say_what_was_expected(tmp_path, capsys):
    (tmp_path / "flat").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "flat" / "a.png")
    assert main(learn_args(tmp_path / "run", f"x={tmp_path / 'flat'}")) == 2
    assert "train/good" in capsys.readouterr().err
    assert main(learn_args(tmp_path / "run", "x=elpv:tri")) == 2
    assert "elpv:mono or elpv:poly" in capsys.readouterr().err


def test_hidden_files_are_skipped_and_odd_but_valid_images_are_read(tmp_path):
    data = _dataset(tmp_path / "parts")
    (data / "train" / "good" / "._000.png").write_bytes(b"macOS metadata")
    (data / "train" / "good" / ".thumbs").mkdir()
    Image.new("CMYK", (20, 10), (0, 128, 255, 0)).save(data / "train" / "good" / "cmyk.jpg")
    Image.fromarray(np.array([[40000]], dtype=np.uint16)).save(data / "train" / "good" / "one_pixel_16bit.png")
    from moleflow.data import resolve_task
    from moleflow.validation import validate_tasks

    task = resolve_task(f"parts={data}")
    assert not any(s.name.startswith("good/.") or "/._" in s.name for s in task.train)
    assert validate_tasks([task]) == len(task.train) + len(task.test)
    assert read_image(data / "train" / "good" / "cmyk.jpg").shape == (10, 20, 3)
    assert read_image(data / "train" / "good" / "one_pixel_16bit.png").tolist() == [[[156, 156, 156]]]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    mode=st.sampled_from(["1", "L", "LA", "P", "RGB", "RGBA", "I;16", "I", "F", "CMYK"]),
    width=st.integers(1, 40),
    height=st.integers(1, 40),
    fmt=st.sampled_from(["PNG", "TIFF", "BMP", "JPEG", "WEBP"]),
)
def test_every_image_mode_and_size_reads_as_rgb_uint8(tmp_path, mode, width, height, fmt):
    image = Image.new(mode, (width, height))
    path = tmp_path / f"x.{fmt.lower()}"
    try:
        image.save(path, format=fmt)
    except (OSError, ValueError, KeyError):
        return  # Pillow cannot write this mode in this format: nothing to read
    out = read_image(path)
    assert out.dtype == np.uint8 and out.shape == (height, width, 3)


def test_images_beyond_the_pixel_bound_are_refused_from_the_header(tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    Image.new("L", (3000, 2000)).save(path)
    monkeypatch.setenv("MOLEFLOW_MAX_IMAGE_MEGAPIXELS", "5")
    with pytest.raises(DatasetError, match=r"3000x2000 \(6 megapixels\), more than the limit of 5"):
        read_image(path)
    monkeypatch.setenv("MOLEFLOW_MAX_IMAGE_MEGAPIXELS", "7")
    assert read_image(path, max_side=300).shape == (200, 300, 3)


# ----------------------------------------------------------------------------- run directories


def test_bad_config_values_name_the_key_and_range(tmp_path, capsys):
    for override, expected in (
        ("train.epochs=0", "train.epochs"),
        ("model.backbone.image_size=8", "model.backbone.image_size"),
        ("model.flow.coupling_layers=0", "model.flow.coupling_layers"),
        ("calibration.image_fpr=0.7", "calibration.image_fpr"),
        ("calibration.unknown_margin=0.5", "calibration.unknown_margin"),
    ):
        assert main(["learn", str(tmp_path / "run"), "x=synthetic:disc", "--set", override]) == 2
        assert expected in capsys.readouterr().err
    assert not (tmp_path / "run" / "tasks.json").exists()


def test_corrupt_run_files_are_named(run_copy, capsys):
    (run_copy / "checkpoints" / "tasks" / "disc.safetensors").write_bytes(b"\x00" * 64)
    assert main(["predict", str(run_copy), str(run_copy / "report.md")]) == 2
    assert "disc.safetensors" in capsys.readouterr().err
    (run_copy / "tasks.json").write_text("{ not json")
    assert main(["tasks", str(run_copy)]) == 2
    assert "tasks.json is corrupt" in capsys.readouterr().err


def test_a_base_swapped_in_from_another_run_is_refused(run_copy, tmp_path, capsys):
    other = tmp_path / "other"
    assert main(learn_args(other, "stripes=synthetic:stripes")) == 0  # same config, another base
    shutil.copy(other / "checkpoints" / "base.safetensors", run_copy / "checkpoints" / "base.safetensors")
    assert main(["tasks", str(run_copy)]) == 0  # the index alone still reads
    with pytest.raises(Exception, match="belongs to another run"):
        Detector.load(run_copy)


def test_a_lost_router_file_is_rebuilt_from_the_product_files(run_copy, tiny_run):
    (run_copy / "checkpoints" / "router.safetensors").unlink()
    image = np.asarray(Image.open(tiny_run / "figures" / "examples_disc.png").convert("RGB"))[:64, :64]
    assert Detector.load(run_copy).predict(image)[0].score == Detector.load(tiny_run).predict(image)[0].score


def test_changed_scoring_settings_are_refused_until_recalibrated(run_copy, capsys):
    config = run_copy / "config.yaml"
    config.write_text(config.read_text().replace("top_k: 3", "top_k: 5"))
    assert main(["predict", str(run_copy), str(run_copy / "report.md")]) == 2
    assert "calibrated under other scoring settings" in capsys.readouterr().err
    assert main(["calibrate", str(run_copy), "disc", "--no-eval"]) == 0  # on its held-out images again
    assert main(["calibrate", str(run_copy), "stripes", "--no-eval"]) == 0
    assert Detector.load(run_copy).records["disc"].calibration.scoring["top_k"] == 5


@pytest.mark.parametrize("failure", [errno.ENOSPC, errno.EROFS])
def test_a_failing_disk_leaves_the_run_as_it_was(run_copy, capsys, monkeypatch, failure):
    import tempfile

    def state() -> dict:  # the run's files; logs record what happened, failures included
        return {
            p: p.read_bytes() for p in run_copy.rglob("*") if p.is_file() and "logs" not in p.parts and p.suffix != ".log"
        }

    before = state()
    real = tempfile.mkstemp
    calls = {"n": 0}

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] >= 2:  # the first write succeeds, the next one finds the disk full / read-only
            raise OSError(failure, os.strerror(failure), kwargs.get("dir", "?"))
        return real(*args, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", failing)
    assert main(learn_args(run_copy, "dots=synthetic:dots")) == 2
    err = capsys.readouterr().err
    assert ("no space left" if failure == errno.ENOSPC else "read-only") in err and "Traceback" not in err
    monkeypatch.undo()
    after = state()
    assert {p: after.get(p) for p in before} == before  # nothing that was there changed
    assert Detector.load(run_copy).products == ["stripes", "disc"]


def test_out_that_is_a_file_or_below_a_file(tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    for out in (tmp_path / "afile", tmp_path / "afile" / "run"):
        assert main(learn_args(out, "x=synthetic:disc")) == 2
        err = capsys.readouterr().err
        assert "afile" in err and "Traceback" not in err


def test_runs_are_readable_by_others_under_a_permissive_umask(tmp_path):
    old = os.umask(0o022)
    try:
        assert main(learn_args(tmp_path / "run", "x=synthetic:disc", extra=("--eval", "none"))) == 0
    finally:
        os.umask(old)
    for path in (tmp_path / "run").rglob("*"):
        if path.is_file() and path.name != ".lock":
            assert path.stat().st_mode & 0o044 == 0o044, path  # group and others may read
    assert json.loads((tmp_path / "run" / "tasks.json").read_text())["tasks"][0]["name"] == "x"


def test_a_corrupt_visa_split_file_is_named(tmp_path, capsys):
    (tmp_path / "visa" / "split_csv").mkdir(parents=True)
    (tmp_path / "visa" / "split_csv" / "1cls.csv").write_bytes(b"\xff\xfe\x00garbage\x00\x81")
    assert (
        main(["train", "offline", "--data", str(tmp_path / "visa"), "--tasks", "candle", "--out", str(tmp_path / "r")]) == 2
    )
    assert "1cls.csv" in capsys.readouterr().err


@pytest.mark.slow
def test_predict_on_a_huge_image_stays_within_bounded_memory(tiny_run, tmp_path):
    """Decoding dominates: a 49-megapixel JPEG is decoded at a quarter of its size, the map is capped."""
    import subprocess
    import sys

    small, big = tmp_path / "small.jpg", tmp_path / "big.jpg"
    Image.fromarray(RNG.integers(0, 256, (256, 256, 3), dtype=np.uint8)).save(small, quality=80)
    Image.new("RGB", (7000, 7000), (120, 130, 140)).save(big, quality=80)
    code = (
        "import resource, sys; from moleflow.cli import main; "
        "code = main(['predict', sys.argv[1], sys.argv[2], '--out', sys.argv[3]]); "
        "print('RSS', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); sys.exit(code)"
    )
    rss = {}
    for image in (small, big):
        done = subprocess.run(
            [sys.executable, "-c", code, str(tiny_run), str(image), str(tmp_path / image.stem)],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr
        rss[image.stem] = int(done.stdout.split("RSS")[-1]) * 1024
    assert rss["big"] - rss["small"] < 400e6  # a full-size decode alone would be 147 MB, its map 196 MB
    row = json.loads((tmp_path / "big" / "predictions.json").read_text())[0]
    assert row["image_size"] == [7000, 7000] and row["map_size"] == [2048, 2048]
