"""Names fcx did not choose (file names, class names) never drive the terminal, and one bad image file or a
looping folder never ends or stalls a prediction run."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import invoke, save_png
from PIL import Image
from torch import nn

import fcexport
import fcexport.preprocess as preprocess

CLEAR_SCREEN = "\x1b[2J"
FORGED_ROW = "two\nshirt   99.9%  fake.png"


@pytest.fixture
def hostile_files(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in (f"{CLEAR_SCREEN}x.png", f"{FORGED_ROW}.png", "plain.png"):
        save_png(folder / name, rng.integers(0, 255, (8, 8), dtype=np.uint8))
    return folder


def test_control_characters_in_file_names_are_shown_escaped(exported_dir, hostile_files, runner):
    r = invoke(runner, "predict", hostile_files, "--artifacts", exported_dir)
    assert r.exit_code == 0, r.output
    assert "\x1b" not in r.stdout and "\\x1b[2Jx.png" in r.stdout
    assert "two\\nshirt" in r.stdout and not any(line.startswith("shirt") for line in r.stdout.splitlines())
    assert len(r.stdout.strip().splitlines()) == 2 + 3, r.stdout  # the model line, the header, one line per file


def test_json_keeps_names_exact(exported_dir, hostile_files, runner):
    r = invoke(runner, "predict", hostile_files, "--artifacts", exported_dir, "--json")
    files = {row["file"].rsplit("/", 1)[1] for row in json.loads(r.stdout)}
    assert files == {f"{CLEAR_SCREEN}x.png", f"{FORGED_ROW}.png", "plain.png"}


def test_control_characters_in_class_names_and_error_lines_are_escaped(tmp_path, runner):
    fcexport.import_model(nn.Sequential(nn.Flatten(), nn.Linear(64, 2)), (1, 8, 8),
                          class_names=[f"{CLEAR_SCREEN}cleared", "\u202eright-to-left"], artifacts=tmp_path)
    image = save_png(tmp_path / "x.png", np.zeros((8, 8), np.uint8))
    missing = tmp_path / "gone\x07\x1b.png"  # a bell and an escape (no brackets: they would make it a glob pattern)
    r = invoke(runner, "predict", image, missing, "--artifacts", tmp_path)
    assert r.exit_code == 2
    shown = r.stdout + r.stderr
    assert "\x1b" not in shown and "\u202e" not in shown and "\x07" not in shown
    assert "\\x1b[2Jcleared" in r.stdout or "\\u202eright-to-left" in r.stdout
    assert "gone\\x07\\x1b.png" in r.stderr


def test_a_nan_tiff_is_one_error_row_and_the_others_are_classified(exported_dir, tmp_path, runner):
    folder = tmp_path / "mixed"
    folder.mkdir()
    for i in range(6):
        save_png(folder / f"good{i}.png", np.random.default_rng(i).integers(0, 255, (8, 8), dtype=np.uint8))
    pixels = np.full((16, 16), 0.5, np.float32)
    pixels[3, 3] = np.nan
    Image.fromarray(pixels, mode="F").save(folder / "nan.tif")
    r = invoke(runner, "predict", folder, "--artifacts", exported_dir, "--jsonl")
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert r.exit_code == 2 and len(rows) == 7
    assert [row["file"].endswith("nan.tif") for row in rows if "error" in row] == [True]
    assert "NaN" in next(row["error"] for row in rows if "error" in row)


def test_any_failure_preparing_one_file_is_that_files_error(exported_dir, tmp_path, runner, monkeypatch):
    real = preprocess.prepare_image
    folder = tmp_path / "two"
    folder.mkdir()
    for name in ("a.png", "b.png"):
        save_png(folder / name, np.zeros((8, 8), np.uint8))

    def odd_decoder(path, *args):
        if str(path).endswith("a.png"):
            raise ZeroDivisionError("a decoder bug on this one file")
        return real(path, *args)

    monkeypatch.setattr("fcexport.classify.prepare_image", odd_decoder)
    r = invoke(runner, "predict", folder, "--artifacts", exported_dir, "--jsonl")
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert r.exit_code == 2 and "ZeroDivisionError" in rows[0]["error"] and "label" in rows[1]


def test_symlink_loops_do_not_make_a_listing_endless(exported_dir, tmp_path, runner, monkeypatch):
    loops = tmp_path / "loops"
    loops.mkdir()
    save_png(loops / "x.png", np.zeros((8, 8), np.uint8))
    (loops / "up").symlink_to("..")
    (loops / "here").symlink_to(".")
    r = invoke(runner, "predict", f"{loops}/*/*/*.png", f"{loops}/**/*.png", loops, "--artifacts", exported_dir, "--jsonl")
    assert r.exit_code == 0, r.output
    assert 3 <= len(r.stdout.splitlines()) < 20
    monkeypatch.setattr(preprocess, "MAX_MATCHES", 1)
    for _ in range(3):
        r = invoke(runner, "predict", f"{loops}/*/*/*.png", "--artifacts", exported_dir)
        assert r.exit_code == 2 and "names more than 1 files" in r.stderr


def test_a_pattern_through_loops_that_matches_nothing_ends(exported_dir, tmp_path, runner):
    """Ten links to `.`: eight wildcard levels are 10^8 folders for glob; fcx stops at MAX_FOLDERS."""
    import time

    dense = tmp_path / "dense"
    dense.mkdir()
    for i in range(10):
        (dense / f"l{i}").symlink_to(".")
    started = time.perf_counter()
    r = invoke(runner, "predict", f"{dense}/*/*/*/*/*/*/*/*/zzz.png", "--artifacts", exported_dir)
    assert r.exit_code == 2 and f"reads more than {preprocess.MAX_FOLDERS:,} folders" in r.stderr
    assert time.perf_counter() - started < 30
