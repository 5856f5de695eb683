"""fcexport: ship small image classifiers as verified TorchScript and ONNX artifacts.

Ways in: `import_model(module, input_shape, ...)` for a live nn.Module, `import_weights(...)` for a
state dict plus the model's code, `import_pretrained(folder_or_module)` for a Hugging Face folder or a
transformers / timm model with what it says about itself, `train(TrainOptions(...))`. Each writes ARTIFACTS/model.pt, which
`fuse`, `export`, `verify`, `bench` and `predict` take from there; `fuse_batchnorm(module, x)` folds
BatchNorm in any module torch.export can export. Each function is also an `fcx` command.

The package is imported by `fcx --help` and `fcx predict` on ONNX models, which must not pay for
importing torch, so these names are resolved on first use.
"""

__version__ = "0.3.0"

# public name -> module that defines it
_EXPORTS = {
    "import_model": "fcexport.pipeline",
    "import_weights": "fcexport.pipeline",
    "import_pretrained": "fcexport.pipeline",
    "train": "fcexport.pipeline",
    "fuse": "fcexport.pipeline",
    "export": "fcexport.pipeline",
    "verify": "fcexport.pipeline",
    "bench": "fcexport.pipeline",
    "predict": "fcexport.pipeline",
    "open_predictor": "fcexport.registry",
    "load_model": "fcexport.checkpoint",
    "fuse_batchnorm": "fcexport.folding",
    "fuse_with_report": "fcexport.folding",
    "ModelSpec": "fcexport.spec",
    "Tolerance": "fcexport.compare",
    "TrainOptions": "fcexport.options",
    "FcxError": "fcexport.errors",
}
__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'fcexport' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
