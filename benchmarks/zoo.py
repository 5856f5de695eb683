"""Coverage on models fcexport did not write: torchvision's classifiers, popular timm models and Hugging Face
`transformers` image classifiers built from their config classes, each through the README's Python API
(import_model -> fuse(verify=True) -> export -> verify with every default backend), with seconds per step.

    python benchmarks/zoo.py                      # every model, one fresh process each, a table at the end
    python benchmarks/zoo.py resnet18 timm:efficientnet_b0 hf:SwinForImageClassification --untrained
    python benchmarks/zoo.py --quick              # seconds: squeezenet1_1 at 64 px on 16 inputs (make test runs it)

Weights are random (no download); BatchNorm statistics are set to non-trivial values so folding is tested
for real, and a Linear initialised to zeros gets random weights (--untrained keeps torchvision's/timm's own
initialisation: zero biases, unit variances, zero heads).
`make zoo` runs the same list as tests (tests/test_zoo.py).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MAX_PARAMETERS = 60_000_000
CLASSES = 10
# Popular small timm models (families torchvision does not have, and timm's own variants of those it does).
TIMM_MODELS = (
    "resnet18", "resnet50d", "efficientnet_b0", "tf_efficientnet_lite0", "mobilenetv3_large_100", "mobilenetv4_conv_small",
    "ghostnet_100", "mixnet_s", "regnetx_002", "mnasnet_100", "levit_128s", "rexnet_100", "fbnetc_100", "tinynet_a",
    "lcnet_050", "convnext_atto", "edgenext_xx_small", "mobilevit_xs", "deit_tiny_patch16_224", "vit_tiny_patch16_224",
    "efficientformer_l1", "repvgg_a0", "dla34", "densenet121", "cspresnet50", "hrnet_w18_small", "dpn68", "res2net50_14w_8s",
    "resnest14d", "seresnext26d_32x4d", "coat_lite_tiny", "poolformer_s12", "convmixer_768_32", "xcit_nano_12_p16_224",
    # families whose float32 kernels OpenVINO computes furthest from torch's (issue 29's false failures)
    "fastvit_t8", "ese_vovnet19b_dw", "efficientvit_b0", "tiny_vit_5m_224", "regnety_002", "ghostnetv2_100", "repghostnet_050",
    # families first swept on 2026-12-07 (night), every default row passing
    "xception41", "swin_tiny_patch4_window7_224", "inception_v4",
)
# transformers classes, built from their config class (no download); transformer widths cut to ViT-Tiny's so a sweep
# stays affordable on a CPU (the structure, the ops and the exporters' paths are the same at any width)
TINY_TRANSFORMER = {"hidden_size": 192, "num_hidden_layers": 4, "num_attention_heads": 3, "intermediate_size": 768}
# composite (text + vision) configs: the classifier builds only the vision tower, so only vision_config is cut
TINY_VISION_TOWER = {"vision_config": {**TINY_TRANSFORMER, "image_size": 224, "patch_size": 16}}
HF_MODELS = {
    "ResNetForImageClassification": {}, "RegNetForImageClassification": {}, "BitForImageClassification": {},
    "ConvNextForImageClassification": {}, "ConvNextV2ForImageClassification": {}, "MobileNetV1ForImageClassification": {},
    "MobileNetV2ForImageClassification": {}, "EfficientNetForImageClassification": {  # B0 (the default config is B7 at 600 px)
        "image_size": 224, "width_coefficient": 1.0, "depth_coefficient": 1.0, "hidden_dim": 1280},
    "HGNetV2ForImageClassification": {}, "MobileViTForImageClassification": {}, "MobileViTV2ForImageClassification": {},
    "ViTForImageClassification": TINY_TRANSFORMER, "DeiTForImageClassification": TINY_TRANSFORMER,
    "BeitForImageClassification": TINY_TRANSFORMER, "Dinov2ForImageClassification": TINY_TRANSFORMER,
    "SwinForImageClassification": {}, "Swinv2ForImageClassification": {}, "LevitForImageClassification": {},
    "PoolFormerForImageClassification": {}, "PvtV2ForImageClassification": {}, "CvtForImageClassification": {},
    "FocalNetForImageClassification": {}, "SegformerForImageClassification": {}, "SwiftFormerForImageClassification": {},
    "Data2VecVisionForImageClassification": TINY_TRANSFORMER, "Dinov2WithRegistersForImageClassification": TINY_TRANSFORMER,
    "IJepaForImageClassification": TINY_TRANSFORMER, "ViTMSNForImageClassification": TINY_TRANSFORMER,
    "SiglipForImageClassification": TINY_VISION_TOWER, "CLIPForImageClassification": TINY_VISION_TOWER,
    "MetaClip2ForImageClassification": TINY_VISION_TOWER,
    "DeiTForImageClassificationWithTeacher": TINY_TRANSFORMER, "LevitForImageClassificationWithTeacher": {},
    "TimmWrapperForImageClassification": {"architecture": "resnet18"},
    "PPLCNetForImageClassification": {}, "PvtForImageClassification": {}, "DonutSwinForImageClassification": {},
    "TextNetForImageClassification": {"image_size": [224, 224]},  # its default is 640 px
    "HieraForImageClassification": {"depths": [1, 1, 2, 1]},  # 4 blocks instead of 24: a CPU sweep stays affordable
    # Perceiver cut to 32 latents of 128 (its masks take torch.arange(batch size))
    **{f"PerceiverForImageClassification{kind}": {"d_latents": 128, "num_latents": 32, "num_self_attends_per_block": 2,
                                                  "num_self_attention_heads": 4, "num_cross_attention_heads": 1}
       for kind in ("Learned", "Fourier", "ConvProcessing")},
    # segmentation heads (per-pixel logits; run at SEGMENTATION_SIZE px like the others below)
    "SegformerForSemanticSegmentation": {"hidden_sizes": [16, 32, 64, 128], "decoder_hidden_size": 64, "depths": [1, 1, 1, 1]},
    "MobileViTForSemanticSegmentation": {}, "UperNetForSemanticSegmentation": {},
    "DPTForSemanticSegmentation": {"hidden_size": 96, "num_hidden_layers": 4, "num_attention_heads": 3, "intermediate_size": 192,
                                   "image_size": 128, "backbone_out_indices": [0, 1, 2, 3], "neck_hidden_sizes": [24, 48, 96, 96],
                                   "fusion_hidden_size": 32},
    "BeitForSemanticSegmentation": {"hidden_size": 96, "num_hidden_layers": 4, "num_attention_heads": 3, "intermediate_size": 192,
                                    "image_size": 128, "out_indices": [0, 1, 2, 3]},
    "Data2VecVisionForSemanticSegmentation": {"hidden_size": 96, "num_hidden_layers": 4, "num_attention_heads": 3,
                                              "intermediate_size": 192, "image_size": 128, "out_indices": [0, 1, 2, 3]},
    "MobileViTV2ForSemanticSegmentation": {}, "MobileNetV2ForSemanticSegmentation": {},
}


def torchvision_models() -> list[str]:
    """Every torchvision classifier with at most MAX_PARAMETERS parameters at CLASSES classes."""
    import torch
    import torchvision

    import warnings

    names = []
    for name in torchvision.models.list_models(module=torchvision.models):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                with torch.device("meta"):  # sizes without allocating
                    model = torchvision.models.get_model(name, weights=None, num_classes=CLASSES)
            except NotImplementedError:  # RegNet computes its widths from tensors: build it for real
                model = torchvision.models.get_model(name, weights=None, num_classes=CLASSES)
        if sum(p.numel() for p in model.parameters()) <= MAX_PARAMETERS:
            names.append(name)
    return names


# segmentation: torchvision's own models ("seg:NAME") and segmentation_models_pytorch's architectures on three
# encoders ("smp:ARCH:ENCODER"), at SEGMENTATION_SIZE px (their float64 reference at 224 px takes minutes each)
SMP_ARCHITECTURES = ("Unet", "FPN", "DeepLabV3Plus", "Linknet", "PSPNet")
SMP_ENCODERS = ("resnet18", "mobilenet_v2", "efficientnet-b0")
SEGMENTATION_SIZE = 128


def dense(name: str) -> bool:
    """Whether the zoo's model `name` is a segmentation model."""
    return name.startswith(("seg:", "smp:")) or name.endswith("ForSemanticSegmentation")


def segmentation_models() -> list[str]:
    """torchvision's segmentation models with at most MAX_PARAMETERS parameters and every SMP_ARCHITECTURES x
    SMP_ENCODERS pair."""
    import torchvision

    names = [f"seg:{name}" for name in torchvision.models.list_models(module=torchvision.models.segmentation)
             if not name.endswith("101")]  # fcn_resnet101 and deeplabv3_resnet101: over 50M parameters, as resnet101's
    return (names + [f"smp:{arch}:{encoder}" for arch in SMP_ARCHITECTURES for encoder in SMP_ENCODERS]
            + list(SEVERAL_OUTPUTS))


# models with an output besides the logits, exported and verified beside them: torchvision's auxiliary classifier
# ("seg:NAME:aux": {"out", "aux"}) and segmentation_models_pytorch's per-image label head ("smp:ARCH:ENCODER:label")
SEVERAL_OUTPUTS = ("seg:fcn_resnet50:aux", "smp:Unet:resnet18:label")


def all_models() -> list[str]:
    """Every name the zoo covers, as `run` takes them."""
    return [*torchvision_models(), *(f"timm:{n}" for n in TIMM_MODELS), *(f"hf:{n}" for n in HF_MODELS), *segmentation_models()]


def build(name: str, untrained: bool = False):
    """`name`, `timm:name`, `hf:TransformersClass`, `seg:name` (torchvision) or `smp:Arch:encoder` with random weights;
    BatchNorm statistics set unless `untrained`."""
    if name.startswith("seg:"):
        import torchvision

        base, _, aux = name[4:].partition(":")
        model = torchvision.models.get_model(base, weights=None, weights_backbone=None, num_classes=CLASSES,
                                             **({"aux_loss": True} if aux == "aux" else {}))
    elif name.startswith("smp:"):
        import segmentation_models_pytorch as smp

        arch, encoder, *label = name[4:].split(":")
        model = smp.create_model(arch, encoder_name=encoder, encoder_weights=None, classes=CLASSES,
                                 **({"aux_params": {"classes": 3}} if label == ["label"] else {}))
    elif name.startswith("hf:"):
        import transformers

        cls = getattr(transformers, name[3:])
        model = cls(cls.config_class(num_labels=CLASSES, **HF_MODELS.get(name[3:], {})))
    elif name.startswith("timm:"):
        import timm

        model = timm.create_model(name[5:], pretrained=False, num_classes=CLASSES)
    else:
        import torchvision

        model = torchvision.models.get_model(name, weights=None, num_classes=CLASSES)
    if not untrained:
        randomise_trivial_weights(model)
    return model.eval()


def randomise_trivial_weights(model) -> None:
    """Non-trivial BatchNorm statistics and affine parameters (fresh ones are 0/1: folding them proves nothing), and
    random weights for a Linear initialised to zeros (torchvision's ViT head, timm's ResMLP and Mixer): with it every
    input gets the same output and verify can only call the numbers weak."""
    import torch

    generator = torch.Generator().manual_seed(0)
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and not module.weight.detach().any():
            module.weight.data.copy_(torch.randn(module.weight.shape, generator=generator) * 0.02)
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and module.running_mean is not None:
            module.running_mean.copy_(torch.randn(module.running_mean.shape, generator=generator) * 0.1)
            module.running_var.copy_(torch.rand(module.running_var.shape, generator=generator) + 0.5)
            if module.affine:
                module.weight.data.copy_(torch.rand(module.weight.shape, generator=generator) + 0.5)
                module.bias.data.copy_(torch.randn(module.bias.shape, generator=generator) * 0.1)


def run(name: str, folder: Path, untrained: bool = False, size: int = 224, inputs: int | None = None) -> dict:
    """The README's Python API on one model (verify's own input budget unless `inputs`); raises on the first step
    that fails."""
    import fcexport

    model = build(name, untrained)
    size = getattr(getattr(model, "config", None), "image_size", size)  # a transformers model's own input size
    cfg = getattr(model, "pretrained_cfg", None) or {}
    if cfg.get("fixed_input_size"):  # a timm model that takes only its own size (ViTs and friends)
        size = cfg["input_size"][-1]
    size = size if isinstance(size, int) else size[0]
    size = min(size, SEGMENTATION_SIZE) if dense(name) else size
    seconds = {}
    started = time.perf_counter()
    fcexport.import_model(model, (3, size, size), mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), artifacts=folder)
    seconds["import"] = time.perf_counter() - started
    started = time.perf_counter()
    fused = fcexport.fuse(folder / "model.pt", folder / "model.fused.pt", verify=True, inputs=inputs)
    seconds["fuse"] = time.perf_counter() - started
    if not fused.written:
        raise AssertionError(f"fuse --verify failed: {fused.to_json()['verification']['rows']}")
    started = time.perf_counter()
    exported = fcexport.export(folder / "model.pt", folder)
    seconds["export"] = time.perf_counter() - started
    started = time.perf_counter()
    report = fcexport.verify(folder, devices=("cpu",), inputs=inputs).to_json()
    seconds["verify"] = time.perf_counter() - started
    fused, exported = fused.to_json(), exported.to_json()
    rows = {r["backend"]: r for r in report["rows"] if r["status"] != "skipped"}
    if not report["passed"]:
        failed = {b: (r.get("problems"), r.get("max_abs"), r.get("allowed_max_abs")) for b, r in rows.items() if r["status"] != "pass"}
        raise AssertionError(f"verify failed: {failed}")
    if dense(name):
        seconds["predict"] = predict_masks(folder)
    return {
        "model": name,
        "folds": len(fused["report"]["folded"]),
        "left": [f"{x['layer']}: {x['reason']}" for x in fused["report"]["left"]],
        "max_abs": {b: r["max_abs"] for b, r in rows.items()},
        "noise_ratio": {b: r["noise_ratio"] for b, r in rows.items()},
        # each output besides the logits: its largest ratio to its own float32 error over the rows
        "other_outputs": {name: max((r["other_outputs"][name].get("noise_ratio") or 0.0) for r in rows.values())
                          for name in next(iter(rows.values())).get("other_outputs", {})},
        "own_error": report["own_float32_error"],
        "inputs": report["input_count"],
        "weak": report["weak"],  # e.g. a zero-initialised head: every input answered alike, the numbers prove little
        "skipped": exported["skipped"],
        "seconds": seconds,
    }


def predict_masks(folder: Path) -> float:
    """fcx predict on a 300 x 200 picture: its mask must cover the picture's own pixels. The seconds it took."""
    import numpy as np
    from PIL import Image

    import fcexport

    picture = folder / "picture.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (200, 300, 3), dtype=np.uint8)).save(picture)
    started = time.perf_counter()
    row = next(iter(fcexport.predict([picture], artifacts=folder, masks=folder / "masks")))
    if "error" in row or Image.open(row["mask"]).size != (300, 200):
        raise AssertionError(f"predict failed: {row}")
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="*", help="torchvision names, timm:NAME, hf:CLASS, seg:NAME or smp:ARCH:ENCODER [default: every one]")
    parser.add_argument("--untrained", action="store_true", help="keep the libraries' own initialisation")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # a child process: one model, JSON out
    parser.add_argument("--size", type=int, default=224, help=argparse.SUPPRESS)  # the child's image size
    parser.add_argument("--inputs", type=int, default=None, help=argparse.SUPPRESS)  # the child's input budget
    parser.add_argument("--timeout", type=float, default=900, help="seconds per model")
    parser.add_argument("--quick", action="store_true", help="does it run: squeezenet1_1 at 64 px, 16 inputs")
    args = parser.parse_args()
    quick = ["--size", "64", "--inputs", "16"] if args.quick else []
    if args.quick:
        args.models = ["squeezenet1_1"]
    if args.one:
        with tempfile.TemporaryDirectory() as tmp:
            try:
                print(json.dumps(run(args.models[0], Path(tmp), args.untrained, args.size, args.inputs)))
            except Exception as exc:  # the table reports it; the traceback's last line says which step and why
                print(json.dumps({"model": args.models[0], "error": f"{type(exc).__name__}: {str(exc)[:600]}"}))
        return
    names = args.models or all_models()
    print("| model | folds | max abs of each default row (x own float32 error) | s: import / fuse / export / verify |")
    print("| --- | --- | --- | --- |", flush=True)
    failed = []
    for name in names:
        command = [sys.executable, __file__, name, "--one", *quick, *(["--untrained"] if args.untrained else [])]
        try:
            out = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout).stdout.strip().splitlines()
            result = json.loads(out[-1]) if out else {"model": name, "error": "no output (crashed)"}
        except subprocess.TimeoutExpired:
            result = {"model": name, "error": f"over {args.timeout:.0f} s"}
        if "error" in result:
            print(f"| {name} | FAILED | {result['error'][:300]} | |", flush=True)
            failed.append(name)
            continue
        errors = ", ".join(f"{b} {result['max_abs'][b]:.1e} ({result['noise_ratio'][b] or 0:.1f}x)"
                           for b in result["max_abs"])
        s = result["seconds"]
        skipped = f"; not written: {', '.join(result['skipped'])}" if result["skipped"] else ""
        skipped += f"; {result['weak']}" if result.get("weak") else ""
        skipped += "".join(f"; {name} at most {ratio:.1f}x own" for name, ratio in result.get("other_outputs", {}).items())
        masks = f" / predict {s['predict']:.1f}" if "predict" in s else ""
        print(f"| {name} | {result['folds']} | {errors}{skipped} | {s['import']:.0f} / {s['fuse']:.0f} / {s['export']:.0f} / "
              f"{s['verify']:.0f}{masks} |", flush=True)
    if failed:
        sys.exit(f"{len(failed)} of {len(names)} failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
