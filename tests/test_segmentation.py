"""Segmentation models (issue 34): per-pixel logits (N, K, H, W), picked from a dict of outputs, through import ->
fuse-bn --verify -> export -> verify -> predict with masks on the file's own pixels."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from torch import nn

import fcexport
from fcexport.errors import FcxError
from helpers import invoke
from test_trust import rewrite_onnx

NAMES = ["red", "green", "blue"]


class ColourSeg(nn.Module):
    """Each pixel's class is its strongest colour channel: logits from a 1x1 conv and a BatchNorm at half resolution,
    upsampled; torchvision's {"out", "aux"} layout (aux: the half-resolution logits)."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)
        with torch.no_grad():
            self.conv.weight.copy_(torch.eye(3)[:, :, None, None] * 4)
            self.conv.bias.zero_()
            self.bn.running_mean.copy_(torch.tensor([0.1, -0.1, 0.05]))
            self.bn.running_var.copy_(torch.tensor([1.5, 0.7, 1.1]))

    def forward(self, x):
        y = self.bn(self.conv(nn.functional.avg_pool2d(x, 2)))
        return {"out": nn.functional.interpolate(y, scale_factor=2, mode="bilinear"), "aux": y}


def scene(path: Path, size=(320, 200)) -> Path:
    """Blue ground, a red disc on the left, a green box on the right: a colour segmentation's answer is known."""
    image = Image.new("RGB", size, (40, 120, 200))
    draw = ImageDraw.Draw(image)
    draw.ellipse((40, 40, 160, 160), fill=(220, 60, 40))
    draw.rectangle((200, 60, 300, 180), fill=(30, 200, 80))
    image.save(path)
    return path


@pytest.fixture(scope="module")
def segmenter(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("seg")
    fcexport.import_model(ColourSeg().eval(), (3, 64, 96), class_names=NAMES, artifacts=folder)
    assert fcexport.fuse(folder / "model.pt", folder / "model.fused.pt", verify=True, inputs=64).written
    fcexport.export(folder / "model.pt", folder)
    return folder


def test_a_dict_of_per_pixel_logits_imports_as_segmentation_and_a_classifier_spec_is_unchanged(segmenter, exported_dir):
    from fcexport.checkpoint import read_model

    spec = read_model(segmenter / "model.pt").spec
    assert (spec.task, spec.output_shape, spec.class_names) == ("segmentation", (3, 64, 96), tuple(NAMES))  # "out" kept
    assert spec.to_dict()["output_shape"] == [3, 64, 96]
    classifier = read_model(exported_dir / "model.pt").spec.to_dict()
    assert "task" not in classifier and "output_shape" not in classifier  # a classifier's files as before


def test_output_picks_another_of_several_and_a_wrong_name_lists_them(tmp_path):
    from fcexport.sources import from_module

    _, spec = from_module(ColourSeg().eval(), (3, 64, 96), output="aux")
    assert spec.output_shape == (3, 32, 48)
    details = spec.architecture.details  # what was left out is recorded, with its shape
    assert details["output"] == "aux" and {k: list(v) for k, v in details["outputs"].items()} == {"out": [3, 64, 96], "aux": [3, 32, 48]}
    with pytest.raises(FcxError, match=r"several values \(out, aux\); --output 'logits' is not one of them"):
        from_module(ColourSeg().eval(), (3, 64, 96), output="logits")


def test_a_segmentation_model_verifies_on_every_default_row_and_a_planted_change_fails(segmenter, tmp_path):
    import shutil

    import onnx

    report = fcexport.verify(segmenter, None, ("cpu",), inputs=64)
    ran = [row for row in report.rows if row.status.value != "skipped"]
    assert report.passed and {"fused", "onnxruntime"} <= {row.backend for row in ran}, report.to_json()
    planted = tmp_path / "planted"
    shutil.copytree(segmenter, planted)

    def change(proto):
        weight = next(t for t in proto.graph.initializer if list(t.dims)[:2] == [3, 3])
        values = onnx.numpy_helper.to_array(weight).copy()
        values[0, 0] *= 1.01
        weight.CopyFrom(onnx.numpy_helper.from_array(values, weight.name))

    rewrite_onnx(planted, change)  # a swapped file with a refreshed manifest: the structure check names it
    row = fcexport.verify(planted, ("onnxruntime",), ("cpu",), inputs=64).rows[0]
    assert row.status.value == "fail" and row.problems, row


def test_triton_config_carries_the_dense_output_dims(segmenter):
    from fcexport.checkpoint import read_model
    from fcexport.targets import TritonSettings
    from fcexport.triton_config import model_config

    config = model_config("seg", "onnxruntime_onnx", read_model(segmenter / "model.pt").spec, TritonSettings("seg"))
    assert list(config.output[0].dims) == [3, 64, 96] and config.output[0].label_filename == "labels.txt"


def test_predict_writes_masks_on_the_files_own_pixels_with_the_letterbox_undone(segmenter, tmp_path, runner):
    picture = scene(tmp_path / "scene.png")
    r = invoke(runner, "predict", str(picture), "--artifacts", str(segmenter), "--masks", str(tmp_path / "masks"), "--json")
    assert r.exit_code == 0, r.output
    row = json.loads(r.stdout)[0]
    mask = np.asarray(Image.open(row["mask"]))
    assert Image.open(row["mask"]).mode == "P" and mask.shape == (200, 320)  # the file's size, not the model's 64 x 96
    assert (mask[100, 100], mask[120, 250], mask[10, 10], mask[190, 170]) == (0, 1, 2, 2)  # disc, box, ground
    disc = np.zeros((200, 320), bool)
    yy, xx = np.mgrid[:200, :320]
    disc[(yy - 100) ** 2 + (xx - 100) ** 2 < 55**2] = True
    assert (mask[disc] == 0).mean() > 0.99
    shares = {s["label"]: s["share"] for s in row["shares"]}
    assert row["label"] == "blue" and shares["red"] == pytest.approx(np.pi * 60**2 / (320 * 200), abs=0.02)
    overlay = Image.open(row["overlay"])
    assert overlay.mode == "RGB" and overlay.size == (320, 200)
    (tmp_path / "broken.png").write_bytes(b"not an image")
    table = invoke(runner, "predict", str(picture), str(tmp_path / "broken.png"), "--artifacts", str(segmenter), "--masks", str(tmp_path / "m2"))
    assert table.exit_code == 2 and "share" in table.stdout and "m2/000000_scene.mask.png" in table.stdout  # the good file's row
    assert "broken.png: not a readable image" in table.stdout and not list((tmp_path / "m2").glob("000001_*"))


def test_a_centre_crop_leaves_the_unseen_margins_marked():
    from fcexport.masks import UNSEEN, classes_on_image
    from fcexport.preprocess import Placement

    logits = np.zeros((2, 4, 4))
    logits[1, :, 2:] = 1  # right half: class 1
    # a 200 x 100 (h x w) file whose middle 100 x 100 square became the 4 x 4 input
    mask = classes_on_image(logits, Placement((200, 100), (0, 50, 100, 150), (0, 0, 4, 4), (4, 4)))
    assert mask.shape == (200, 100)
    assert (mask[:50] == UNSEEN).all() and (mask[150:] == UNSEEN).all()
    assert (mask[50:150, :50] == 0).all() and (mask[50:150, 50:] == 1).all()


def test_a_classifier_shape_lie_in_a_segmentation_spec_is_refused():
    from fcexport.spec import ModelSpec

    with pytest.raises(FcxError, match="output_shape"):
        ModelSpec.from_dict({"input_shape": [3, 8, 8], "class_names": ["a", "b"], "task": "segmentation", "output_shape": [3, 8, 8]})
    with pytest.raises(FcxError, match="task must be one of"):
        ModelSpec.from_dict({"input_shape": [3, 8, 8], "class_names": ["a"], "task": "detection"})


def test_approximate_rows_are_judged_per_pixel_with_the_masks_overlap():
    from fcexport.compare import Tolerance, compare

    rng = np.random.default_rng(0)
    reference = rng.normal(size=(4, 3, 16, 16)) * 5
    flipped = reference.copy()
    flipped[:, :, :4] = flipped[:, ::-1, :4]  # a quarter of the pixels change class
    same = compare(reference + 1e-4, reference, 1e-6, None, Tolerance(), approximate=True)
    worse = compare(flipped, reference, 1e-6, None, Tolerance(), approximate=True)
    assert same["passed"] and same["mean_iou"] == 1.0 and same["decisive_inputs"] > 64
    assert not worse["passed"] and worse["mean_iou"] < 0.9 and worse["decisive_agreement"] < 0.99


def test_a_detection_model_is_refused_with_the_reason():
    import torchvision

    from fcexport.sources import from_module

    model = torchvision.models.detection.ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=3)
    with pytest.raises(FcxError, match="detection model's box count"):
        from_module(model.eval(), (3, 96, 96))


def test_a_served_segmentation_model_verifies_and_predicts_masks_over_http_and_grpc(segmenter, tmp_path, runner):
    """The Triton repository carries the dense dims; verify --url judges every pixel, predict --url writes the masks."""
    import shutil

    from test_serve import _server_env

    from fcexport import pipeline
    from fcexport.serve import free_port

    env = _server_env()
    served = Path(shutil.copytree(segmenter, tmp_path / "served"))
    assert invoke(runner, "export", "--triton", "--name", "seg", "--artifacts", served).exit_code == 0
    with pipeline.serve(served, http_port=free_port(), grpc_port=free_port(), server_env=env.root) as running:
        r = invoke(runner, "verify", "--url", running.http_url, "--url", running.grpc_url, "--model", "seg", "--json",
                   "--artifacts", served, "--inputs", "32")
        assert r.exit_code == 0, r.output
        assert [row["status"] for row in json.loads(r.stdout)["rows"]] == ["pass", "pass"]
        picture = scene(tmp_path / "scene.png")
        r = invoke(runner, "predict", str(picture), "--url", running.grpc_url, "--model", "seg", "--json",
                   "--masks", str(tmp_path / "masks"))
        assert r.exit_code == 0, r.output
        row = json.loads(r.stdout)[0]
        assert np.asarray(Image.open(row["mask"]))[100, 100] == 0 and row["mask"].startswith(str(tmp_path / "masks"))
    assert not running.alive()


def test_a_hugging_face_segmentation_folder_imports_with_no_flag_and_predicts_masks(tmp_path, runner):
    """save_pretrained's folder of a SegFormer (logits at a quarter of the input's size): class names from id2label,
    input size and normalisation from the image processor; the mask still covers the file's own pixels."""
    import transformers

    config = transformers.SegformerConfig(num_labels=3, hidden_sizes=[8, 16, 32, 64], decoder_hidden_size=32,
                                          depths=[1, 1, 1, 1], id2label={0: "sky", 1: "road", 2: "car"})
    transformers.SegformerForSemanticSegmentation(config).save_pretrained(tmp_path / "segformer")
    transformers.SegformerImageProcessor(size={"height": 64, "width": 64}).save_pretrained(tmp_path / "segformer")
    r = invoke(runner, "import", str(tmp_path / "segformer"), "--artifacts", str(tmp_path / "a"))
    assert r.exit_code == 0, r.output
    from fcexport.checkpoint import read_model

    spec = read_model(tmp_path / "a" / "model.pt").spec
    assert (spec.task, spec.output_shape, spec.class_names) == ("segmentation", (3, 16, 16), ("sky", "road", "car"))
    r = invoke(runner, "predict", str(scene(tmp_path / "scene.png")), "--model", str(tmp_path / "a" / "model.pt"),
               "--masks", str(tmp_path / "masks"), "--json")
    assert r.exit_code == 0, r.output
    row = json.loads(r.stdout)[0]
    assert Image.open(row["mask"]).size == (320, 200) and abs(sum(s["share"] for s in row["shares"]) - 1) < 1e-9


def test_a_file_whose_spec_claims_another_task_is_named_by_verify(segmenter, tmp_path):
    """model.onnx's embedded spec relabelled as a classifier's (task and output shape dropped), manifest refreshed."""
    import shutil

    served = Path(shutil.copytree(segmenter, tmp_path / "lying"))

    def relabel(proto):
        kept = [(p.key, p.value) for p in proto.metadata_props if p.key not in ("task", "output_shape")]
        del proto.metadata_props[:]
        for key, value in kept:
            proto.metadata_props.add(key=key, value=value)

    rewrite_onnx(served, relabel)
    row = fcexport.verify(served, ("onnxruntime",), ("cpu",), inputs=16).rows[0]
    assert row.status.value == "fail" and any("task differs" in p or "output_shape" in p for p in row.problems), row


def test_masks_beyond_255_classes_keep_class_255_apart_from_unseen(tmp_path):
    """256 classes: a 16-bit mask where class 255 is 255 and unseen is 65535; a palette mask keeps 255 for unseen."""
    from fcexport.masks import UNSEEN, UNSEEN_8, UNSEEN_16, write_masks

    mask = np.array([[0, 255], [UNSEEN, 3]], dtype=np.int32)
    original = np.zeros((2, 2, 3), np.uint8)
    written, _ = write_masks(mask, original, 256, tmp_path / "wide")
    assert np.asarray(Image.open(written)).tolist() == [[0, 255], [UNSEEN_16, 3]]
    written, _ = write_masks(np.array([[0, 2], [UNSEEN, 3]], np.int32), original, 4, tmp_path / "narrow")
    assert Image.open(written).mode == "P" and np.asarray(Image.open(written)).tolist() == [[0, 2], [UNSEEN_8, 3]]
    with pytest.raises(FcxError, match="at most 65,535 classes"):
        write_masks(mask, original, 70_000, tmp_path / "huge")


def test_a_mask_that_cannot_be_written_is_that_files_row_and_masks_naming_a_file_is_refused(segmenter, tmp_path, runner):
    picture = scene(tmp_path / "scene.png")
    long = scene(tmp_path / ("x" * 250 + ".png"))  # its mask's name is too long for the file system
    r = invoke(runner, "predict", str(long), str(picture), "--artifacts", str(segmenter), "--masks", str(tmp_path / "m"), "--json")
    rows = json.loads(r.stdout)
    assert r.exit_code == 2 and "cannot write" in rows[0]["error"] and Path(rows[1]["mask"]).is_file()
    (tmp_path / "taken").write_text("a file")
    r = invoke(runner, "predict", str(picture), "--artifacts", str(segmenter), "--masks", str(tmp_path / "taken"))
    assert r.exit_code == 2 and "--masks names a file" in r.stderr and "Traceback" not in r.output


def test_a_gray_segmentation_model_is_letterboxed_and_honours_invert(tmp_path, runner):
    """A 1-channel segmentation model gets masks on the file's own pixels (not the object cut-out classifiers get),
    and --invert reaches an object-prepared one."""
    class Bright(nn.Module):  # class 1 where the pixel is bright
        def forward(self, x):
            return torch.cat([0.5 - x, x - 0.5], dim=1)

    fcexport.import_model(Bright(), (1, 32, 32), artifacts=tmp_path / "gray")
    assert fcexport.load_model(tmp_path / "gray" / "model.pt")[1].preprocess.mode == "letterbox"
    picture = tmp_path / "half.png"
    Image.fromarray(np.where(np.arange(60)[None, :] < 30, 255, 0).repeat(40, 0).astype(np.uint8)).save(picture)
    r = invoke(runner, "predict", str(picture), "--artifacts", str(tmp_path / "gray"), "--masks", str(tmp_path / "m"), "--json")
    mask = np.asarray(Image.open(json.loads(r.stdout)[0]["mask"]))
    assert mask.shape == (40, 60) and (mask[:, :28] == 1).all() and (mask[:, 32:] == 0).all()
    from fcexport.preprocess import image_and_placement
    from fcexport.spec import Preprocess

    as_is, inverted = (image_and_placement(picture, (1, 32, 32), Preprocess("object"), invert)[0] for invert in ("no", "yes"))
    assert not np.array_equal(as_is, inverted)  # the object is the other half


def test_a_nested_output_is_named_by_its_path():
    from fcexport.sources import from_module

    class Nested(nn.Module):
        def forward(self, x):
            return {"heads": {"out": torch.cat([x, -x], 1)}, "b": x.mean((2, 3))}

    _, spec = from_module(Nested(), (1, 8, 8))
    assert spec.architecture.details["output"] == "heads.out" and spec.output_shape == (2, 8, 8)
    _, spec = from_module(Nested(), (1, 8, 8), output="b")
    assert spec.output_shape == (1,)


def test_a_large_per_pixel_output_bounds_the_random_inputs_down_to_one():
    from fcexport.spec import DENSE_VALUES, ModelSpec

    def count(shape):
        names = [str(i) for i in range(shape[0])]
        return ModelSpec(input_shape=(3, 8, 8), class_names=names, task="segmentation", output_shape=shape).random_inputs

    assert count((4, 128, 128)) == 256 and count((21, 224, 224)) == 15 and count((8, 512, 512)) == 8
    assert count((64, 1024, 1024)) == 1 and count((8, 512, 512)) * 8 * 512 * 512 <= DENSE_VALUES


def test_a_spec_nested_too_deep_or_listing_many_outputs_is_bounded(tmp_path, runner):
    from fcexport.spec import ModelSpec

    deep = json.loads('{"a":' * 900 + "{}" + "}" * 900)
    with pytest.raises(FcxError, match="nests deeper than"):
        ModelSpec.from_dict({"input_shape": [3, 8, 8], "class_names": ["a"], "architecture": {"kind": "imported", "x": deep}})
    spec = ModelSpec.from_dict({"input_shape": [3, 8, 8], "class_names": ["a"], "architecture": {
        "kind": "imported", "output": "o0", "outputs": {f"o{i}" * 50: [1] * 500 for i in range(5000)}}})
    from cli.render import _outputs

    shown = _outputs(spec.architecture.details)
    assert len(shown) < 600 and "(5000 in all)" in shown


def test_16_bit_and_transparent_files_reach_a_letterboxed_model_scaled_not_clipped(tmp_path):
    """Pillow's convert() clips 16-bit pixels at 255: a 0..65535 gradient became white after its first column."""
    from fcexport.preprocess import image_and_placement
    from fcexport.spec import Preprocess

    gradient = tmp_path / "g16.png"
    Image.fromarray(np.tile(np.linspace(0, 65535, 64), (64, 1)).astype(np.uint16)).save(gradient)
    pixels, _, original = image_and_placement(gradient, (1, 64, 64), Preprocess("letterbox"))
    assert pixels[0, 32, 0] < 0.05 and pixels[0, 32, 63] > 0.95 and 0.4 < pixels[0, 32, 32] < 0.6
    assert original[32, 32, 0] == pytest.approx(pixels[0, 32, 32] * 255, abs=2)
    clear = tmp_path / "clear.png"
    Image.new("RGBA", (64, 64), (0, 0, 0, 0)).save(clear)  # fully transparent: white, as transformers composites it
    pixels, _, _ = image_and_placement(clear, (3, 64, 64), Preprocess("letterbox"))
    assert pixels.min() == 1.0


def test_a_file_the_model_saw_none_of_is_its_error_row(tmp_path):
    """A 300 x 4 strip under a resize-and-centre-crop whose crop is thinner than one of its pixels: no seen pixel, so
    no class can be said to cover it."""
    from fcexport.classify import predict_files
    from fcexport.spec import ModelSpec, Preprocess
    from fcexport.targets import Predictor

    spec = ModelSpec(input_shape=(3, 8, 57), class_names=("a", "b", "c"), preprocess=Preprocess("resize", resize=64),
                     task="segmentation", output_shape=(3, 8, 57))
    predictor = Predictor("fake", "cpu", "fake", lambda x: np.zeros((len(x), 3, 8, 57), np.float32), spec)
    strip = tmp_path / "strip.png"
    Image.new("RGB", (300, 4), (200, 0, 0)).save(strip)
    (row,) = predict_files(predictor, [strip], masks=tmp_path / "m")
    assert "saw none of this file" in row["error"] and not (tmp_path / "m").exists()


def test_near_zero_pixels_and_single_logits_are_not_decisive():
    """A pixel whose logits are all near zero, or a single logit near zero, flips on rounding alone: it must not count
    as decisive (bf16 or int8 would fail an honest file on it)."""
    from fcexport.compare import decisive_rows

    image = np.zeros((1, 3, 2, 2))
    image[0, :, 0, 0] = [10.0, 0.0, -10.0]  # clear
    image[0, :, 0, 1] = [0.02, 0.0, -0.01]  # leads by a lot of its own size, by nothing of the image's
    assert decisive_rows(image)[0].tolist() == [[True, False], [False, False]]
    single = np.array([[5.0], [-4.0], [0.01]])
    assert decisive_rows(single).tolist() == [True, True, False]
    single_dense = np.array([[[[5.0, 0.01]]]])
    assert decisive_rows(single_dense).tolist() == [[[True, False]]]


# ---- the model's other outputs (torchvision's "aux"): exported and verified beside the logits -------------------


def test_every_output_is_in_every_file_and_judged_on_every_row(segmenter):
    import onnxruntime as ort

    from fcexport.checkpoint import read_model
    from fcexport.targets import TritonSettings
    from fcexport.triton_config import model_config

    stored = read_model(segmenter / "model.pt")
    assert stored.spec.other_outputs == (("aux", (3, 32, 48)),)
    assert read_model(segmenter / "model.fused.pt").program.extras  # folding kept it (aux is a folded BatchNorm's output)
    x = np.random.default_rng(0).random((2, 3, 64, 96), dtype=np.float32)
    expected = ColourSeg().eval()(torch.from_numpy(x))
    session = ort.InferenceSession(str(segmenter / "model.onnx"))
    assert [o.name for o in session.get_outputs()] == ["logits", "aux"]
    logits, aux = session.run(None, {"pixels": x})
    np.testing.assert_allclose(aux, expected["aux"].detach().numpy(), atol=1e-5)
    np.testing.assert_allclose(logits, expected["out"].detach().numpy(), atol=1e-5)
    traced = torch.jit.load(str(segmenter / "model.ts"))(torch.from_numpy(x))
    assert isinstance(traced, tuple) and traced[1].shape == (2, 3, 32, 48)
    for platform, name in (("onnxruntime_onnx", "aux"), ("pytorch_libtorch", "aux__1")):
        config = model_config("seg", platform, stored.spec, TritonSettings("seg"))
        assert [(o.name, list(o.dims)) for o in config.output[1:]] == [(name, [3, 32, 48])]
    report = fcexport.verify(segmenter, None, ("cpu",), inputs=64)
    ran = [row for row in report.rows if row.status.value != "skipped"]
    assert report.passed and {"fused", "torchscript", "pt2", "onnxruntime"} <= {row.backend for row in ran}
    for row in ran:
        aux = row.value("other_outputs")["aux"]
        assert aux["passed"] and aux["max_abs"] <= aux["allowed_max_abs"], row


def test_an_other_output_that_is_off_or_missing_fails_its_row_and_a_served_one_is_said_not_compared(segmenter):
    from dataclasses import replace

    from fcexport import parity
    from fcexport.checkpoint import read_model
    from fcexport.compare import Tolerance
    from fcexport.targets.program import every_answer, program_predictor

    stored = read_model(segmenter / "model.pt")
    x = np.random.default_rng(1).random((8, 3, 64, 96), dtype=np.float32)
    (reference, own), (aux, aux_own) = every_answer(stored.program, stored.spec, segmenter / "model.pt", x)
    others = (parity.OtherOutput("aux", aux, float(aux_own.max())),)
    honest = program_predictor(stored.program, "fused", "cpu", segmenter / "model.pt", stored.spec)

    def shifted(batch):
        logits, found = honest.run(batch)
        return logits, found + 1e-3 * np.abs(found).max()  # the logits as they were: only aux is off

    def logits_off(batch):
        logits, found = honest.run(batch)
        return logits + 1e-3 * np.abs(logits).max(), found

    candidates = [honest, replace(honest, backend="off", run=shifted), replace(honest, backend="logits off", run=logits_off),
                  replace(honest, backend="missing", run=lambda batch: honest.run(batch)[0]),
                  replace(honest, backend="served", run=lambda batch: honest.run(batch)[0], logits_only=True)]
    inputs = parity.Inputs(x, None, "8 random inputs")
    rows = {row.backend: row for row in parity.compare_predictors(reference, float(own.max()), candidates, inputs, Tolerance(),
                                                                  others=others)}
    assert rows["fused"].status.value == "pass" and rows["fused"].value("max_abs") == rows["off"].value("max_abs")
    assert rows["off"].status.value == "fail" and not rows["off"].value("other_outputs")["aux"]["passed"]
    assert rows["missing"].status.value == "fail" and "returns 1 outputs" in rows["missing"].value("other_outputs")["aux"]["missing"]
    assert rows["served"].status.value == "pass" and "not_compared" in rows["served"].value("other_outputs")["aux"]
    # per-pixel logits that fail are localised per input (over all its pixels): here no layer of the honest program is off
    assert rows["logits off"].status.value == "fail" and rows["logits off"].value("first_divergent_layer") is None
    assert rows["logits off"].value("other_outputs")["aux"]["passed"]


@pytest.mark.parametrize("extras, expected", [
    ([["aux", "nowhere"]], "other outputs must be"),
    ([["logits", "y"]], "other outputs must be"),
    ([["a b", "y"]], "other outputs must be"),
    ([[f"o{i}", "y"] for i in range(17)], "at most 16"),
    ("aux", "at most 16"),
])
def test_a_hostile_list_of_other_outputs_in_model_pt_is_one_clear_line(extras, expected):
    from fcexport.program import INPUT, Node, Program, Ref, from_data, to_data

    program = Program((Node("y", "aten.relu.default", (Ref(INPUT),)),), "y", {})
    data = to_data(program) | {"extras": extras}
    with pytest.raises(FcxError, match=expected):
        from_data(data, {}, "model.pt")


def test_a_spec_that_lists_other_outputs_the_program_lacks_is_refused(segmenter, tmp_path):
    from dataclasses import replace

    from fcexport.checkpoint import read_model, save_program

    stored = read_model(segmenter / "model.pt")
    lying = tmp_path / "model.pt"
    save_program(replace(stored.program, extras=()), stored.spec, lying)  # a well-formed file whose spec lies
    with pytest.raises(FcxError, match="other outputs differ from those its spec lists"):
        read_model(lying)


class Several(nn.Module):
    """A conv and a BatchNorm returning what `kind` names besides its logits (the shapes an adversary tried)."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind, self.conv, self.bn, self.head = kind, nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1)
        with torch.no_grad():
            self.bn.running_mean.uniform_(-0.5, 0.5), self.bn.running_var.uniform_(0.5, 2.0), self.bn.weight.uniform_(0.5, 1.5)

    def forward(self, x):
        c = self.conv(x)
        if self.kind == "before":  # the value a BatchNorm reads is an output: folding it into the conv would change it
            return {"out": self.bn(c), "pre": c}
        if self.kind == "logits before":
            return {"out": c, "aux": self.bn(c)}
        if self.kind == "after":  # a BatchNorm's output is returned and read by the next conv
            f = self.bn(torch.relu(c))
            return {"out": self.head(f), "feat": f}
        if self.kind == "gelu gate":  # a GELU's half that the ONNX export reorders is itself returned
            g = (1 + torch.erf(c / 2 ** 0.5)) * 0.5
            return {"out": c * g, "gate": g}
        if self.kind == "op names":  # keys the exporter also names its own values with
            return {"out": torch.relu(c) * 2, "convolution": c + 1, "relu": c * 3, "val_0": c * 4}
        # left out, as before: a per-image scalar (N,), a flattened batch, an argmax, half precision; a non-ASCII name kept
        return {"out": c, "mean": c.mean((1, 2, 3)), "flat": c.flatten(), "label": c.argmax(1), "half": c.half(), "aüx": c * 2}


@pytest.mark.parametrize("kind", ["before", "logits before", "after", "gelu gate", "op names"])
def test_other_outputs_that_folding_or_the_onnx_export_could_touch_stay_exact(kind, tmp_path):
    model = Several(kind).eval()
    fcexport.import_model(model, (3, 16, 16), artifacts=tmp_path)
    assert fcexport.fuse(tmp_path / "model.pt", tmp_path / "model.fused.pt", verify=True, inputs=16).written
    fcexport.export(tmp_path / "model.pt", tmp_path, formats=["onnx", "torchscript"])
    report = fcexport.verify(tmp_path, ("fused", "onnxruntime", "torchscript"), ("cpu",), inputs=16)
    assert report.passed, report.to_json()["rows"]
    assert all(row.value("other_outputs") for row in report.rows)


def test_outputs_no_file_can_carry_are_left_out_and_a_name_is_made_ascii(tmp_path):
    from fcexport.checkpoint import read_model

    fcexport.import_model(Several("left out").eval(), (3, 16, 16), artifacts=tmp_path)
    spec = read_model(tmp_path / "model.pt").spec
    assert spec.other_outputs == (("a_x", (4, 16, 16)),)
    assert set(spec.architecture.details["outputs"]) == {"out", "mean", "flat", "label", "half", "aüx"}  # all still listed


def test_a_hostile_other_output_without_the_batch_is_refused_when_read(segmenter, tmp_path, runner):
    import io

    folder = tmp_path / "hostile"
    folder.mkdir()
    checkpoint = torch.load(segmenter / "model.pt", weights_only=True)
    program = json.loads(checkpoint["program"])
    source = program["extras"][0][1]
    program["nodes"].append({"name": "batch_sum", "op": "aten.sum.dim_IntList", "args": [{"ref": source}, [0], True],
                             "kwargs": {}, "layer": "", "layer_type": ""})
    program["extras"] = [["aux", "batch_sum"]]  # (1, ...) at batch 1, as an honest output is: only N shows it
    checkpoint["program"] = json.dumps(program)
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    (folder / "model.pt").write_bytes(buffer.getvalue())
    r = invoke(runner, "export", "--artifacts", folder)
    assert r.exit_code == 2 and "the output 'aux' is (1, 3, 32, 48)" in r.output and "Traceback" not in r.output
    assert sorted(p.name for p in folder.iterdir()) == ["model.pt"]


def test_an_approximate_row_before_an_exact_one_and_a_reference_of_the_logits_are_said(segmenter, tmp_path, runner):
    import shutil

    folder = tmp_path / "int8"
    shutil.copytree(segmenter, folder)
    assert invoke(runner, "export", "--int8", "--artifacts", folder).exit_code == 0
    r = invoke(runner, "verify", "--artifacts", folder, "--backends", "onnxruntime-int8,onnxruntime", "--devices", "cpu",
               "--inputs", "16")
    assert r.exit_code in (0, 1) and "other outputs, judged on every row by the same rule: aux" in r.output, r.output
    r = invoke(runner, "verify", "--artifacts", folder, "--reference", "--backends", "onnxruntime", "--devices", "cpu")
    assert r.exit_code == 0 and "besides the logits that nothing here judges" in r.output, r.output
