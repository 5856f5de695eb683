"""`fcx train` end to end through the CLI, plus the checkpoint contract."""

import json

import pytest
import torch

from fcexport.checkpoint import load_model
from fcexport.errors import FcxError
from fcexport.training import TrainOptions, augment

from helpers import TINY, invoke


def test_train_writes_every_artifact(trained_dir):
    for name in ("model.pt", "metrics.json", "history.csv", "curves.png", "confusion.png"):
        assert (trained_dir / name).stat().st_size > 0, name
    metrics = json.loads((trained_dir / "metrics.json").read_text())
    assert metrics["epochs_run"] == 3 and 1 <= metrics["best_epoch"] <= 3
    assert metrics["test_accuracy"] > 0.5  # 10 classes: chance is 0.1
    lines = (trained_dir / "history.csv").read_text().splitlines()
    assert lines[0].startswith("epoch,train_loss,train_accuracy,val_loss,val_accuracy") and len(lines) == 4
    assert (trained_dir / "curves.png").read_bytes()[:4] == b"\x89PNG"


def test_checkpoint_is_plain_and_self_describing(trained_dir):
    raw = torch.load(trained_dir / "model.pt", weights_only=True)
    assert raw["format"] == "fcexport.checkpoint" and set(raw) == {"format", "format_version", "spec", "program", "tensors"}
    spec = json.loads(raw["spec"])
    assert spec["class_names"] == [str(i) for i in range(10)] and spec["input_shape"] == [1, 8, 8]
    assert set(spec["normalization"]) == {"mean", "std"}
    assert spec["dataset"]["source"] == "digits"
    assert spec["architecture"]["hidden"] == [32] and spec["architecture"]["batchnorm"] is True
    assert spec["architecture"]["kind"] == "mlp"
    program = json.loads(raw["program"])
    linears = [n for n in program["nodes"] if n["op"] == "aten.linear.default"]
    assert [(n["layer"], n["layer_type"]) for n in linears] == [("fc1", "Linear"), ("head", "Linear")]
    assert program["tensors"]["fc1.weight"] == {"dtype": "float32", "shape": [32, 64]}
    assert raw["tensors"]["fc1.weight"].shape == (32, 64)
    model, _ = load_model(trained_dir / "model.pt")
    assert model(torch.rand(2, 1, 8, 8)).shape == (2, 10)


def test_same_seed_same_metrics(tmp_path, runner):
    results = []
    for name in ("a", "b"):
        r = invoke(runner, "train", "--data", "digits", *TINY, "--seed", "3", "--artifacts", tmp_path / name, "--json")
        assert r.exit_code == 0, r.output
        results.append(json.loads(r.stdout))
    for key in ("test_accuracy", "test_loss", "val_accuracy", "best_epoch"):
        assert results[0][key] == results[1][key]
    a = torch.load(tmp_path / "a" / "model.pt", weights_only=True)["tensors"]
    b = torch.load(tmp_path / "b" / "model.pt", weights_only=True)["tensors"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_train_on_idx_files_with_each_optimizer(tmp_path, runner, idx_root):
    for optimizer in ("sgd", "momentum", "rmsprop", "adam", "adamw"):
        r = invoke(runner, "train", "--data-root", idx_root, "--optimizer", optimizer, *TINY, "--artifacts", tmp_path / optimizer, "--json")
        assert r.exit_code == 0, r.output
        assert json.loads(r.stdout)["test_accuracy"] > 0.3, optimizer


def test_softmax_regression_and_csv(tmp_path, runner, csv_file):
    r = invoke(runner, "train", "--data", csv_file, "--model", "softmax", "--epochs", "5", "--artifacts", tmp_path, "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["parameters"] == 784 * 4 + 4


def test_kfold_reports_mean_and_std(tmp_path, runner, image_folder):
    r = invoke(runner, "train", "--data", image_folder, *TINY, "--folds", "3", "--artifacts", tmp_path, "--json")
    assert r.exit_code == 0, r.output
    cv = json.loads(r.stdout)["cross_validation"]
    assert cv["folds"] == 3 and len(cv["fold_val_accuracy"]) == 3
    assert cv["mean_val_accuracy"] == pytest.approx(sum(cv["fold_val_accuracy"]) / 3)
    assert cv["fold_val_accuracy"][cv["kept_fold"] - 1] == max(cv["fold_val_accuracy"])


def test_progress_table_is_shown_without_quiet(tmp_path, runner):
    r = invoke(runner, "train", "--data", "digits", "--hidden", "16", "--epochs", "2", "--artifacts", tmp_path)
    assert r.exit_code == 0, r.output
    assert "test accuracy" in r.stdout and "samples/s" in r.stderr


def test_missing_dataset_offline_exits_2_with_where_to_put_it(tmp_path, runner, monkeypatch):
    import torchvision.datasets.utils as tv_utils

    def no_network(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(tv_utils, "download_url", no_network)
    r = invoke(runner, "train", "--data-root", tmp_path / "nowhere" / "data", "--artifacts", tmp_path / "out")
    assert r.exit_code == 2
    assert "FashionMNIST/raw" in r.stderr and "--data digits" in r.stderr and "Traceback" not in r.output
    assert not list(tmp_path.iterdir())  # neither the artifacts folder nor any folder of the data root is left behind


def test_bad_csv_exits_2_naming_file_and_line(tmp_path, runner):
    bad = tmp_path / "bad.csv"
    bad.write_text("1,0,0,0,0\n2,0,0,0\n")
    r = invoke(runner, "train", "--data", bad, "--artifacts", tmp_path / "out")
    assert r.exit_code == 2 and f"{bad}: line 2" in r.stderr


@pytest.mark.parametrize(
    "option, value", [("--epochs", "-1"), ("--batch-size", "0"), ("--val-split", "1.5"), ("--lr", "-0.1"), ("--optimizer", "lbfgs")]
)
def test_out_of_range_options_exit_2(tmp_path, runner, option, value):
    r = invoke(runner, "train", "--data", "digits", option, value, "--artifacts", tmp_path)
    assert r.exit_code == 2 and option[2:].replace("-", " ") in r.stderr
    assert not (tmp_path / "model.pt").exists()


def test_pickle_payload_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / "evil.pt"
    torch.save({"format": "fcexport.checkpoint", "payload": Payload()}, path, pickle_protocol=2)
    with pytest.raises(FcxError, match="refused"):
        load_model(path)
    assert not marker.exists()


def test_augment_flips_and_shifts_keep_shape_and_mass():
    x = torch.zeros(64, 1, 8, 8)
    x[:, :, 3:5, 0:2] = 1.0
    out = augment(x, torch.Generator().manual_seed(0), flip=True, shift=1)
    assert out.shape == x.shape
    assert (out[:, :, :, -3:].sum((1, 2, 3)) > 0).any()  # some images were mirrored to the right edge
    assert torch.all(out.sum((1, 2, 3)) <= x.sum((1, 2, 3)))  # shifting only drops pixels at the edge


def test_train_options_validation():
    with pytest.raises(FcxError, match="folds must be"):
        TrainOptions(folds=1).validate()
