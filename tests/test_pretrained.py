"""Models as the ecosystem ships them: a Hugging Face folder (save_pretrained), safetensors weights, a timm model's
own pretrained_cfg; each imports with what it says about itself, and hostile safetensors files are refused."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import invoke
from test_hostile import run_limited
from test_import import write_course_model

transformers = pytest.importorskip("transformers")

CLASSES = {0: "cat", 1: "dog", 2: "bird"}
FAMILIES = {  # small configs of three families: a CNN with BatchNorm, a ViT, a ConvNeXt
    "MobileNetV2ForImageClassification": {"image_size": 32, "depth_multiplier": 0.35},
    "ViTForImageClassification": {"image_size": 32, "patch_size": 8, "hidden_size": 32, "num_hidden_layers": 2,
                                  "num_attention_heads": 2, "intermediate_size": 64},
    "ConvNextForImageClassification": {"image_size": 32, "hidden_sizes": [16, 32], "depths": [1, 1], "num_stages": 2},
}


def save_pretrained(folder: Path, name: str, **preprocessor) -> Path:
    """A folder as `model.save_pretrained` and `processor.save_pretrained` write it: random weights, safetensors."""
    cls = getattr(transformers, name)
    torch.manual_seed(0)
    model = cls(cls.config_class(num_labels=3, id2label=CLASSES, label2id={v: k for k, v in CLASSES.items()}, **FAMILIES[name]))
    for module in model.modules():  # BatchNorm statistics that folding must carry
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    model.eval().save_pretrained(folder)
    transformers.ViTImageProcessor(**{"size": {"height": 32, "width": 32}, "image_mean": [0.5, 0.4, 0.3],
                                      "image_std": [0.2, 0.25, 0.3], **preprocessor}).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("name", FAMILIES)
def test_a_save_pretrained_folder_imports_with_no_other_flag_and_verifies(name, runner, tmp_path):
    folder = save_pretrained(tmp_path / "model", name)
    assert (folder / "model.safetensors").is_file() and not list(folder.glob("*.bin"))
    art = tmp_path / "art"
    r = invoke(runner, "import", folder, "--artifacts", art)
    assert r.exit_code == 0, r.output
    from fcexport.checkpoint import read_model

    spec = read_model(art / "model.pt").spec
    assert list(spec.class_names) == ["cat", "dog", "bird"] and list(spec.input_shape) == [3, 32, 32]
    assert spec.normalization.mean == pytest.approx([0.5, 0.4, 0.3]) and spec.normalization.std == pytest.approx([0.2, 0.25, 0.3])
    assert spec.architecture.details["transformers"] == name
    for args in (("fuse-bn", "--verify", "--inputs", "64"), ("export", "--format", "onnx"),
                 ("verify", "--backends", "fused,onnxruntime", "--devices", "cpu", "--inputs", "64")):
        r = invoke(runner, *args, "--artifacts", art)
        assert r.exit_code == 0, (args, r.output)


def test_a_folder_without_its_image_processor_imports_and_says_nothing_normalises(runner, tmp_path):
    """save_pretrained of the model alone: no preprocessor_config.json says the normalisation, so fcx imports the
    model on [0, 1] pixels as they are and says so, with what to give; with --mean / --std it says nothing."""
    folder = save_pretrained(tmp_path / "model", "MobileNetV2ForImageClassification")
    (folder / "preprocessor_config.json").unlink()
    r = invoke(runner, "import", folder, "--artifacts", tmp_path / "a")
    assert r.exit_code == 0, r.output
    said = " ".join(r.stderr.split())
    assert "has no preprocessor_config.json" in said and "--mean and --std" in said, r.stderr
    from fcexport.checkpoint import read_model

    assert read_model(tmp_path / "a" / "model.pt").spec.normalization is None
    r = invoke(runner, "import", folder, "--artifacts", tmp_path / "b", "--mean", "0.5", "--std", "0.25")
    assert r.exit_code == 0 and "preprocessor_config.json" not in r.stderr, r.output


def test_the_same_from_python_and_a_live_timm_model_brings_its_own_pretrained_cfg(tmp_path):
    import fcexport

    folder = save_pretrained(tmp_path / "model", "MobileNetV2ForImageClassification", size={"height": 48, "width": 48})
    _, spec = fcexport.load_model(fcexport.import_pretrained(folder, tmp_path / "a"))
    assert list(spec.input_shape) == [3, 48, 48] and list(spec.class_names) == ["cat", "dog", "bird"]
    timm = pytest.importorskip("timm")
    model = timm.create_model("resnet18", pretrained=False, num_classes=4)
    model.pretrained_cfg = {**model.pretrained_cfg, "input_size": (3, 40, 40)}
    _, spec = fcexport.load_model(fcexport.import_pretrained(model, tmp_path / "b"))
    assert list(spec.input_shape) == [3, 40, 40] and spec.normalization.mean == pytest.approx([0.485, 0.456, 0.406])


def test_a_folder_asking_for_its_own_code_is_refused(runner, tmp_path):
    folder = save_pretrained(tmp_path / "model", "ViTForImageClassification")
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForImageClassification": "modeling_evil.EvilModel"}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "modeling_evil.py").write_text("raise SystemExit('the folder ran its code')\n")
    r = invoke(runner, "import", folder, "--artifacts", tmp_path / "art")
    assert r.exit_code == 2 and "trust_remote_code" in r.stderr and "never runs code from a model folder" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "art" / "model.pt").exists()
    config["architectures"] = ["os.system"]
    del config["auto_map"]
    (folder / "config.json").write_text(json.dumps(config))
    r = invoke(runner, "import", folder, "--artifacts", tmp_path / "art")
    assert r.exit_code == 2 and "is not a model class of the installed transformers" in r.stderr


def test_safetensors_weights_import_like_a_state_dict(runner, tmp_path):
    from safetensors.torch import save_file

    _, model = write_course_model(tmp_path)
    save_file(model.state_dict(), tmp_path / "course.safetensors")
    r = invoke(runner, "import", tmp_path / "course.safetensors", "--model-def", f"{tmp_path}/course_model.py:course_mlp",
               "--input-shape", "1,8,8", "--artifacts", tmp_path / "art")
    assert r.exit_code == 0, r.output


def safetensors_file(path: Path, header: dict, body: bytes = b"", declared: int | None = None) -> Path:
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text) if declared is None else declared) + text + body)
    return path


HOSTILE = {
    "truncated header": lambda p: safetensors_file(p, {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, declared=1 << 40),
    "lying offset": lambda p: safetensors_file(p, {"0.weight": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                                                   "0.bias": {"dtype": "F32", "shape": [4], "data_offsets": [1 << 40, (1 << 40) + 16]}},
                                               b"\0" * 32),
    "10 GB tensor": lambda p: safetensors_file(p, {"0.weight": {"dtype": "F32", "shape": [50_000, 50_000], "data_offsets": [0, 10**10]}},
                                               b"\0" * 64),
    "overlapping tensors": lambda p: safetensors_file(p, {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                                                          "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}, b"\0" * 24),
    "200,000 metadata strings": lambda p: safetensors_file(p, {"__metadata__": {str(i): "x" for i in range(200_000)}}),
    "not json": lambda p: (p.write_bytes(struct.pack("<Q", 5) + b"{{{{{"), p)[1],
}


@pytest.mark.parametrize("case", HOSTILE)
def test_hostile_safetensors_exit_2_bounded(case, tmp_path):
    write_course_model(tmp_path)
    path = HOSTILE[case](tmp_path / "bad.safetensors")
    r = run_limited("import", path, "--model-def", f"{tmp_path}/course_model.py:course_mlp", "--input-shape", "1,8,8",
                    "--artifacts", tmp_path / "art")
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "not a readable safetensors file" in lines[0] and str(path) in lines[0], lines
    assert not (tmp_path / "art" / "model.pt").exists()


def test_an_honest_safetensors_file_is_checked_tensor_by_tensor():
    from safetensors.torch import save

    from fcexport.checkpoint import load_safetensors

    tensors = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(2, dtype=torch.bfloat16),
               "n": torch.tensor([3], dtype=torch.int64)}
    loaded = load_safetensors(save(tensors), Path("x.safetensors"))
    assert all(torch.equal(loaded[k], v) for k, v in tensors.items())
    assert np.array_equal(loaded["w"].numpy(), np.arange(6).reshape(2, 3))


def test_a_timm_name_takes_input_size_and_normalisation_from_its_pretrained_cfg(runner, tmp_path):
    timm = pytest.importorskip("timm")
    from safetensors.torch import save_file

    from fcexport.checkpoint import read_model

    model = timm.create_model("test_efficientnet", pretrained=False, num_classes=3)
    save_file(model.state_dict(), tmp_path / "w.safetensors")
    r = invoke(runner, "import", tmp_path / "w.safetensors", "--model-def", "timm:test_efficientnet",
               "--model-args", '{"num_classes": 3}', "--artifacts", tmp_path / "art")
    assert r.exit_code == 0, r.output
    spec = read_model(tmp_path / "art" / "model.pt").spec
    assert list(spec.input_shape) == list(model.pretrained_cfg["input_size"])
    assert spec.normalization.mean == pytest.approx(model.pretrained_cfg["mean"])
    r = invoke(runner, "import", tmp_path / "w.safetensors", "--model-def", "timm:no_such_net", "--artifacts", tmp_path / "x")
    assert r.exit_code == 2 and "timm has no model named 'no_such_net'" in r.stderr
    _, course = write_course_model(tmp_path)
    r = invoke(runner, "import", tmp_path / "course.pt", "--model-def", f"{tmp_path}/course_model.py:course_mlp", "--artifacts", tmp_path / "y")
    assert r.exit_code == 2 and "give it (--input-shape C,H,W)" in r.stderr


@pytest.mark.parametrize("change, expected", [
    ({"num_hidden_layers": 100_000}, "asks for more layers than its weights have tensors"),
    ({"hidden_size": 20_000, "intermediate_size": 80_000}, "its weights hold"),
    ({"num_labels": 400_000, "id2label": None, "label2id": None}, "its weights hold"),
    ({"quantization_config": {"quant_method": "fp8"}}, "a quantised checkpoint"),
])
def test_a_config_that_describes_another_model_is_refused_before_it_is_built(change, expected, tmp_path):
    """A 600-byte config.json can ask for a model of any size: it is sized on the meta device against the weights
    first (19 GB and minutes before this check), in a real process under the tests' memory and CPU limits."""
    folder = save_pretrained(tmp_path / "model", "ViTForImageClassification")
    config = json.loads((folder / "config.json").read_text())
    config.update({k: v for k, v in change.items() if v is not None})
    for k in (k for k, v in change.items() if v is None):
        config.pop(k, None)
    (folder / "config.json").write_text(json.dumps(config))
    r = run_limited("import", folder, "--artifacts", tmp_path / "art")
    assert r.returncode == 2 and expected in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_a_config_for_another_class_count_says_both_counts_and_what_to_change(runner, tmp_path):
    """transformers 5 raises "set ignore_mismatched_sizes" and keeps the details for a log; fcexport says them."""
    folder = save_pretrained(tmp_path / "model", "ViTForImageClassification")
    config = json.loads((folder / "config.json").read_text())
    config["id2label"] = {str(i): f"c{i}" for i in range(4)}
    config["label2id"] = {f"c{i}": i for i in range(4)}
    (folder / "config.json").write_text(json.dumps(config))
    r = invoke(runner, "import", folder, "--artifacts", tmp_path / "art")
    assert r.exit_code == 2 and "classifier.weight is (3, " in r.stderr and "in the model config.json describes" in r.stderr
    assert "The file's head has 3 classes, config.json's 4" in r.stderr and "Traceback" not in r.output


def test_an_attention_implementation_in_the_config_is_not_followed(runner, tmp_path):
    """`attn_implementation` can name kernels on the Hub (native code, downloaded): the model is built with eager
    attention whatever the folder says."""
    folder = save_pretrained(tmp_path / "model", "ViTForImageClassification")
    config = json.loads((folder / "config.json").read_text())
    config["attn_implementation"] = "kernels-community/flash-attn2"
    (folder / "config.json").write_text(json.dumps(config))
    r = invoke(runner, "import", folder, "--artifacts", tmp_path / "art")
    assert r.exit_code == 0, r.output


def test_a_vit_that_resizes_its_position_embedding_imports(tmp_path):
    """timm's ViTs with a dynamic image size resample their position embedding with antialiased bicubic
    interpolation at every call: an op on the allow-list with a cost model that grows with the shrink factor."""
    timm = pytest.importorskip("timm")
    import fcexport

    _, spec = fcexport.load_model(fcexport.import_pretrained(timm.create_model("test_vit", pretrained=False, num_classes=3),
                                                             tmp_path))
    assert list(spec.input_shape) == [3, 160, 160]


def photos(folder: Path) -> list[Path]:
    """Smooth, noisy photos of odd sizes and aspects (a one-pixel shift of a crop shows in them)."""
    from PIL import Image

    rng, made = np.random.default_rng(0), []
    folder.mkdir(exist_ok=True)
    for i, (h, w) in enumerate([(300, 451), (517, 333), (97, 1000)]):
        y, x = np.mgrid[0:h, 0:w]
        img = np.stack([np.sin(x / 7.0 + c) * np.cos(y / 11.0 - c) * 110 + 128 for c in range(3)], -1)
        made.append(folder / f"photo{i}.png")
        Image.fromarray((img + rng.integers(-20, 20, img.shape)).clip(0, 255).astype(np.uint8)).save(made[-1])
    return made


@pytest.mark.parametrize("processor, settings", [
    ("ViTImageProcessor", {}),  # an exact 224x224
    ("ConvNextImageProcessor", {"size": {"shortest_edge": 224}}),  # shorter side 224 / crop_pct, then the crop
    ("MobileNetV2ImageProcessor", {}),  # shorter side 256, crop 224
    ("DeiTImageProcessor", {}),  # 256x256, crop 224
    ("EfficientNetImageProcessor", {}),  # 346x346, std applied twice (include_top)
])
def test_an_image_is_prepared_as_its_image_processor_prepares_it(processor, settings, tmp_path):
    from PIL import Image

    from fcexport.preprocess import prepare_image
    from fcexport.sources import _described

    proc = getattr(transformers, processor)(**settings)
    described = _described(torch.nn.Identity(), {"config": {}, "preprocessor": json.loads(proc.to_json_string())}, None, None, None, None)
    assert described["preprocess"].mode == "resize"
    mean, std = (np.array(described[k], dtype=np.float32).reshape(3, 1, 1) for k in ("mean", "std"))
    for photo in photos(tmp_path):
        expected = proc(Image.open(photo).convert("RGB"), return_tensors="np")["pixel_values"][0]
        assert tuple(described["input_shape"]) == expected.shape
        pixels = prepare_image(photo, described["input_shape"], described["preprocess"])
        # transformers resizes with torch, fcexport with Pillow: the same pixels to within a few levels of 255
        assert np.abs((pixels - mean) / std - expected).max() * 255 <= 5 * np.abs(1 / std).max()


@pytest.mark.parametrize("name", ["resnet50", "vit_tiny_patch16_224"])
def test_an_image_is_prepared_as_timms_eval_transform_prepares_it(name, tmp_path):
    timm = pytest.importorskip("timm")
    from PIL import Image

    from fcexport.preprocess import prepare_image
    from fcexport.sources import _described

    model = timm.create_model(name, pretrained=False)
    transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))
    described = _described(model, None, None, None, None, None)
    mean, std = (np.array(described[k], dtype=np.float32).reshape(3, 1, 1) for k in ("mean", "std"))
    for photo in photos(tmp_path):
        expected = transform(Image.open(photo).convert("RGB")).numpy()  # resnet50: 235 -> 224, an odd margin
        pixels = prepare_image(photo, described["input_shape"], described["preprocess"])
        assert np.abs((pixels - mean) / std - expected).max() * 255 <= 5 * np.abs(1 / std).max()


def test_the_recorded_preparation_survives_export_and_predict_uses_it(runner, tmp_path):
    folder = save_pretrained(tmp_path / "model", "ConvNextForImageClassification")
    transformers.ConvNextImageProcessor(size={"shortest_edge": 32}, crop_pct=0.5, image_mean=[0.5, 0.4, 0.3],
                                        image_std=[0.2, 0.25, 0.3]).save_pretrained(folder)
    art = tmp_path / "art"
    assert invoke(runner, "import", folder, "--artifacts", art).exit_code == 0
    assert invoke(runner, "export", "--format", "onnx", "--artifacts", art).exit_code == 0
    from fcexport.checkpoint import read_model
    from fcexport.spec import Preprocess

    assert read_model(art / "model.pt").spec.preprocess == Preprocess("resize", resize=64, resample="bicubic")
    r = invoke(runner, "inspect", art / "model.onnx")
    assert "resize to shorter side 64, centre crop, bicubic" in r.stdout, r.stdout
    photo = photos(tmp_path / "photos")[0]
    from PIL import Image

    model = transformers.ConvNextForImageClassification.from_pretrained(folder).eval()
    pixels = transformers.ConvNextImageProcessor.from_pretrained(folder)(Image.open(photo).convert("RGB"), return_tensors="pt")
    with torch.no_grad():
        expected = model(**pixels).logits.softmax(-1)[0]
    row = json.loads(invoke(runner, "predict", photo, "--model", art / "model.onnx", "--json").stdout)[0]
    assert row["label"] == CLASSES[int(expected.argmax())]
    assert row["probability"] == pytest.approx(float(expected.max()), abs=0.02)
