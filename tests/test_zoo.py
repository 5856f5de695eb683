"""`make zoo`: models fcexport did not write, through the README's Python API (import_model -> fuse(verify=True)
-> export -> verify). Every torchvision classifier with at most 60M parameters, with BatchNorm statistics set
and once as the library initialises it, a list of popular timm models and transformers classes built from their configs (benchmarks/zoo.py). Long: outside
`make test`; `python benchmarks/zoo.py` prints the same as a table with seconds per step."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))

import zoo  # noqa: E402

pytestmark = pytest.mark.zoo


def pytest_generate_tests(metafunc):
    """The model list is only built when the zoo is selected (building it sizes 80 models)."""
    selected = "zoo" in (metafunc.config.getoption("markexpr") or "") and "not zoo" not in metafunc.config.getoption("markexpr")
    torchvision_names = zoo.torchvision_models() if selected else []
    cases = [(name, False) for name in torchvision_names] + [(f"timm:{n}", False) for n in zoo.TIMM_MODELS]
    cases += [(f"hf:{n}", False) for n in zoo.HF_MODELS]
    cases += [(name, True) for name in torchvision_names]
    cases += [(name, False) for name in (zoo.segmentation_models() if selected else [])]
    metafunc.parametrize("name, untrained", cases, ids=[f"{n}{'-untrained' if u else ''}" for n, u in cases])


def test_model_goes_through_end_to_end(name, untrained, tmp_path):
    result = zoo.run(name, tmp_path, untrained)  # raises, naming the step, when anything fails
    assert set(result["max_abs"]) >= {"fused", "onnxruntime"}  # (seconds per step: python benchmarks/zoo.py; tests time nothing)
    if name in zoo.SEVERAL_OUTPUTS:  # the output besides the logits was judged on every row too
        assert result["other_outputs"], result
