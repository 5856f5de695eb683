"""`fcx predict` on real image files of every kind, and `fcx bench` (no timing assertions)."""

import io
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from helpers import bounded, invoke, save_png

from fcexport.data import load_dataset
from fcexport.preprocess import border_is_light, load_image


@pytest.fixture(scope="module")
def digit():
    """A real digits test image (8x8, [0, 1]) and its label."""
    ds = load_dataset("digits")
    return ds.test.images[0, 0].numpy(), ds.class_names[int(ds.test.labels[0])]


def to_u8(a: np.ndarray) -> np.ndarray:
    return (a * 255).round().astype(np.uint8)


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory, digit):
    """The same digit as gray 8x8, large RGB on white, RGBA, and 16-bit gray."""
    from PIL import Image

    pixels = digit[0]
    folder = tmp_path_factory.mktemp("images")
    save_png(folder / "gray.png", to_u8(pixels))
    big = np.kron(1.0 - pixels, np.ones((60, 60)))  # dark digit on white, 480x480
    pad = np.ones((480, 160))
    rgb = np.repeat(to_u8(np.hstack([pad, big, pad]))[..., None], 3, axis=2)  # 480x800, not square
    save_png(folder / "photo.png", rgb)
    Image.fromarray(rgb).save(folder / "photo.jpg", quality=95)
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., :3] = 0
    rgba[..., 3] = to_u8(pixels)  # a black digit drawn through alpha on transparency
    save_png(folder / "alpha.png", rgba)
    save_png(folder / "deep.png", (pixels * 65535).round().astype(np.uint16))
    return folder


def test_gray_image_round_trips_exactly(image_dir, digit):
    np.testing.assert_allclose(load_image(image_dir / "gray.png", (8, 8)), digit[0], atol=1 / 255)


@pytest.mark.parametrize("name", ["photo.png", "photo.jpg", "alpha.png", "deep.png"])
def test_every_kind_of_file_becomes_a_light_object_on_dark(image_dir, digit, name):
    x = load_image(image_dir / name, (8, 8))
    assert x.shape == (8, 8) and x.dtype == np.float32 and not border_is_light(x)
    assert np.corrcoef(x.ravel(), digit[0].ravel())[0, 1] > 0.75, name


def test_invert_choices(image_dir, digit, tmp_path):
    """auto reads the background; yes = dark object on light, no = light object on dark."""
    def corr(x):
        return np.corrcoef(x.ravel(), digit[0].ravel())[0, 1]

    light_photo = image_dir / "photo.png"  # dark digit on white
    dark_photo = save_png(tmp_path / "night.png", to_u8(np.pad(np.kron(digit[0], np.ones((60, 60))), 80)))  # light on black
    assert corr(load_image(light_photo, (8, 8), "auto")) > 0.75 and corr(load_image(light_photo, (8, 8), "yes")) > 0.75
    assert corr(load_image(dark_photo, (8, 8), "auto")) > 0.75 and corr(load_image(dark_photo, (8, 8), "no")) > 0.75
    wrong = load_image(light_photo, (8, 8), "no")  # told the wrong way round, it finds no object (all black) or noise
    assert not wrong.any() or corr(wrong) < 0.5
    forced = load_image(image_dir / "gray.png", (8, 8), "yes")  # dataset-sized files: yes/no invert or not
    assert forced.mean() > 0.5


def test_each_model_format_gives_the_same_top1(exported_dir, image_dir, runner):
    answers = {}
    for name in ("model.onnx", "model.ts", "model.pt2", "model.fused.pt", "model.pt"):
        r = invoke(runner, "predict", image_dir, "--model", exported_dir / name, "--json")
        assert r.exit_code == 0, r.output
        answers[name] = [row["label"] for row in json.loads(r.stdout)]
    assert len(set(map(tuple, answers.values()))) == 1 and len(answers["model.onnx"]) == 5


def test_json_schema_top_k_order_and_sums(exported_dir, image_dir, runner):
    r = invoke(runner, "predict", image_dir / "gray.png", image_dir / "photo.png", "--artifacts", exported_dir, "--top-k", "10", "--json")
    assert r.exit_code == 0, r.output
    rows = json.loads(r.stdout)
    assert [row["file"] for row in rows] == [str(image_dir / "gray.png"), str(image_dir / "photo.png")]
    for row in rows:
        assert set(row) == {"file", "label", "index", "probability", "top"}
        probs = [t["probability"] for t in row["top"]]
        assert probs == sorted(probs, reverse=True) and sum(probs) == pytest.approx(1.0)
        assert row["top"][0] == {"label": row["label"], "probability": row["probability"]}
        assert all(set(t) == {"label", "probability"} for t in row["top"])


def test_default_model_is_onnx_and_is_named(exported_dir, image_dir, runner):
    r = invoke(runner, "predict", str(image_dir / "*.png"), "--artifacts", exported_dir)
    assert r.exit_code == 0, r.output
    assert "model.onnx (onnxruntime" in r.stdout or "model.onnx (openvino" in r.stdout  # the faster here (test_targets)
    assert "gray.png" in r.stdout and "photo.jpg" not in r.stdout


HEAVY = {"torch", "onnx", "onnxruntime", "openvino", "PIL", "pydantic", "transformers", "timm", "torchvision",
         "rich"}  # rich's tables: about 45 ms; predict prints plain lines


def _imported_by(argv: list[str]) -> set[str]:
    """The top-level packages a fresh process has imported after running `fcx ARGV` (start-up is what it imports)."""
    code = ("import sys\nfrom cli.main import main\nsys.argv = ['fcx'] + sys.argv[1:]\ntry:\n    main()\nexcept SystemExit as e:\n"
            "    assert not e.code, e.code\nsys.stderr.write('MODULES ' + ' '.join(sorted(sys.modules)))\n")
    done = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, preexec_fn=bounded())
    assert done.returncode == 0 and "MODULES " in done.stderr, done.stderr[-2000:]  # the command succeeded
    return {name.split(".")[0] for name in done.stderr.split("MODULES ")[-1].split()}


def test_help_imports_no_runtime_and_predict_on_onnx_only_its_own(artifacts_copy, image_dir, tmp_path, monkeypatch):
    """Start-up, counted by imports rather than timed: `fcx --help` loads no model library at all, and predict on
    model.onnx with onnxruntime loads onnxruntime (and onnx, which checks the file the first time), never torch or
    OpenVINO; the same bytes again go straight to onnxruntime, and bytes changed since are checked again."""
    monkeypatch.setenv("FCX_CACHE_DIR", str(tmp_path / "cache"))  # nothing checked before
    helped = _imported_by(["--help"])
    assert "cli" in helped and not helped & HEAVY, helped & HEAVY
    argv = ["predict", str(image_dir / "gray.png"), "--artifacts", str(artifacts_copy), "--runtime", "onnxruntime"]
    loaded = _imported_by(argv)
    assert {"onnxruntime", "onnx", "PIL"} <= loaded and not loaded & (HEAVY - {"onnxruntime", "onnx", "PIL"}), loaded & HEAVY
    again = _imported_by(argv)
    assert {"onnxruntime", "PIL"} <= again and not again & (HEAVY - {"onnxruntime", "PIL"}), again & HEAVY

    import onnx

    from fcexport.artifacts import record_in_manifest

    model = onnx.load(str(artifacts_copy / "model.onnx"))
    model.doc_string = "re-exported"  # other bytes, a refreshed manifest: checked like a file never seen
    (artifacts_copy / "model.onnx").write_bytes(model.SerializeToString())
    source = json.loads((artifacts_copy / "manifest.json").read_text())["files"]["model.onnx"]["source_sha256"]
    record_in_manifest(artifacts_copy, {"model.onnx": source}, {}, "changed")
    assert "onnx" in _imported_by(argv)


def test_a_file_checked_before_is_checked_again_with_fcx_fresh(exported_dir, image_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("FCX_CACHE_DIR", str(tmp_path / "cache"))
    argv = ["predict", str(image_dir / "gray.png"), "--artifacts", str(exported_dir), "--runtime", "onnxruntime"]
    assert "onnx" in _imported_by(argv)
    monkeypatch.setenv("FCX_FRESH", "1")
    assert "onnx" in _imported_by(argv)


def test_bench_runs_every_backend_with_tiny_counts(int8_dir, runner):
    r = invoke(runner, "bench", "--artifacts", int8_dir, "--batch-sizes", "1,3", "--warmup", "1", "--repeat", "2", "--json")
    assert r.exit_code == 0, r.output
    rows = json.loads(r.stdout)
    skipped = [row for row in rows if row["status"] == "skipped"]
    not_made = {"aoti", "aoti-cuda", "onnxruntime-int8-static", "openvino-int8-static"}  # opt-in files not made here
    # (tests/test_int8_static.py), and the CUDA package runs on cuda only
    assert all(row["backend"] == "openvino-bf16" and "cannot compute in bf16" in row["reason"]  # a CPU without bf16
               or row["backend"] in not_made for row in skipped)
    assert {(row["backend"], row["batch_size"]) for row in rows if row["status"] == "ok"} == {
        (b, n) for b in ("eager", "fused", "torchscript", "pt2", "onnxruntime", "onnxruntime-int8", "openvino", "openvino-bf16")
        for n in (1, 3) if b not in {r["backend"] for r in skipped}
    }
    for row in (r for r in rows if r["status"] == "ok"):
        assert set(row) >= {"backend", "device", "batch_size", "p50_ms", "p90_ms", "throughput"}
        assert 0 < row["p50_ms"] <= row["p90_ms"] and row["throughput"] > 0


def test_bench_table(exported_dir, runner):
    r = invoke(runner, "bench", "--artifacts", exported_dir, "--batch-sizes", "2", "--warmup", "0", "--repeat", "1", "--backends", "onnxruntime")
    assert r.exit_code == 0, r.output
    assert "onnxruntime" in r.stdout and "p50" in r.stdout


def test_predicting_1000_photos_streams_in_bounded_batches(exported_dir, image_dir, tmp_path):
    """1,000 photos (64x64, prepared through the photo path): decoded and scored 256 at a time, so peak
    memory does not grow with the folder (tests/test_photos.py checks 300 vs 3,000 files too)."""
    import shutil
    import tracemalloc

    from fcexport.artifacts import find_default_model
    from fcexport.registry import open_predictor
    from fcexport.classify import BATCH_SIZE, predict_files

    folder = tmp_path / "many"
    folder.mkdir()
    source = save_png(tmp_path / "one.png", np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8))
    for i in range(1_000):
        shutil.copyfile(source, folder / f"{i:05d}.png")
    import dataclasses

    predictor = open_predictor(find_default_model(exported_dir))
    batch_sizes = []
    predictor = dataclasses.replace(predictor, run=lambda x, run=predictor.run: batch_sizes.append(len(x)) or run(x))
    tracemalloc.start()
    count = sum(1 for _ in predict_files(predictor, [str(folder)]))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert count == 1_000 and max(batch_sizes) == BATCH_SIZE and sum(batch_sizes) == 1_000
    # decoding all 1,000 64x64 RGB images up front would hold >= 46 MiB of float32 pixels
    assert peak < 20 * 2**20, f"peak {peak / 2**20:.1f} MiB"


def test_object_fill_is_measured_and_used_like_mnist_20_in_28(tmp_path):
    """MNIST digits fill a 20x20 box of a 28x28 frame; a big photo is fitted to that same share."""
    from fcexport.preprocess import object_extent, object_fill

    frames = np.zeros((5, 28, 28), np.float32)
    frames[:, 4:24, 6:22] = 1.0  # 20 rows tall: the longest side fills 20/28
    fill = object_fill(frames)
    assert fill == pytest.approx(20 / 28)
    photo = np.full((500, 700), 255, np.uint8)
    photo[100:400, 200:350] = 0  # a dark 300x150 object on white, off-centre
    x = load_image(save_png(tmp_path / "photo.png", photo), (28, 28), "auto", fill)
    rows, cols = object_extent(x)
    assert rows.stop - rows.start == 20 and cols.stop - cols.start == 10  # aspect kept, fitted to 20 px
    assert abs((rows.start + rows.stop) / 2 - 14) <= 1 and abs((cols.start + cols.stop) / 2 - 14) <= 1  # centred


def test_predict_with_the_int8_model(int8_dir, image_dir, runner):
    r = invoke(runner, "predict", image_dir / "gray.png", "--model", int8_dir / "model.int8.onnx")
    assert r.exit_code == 0, r.output
    assert "model.int8.onnx (onnxruntime-int8, cpu)" in r.stdout


def test_bench_lists_a_missing_int8_model_as_skipped(exported_dir, runner):
    r = invoke(runner, "bench", "--artifacts", exported_dir, "--batch-sizes", "1", "--warmup", "0", "--repeat", "1",
               "--backends", "onnxruntime-int8", "--json")
    assert r.exit_code == 0, r.output
    assert "fcx export --int8" in json.loads(r.stdout)[0]["hint"]


@pytest.mark.parametrize("ms, shown", [(0.0853, "85.3 us"), (12.44, "12.4 ms"), (1103.7, "1.10 s")])
def test_times_print_in_the_unit_that_fits(ms, shown):
    from cli.render import duration

    assert duration(ms) == shown


def test_cli_annotations_are_objects_not_strings():
    """typer reads every command's annotations on each start; written as strings (`from __future__ import
    annotations`), each one is compiled and evaluated again every run: that was most of `fcx --help`'s start-up."""
    import inspect

    from cli.main import app

    for command in app.registered_commands:
        function = inspect.unwrap(command.callback)
        strings = [name for name, p in inspect.signature(function).parameters.items() if isinstance(p.annotation, str)]
        assert not strings, (function.__name__, strings)


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_plain_lines_are_styled_on_a_colour_terminal_only(monkeypatch):
    """predict's lines (cli.lines, no rich): ANSI style on a terminal, none when piped, with NO_COLOR or TERM=dumb."""
    from cli.lines import line

    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.setenv("TERM", "xterm")
    terminal, piped = _Terminal(), io.StringIO()
    line("FAIL", "red", terminal)
    line("FAIL", "red", piped)
    assert terminal.getvalue() == "\x1b[31mFAIL\x1b[0m\n" and piped.getvalue() == "FAIL\n"
    for name, value in (("NO_COLOR", "1"), ("TERM", "dumb")):
        with monkeypatch.context() as m:
            m.setenv(name, value)
            plain = _Terminal()
            line("FAIL", "red", plain)
            assert plain.getvalue() == "FAIL\n"


@pytest.mark.parametrize("own", [None, "300000"])
def test_fcx_lets_torch_threads_sleep_soon_unless_the_user_says_otherwise(own):
    """fcx sets GOMP_SPINCOUNT before torch loads (cli/__init__.py: long spins cost 3-18x on a shared machine), and a
    user's own setting is kept."""
    import os

    env = {k: v for k, v in os.environ.items() if k != "GOMP_SPINCOUNT"} | ({"GOMP_SPINCOUNT": own} if own else {})
    code = "import cli.main, os, torch\nprint(os.environ['GOMP_SPINCOUNT'], 'torch' in __import__('sys').modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, preexec_fn=bounded())
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == [own or "10000", "True"]


def test_fcx_fresh_export_checks_its_onnx_file_once(trained_dir, tmp_path, monkeypatch):
    """FCX_FRESH=1 recalls nothing from earlier commands, but within one export the model.onnx checked as it is
    written is not checked again by the loads that follow."""
    from fcexport import export, onnx_checks

    monkeypatch.setenv("FCX_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("FCX_FRESH", "1")
    checked = []
    real = onnx_checks._check_inferred_sizes
    monkeypatch.setattr(onnx_checks, "_check_inferred_sizes", lambda *a: checked.append(1) or real(*a))
    shutil.copy(trained_dir / "model.pt", tmp_path / "model.pt")
    for _ in range(2):
        export(tmp_path / "model.pt", tmp_path, formats=("onnx",))
    assert len(checked) == 2  # once per command
