"""fcexport: train small fully connected image classifiers and ship them as verified artifacts.

The package is imported by `fcx --help` and `fcx predict` on ONNX models, which must not pay
for importing torch, so heavy names are resolved lazily on first use.
"""

__version__ = "0.1.0"

__all__ = ["__version__", "fuse_batchnorm", "FcxError"]


def __getattr__(name: str):
    # Lazy re-exports: `fcexport.fuse_batchnorm` without importing torch at package import.
    if name == "fuse_batchnorm":
        from fcexport.fuse import fuse_batchnorm

        return fuse_batchnorm
    if name == "FcxError":
        from fcexport.errors import FcxError

        return FcxError
    raise AttributeError(f"module 'fcexport' has no attribute {name!r}")
