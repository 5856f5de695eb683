"""The library as a notebook uses it: no process-wide side effects, no mutation of what it is given."""

from __future__ import annotations

import dataclasses
import sys
import warnings

import pytest
import torch

import fcexport
from fcexport.options import TrainOptions
from fcexport.spec import ModelSpec


def test_train_export_verify_leave_the_process_as_they_found_it(tmp_path):
    import matplotlib

    torch.manual_seed(1234)
    rng_before = torch.get_rng_state()
    filters, backend, modules = list(warnings.filters), matplotlib.get_backend(), set(sys.modules)
    opts = TrainOptions(data="digits", hidden=[16], epochs=1, batch_size=64, artifacts=str(tmp_path))
    fcexport.train(opts)
    fcexport.export(tmp_path / "model.pt", tmp_path, formats=("onnx",))
    assert fcexport.verify(tmp_path, backends=("fused", "onnxruntime"), devices=("cpu",)).passed
    assert torch.equal(torch.get_rng_state(), rng_before)  # the caller's RNG stream is untouched
    assert warnings.filters == filters and matplotlib.get_backend() == backend
    assert "matplotlib.pyplot" not in set(sys.modules) - modules  # figures are drawn without pyplot's global state
    assert opts == TrainOptions(data="digits", hidden=[16], epochs=1, batch_size=64, artifacts=str(tmp_path))  # not filled in


def test_import_model_leaves_the_module_as_it_was(tmp_path):
    from torch import nn

    module = nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.BatchNorm1d(8), nn.Linear(8, 3)).train()
    weights = {k: v.clone() for k, v in module.state_dict().items()}
    fcexport.import_model(module, (1, 8, 8), artifacts=tmp_path)
    assert module.training and all(torch.equal(v, weights[k]) for k, v in module.state_dict().items())


def test_the_spec_is_frozen_and_changed_only_by_replace():
    spec = ModelSpec((1, 8, 8), ("a", "b"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.class_names = ("c", "d")
    with pytest.raises(TypeError):
        spec.architecture.details["kind"] = "x"  # nested parts are read-only too
    renamed = dataclasses.replace(spec, class_names=("c", "d"))
    assert renamed.class_names == ("c", "d") and spec.class_names == ("a", "b")
    assert ModelSpec.from_dict(renamed.to_dict()) == renamed  # one codec, round trip exact
    with pytest.raises(fcexport.FcxError, match="duplicates"):
        dataclasses.replace(spec, class_names=("a", "a"))  # replace validates like construction
