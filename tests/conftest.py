"""Shared fixtures: small datasets written in real formats (IDX, CSV, PNG folders) and a tiny trained model.

Nothing here touches the network or ../shared: every file is made by the tests.
"""

from __future__ import annotations

import cli  # noqa: F401  (first: it sets torch's thread settings as fcx runs them, before anything loads torch)
import shutil
from pathlib import Path

import pytest
from helpers import TINY, invoke, save_png, synthetic_images, write_idx
from typer.testing import CliRunner


@pytest.fixture(scope="session")
def idx_root(tmp_path_factory) -> Path:
    """A torchvision-layout FashionMNIST folder (raw IDX files) with 300 train and 100 test images."""
    root = tmp_path_factory.mktemp("idx")
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix, n, seed in (("train", 300, 0), ("t10k", 100, 1)):
        images, labels = synthetic_images(n, seed=seed)
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
    return root


@pytest.fixture(scope="session")
def csv_file(tmp_path_factory) -> Path:
    """A Kaggle-style CSV with a header: label, pixel1..pixel784."""
    images, labels = synthetic_images(120, classes=4, seed=2)
    path = tmp_path_factory.mktemp("csv") / "fashion.csv"
    rows = ["label," + ",".join(f"pixel{i}" for i in range(1, 785))]
    rows += [f"{lab}," + ",".join(map(str, img.ravel())) for img, lab in zip(images, labels, strict=True)]
    path.write_text("\n".join(rows) + "\n")
    return path


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory) -> Path:
    """Class sub-folders of 28x28 grayscale PNGs."""
    root = tmp_path_factory.mktemp("folder") / "shapes"
    images, labels = synthetic_images(60, classes=3, seed=3)
    for i, (img, lab) in enumerate(zip(images, labels, strict=True)):
        save_png(root / f"class{lab}" / f"{i}.png", img)
    return root


@pytest.fixture(scope="session")
def runner() -> CliRunner:
    return CliRunner()


@pytest.fixture(scope="session")
def trained_dir(tmp_path_factory, runner) -> Path:
    """model.pt from a tiny MLP-BN trained on scikit-learn's digits through the CLI."""
    out = tmp_path_factory.mktemp("trained")
    result = invoke(runner, "train", "--data", "digits", *TINY, "--artifacts", out)
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="session")
def exported_dir(tmp_path_factory, trained_dir, runner) -> Path:
    """model.pt + model.fused.pt + model.ts + model.onnx + manifest.json."""
    out = tmp_path_factory.mktemp("exported")
    shutil.copy(trained_dir / "model.pt", out / "model.pt")
    for args in (("fuse-bn", "--artifacts", out), ("export", "--artifacts", out)):
        result = invoke(runner, *args)
        assert result.exit_code == 0, result.output
    return out


@pytest.fixture
def artifacts_copy(tmp_path, exported_dir) -> Path:
    """A private copy of the exported folder, for tests that damage or rewrite files."""
    return Path(shutil.copytree(exported_dir, tmp_path / "artifacts"))


@pytest.fixture(scope="session")
def int8_dir(tmp_path_factory, exported_dir, runner) -> Path:
    """exported_dir plus model.int8.onnx, from `fcx export --int8`."""
    out = Path(shutil.copytree(exported_dir, tmp_path_factory.mktemp("int8") / "artifacts"))
    result = invoke(runner, "export", "--int8", "--artifacts", out)
    assert result.exit_code == 0, result.output
    assert "pre-processing" not in result.stderr  # the quantizer's hint is filtered out
    return out


@pytest.fixture(autouse=True, scope="session")
def private_speed_cache(tmp_path_factory):
    """`fcx bench` records speeds for predict's runtime choice in the user's cache: keep the tests' out of it."""
    patch = pytest.MonkeyPatch()
    patch.setenv("FCX_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
    yield
    patch.undo()
