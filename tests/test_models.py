"""Model builders and config validation."""

import pytest
import torch
from torch import nn

from fcexport.errors import FcxError
from fcexport.models import build_model, count_parameters, model_config


def test_default_mlp_is_784_784_256_10_with_batchnorm():
    model = build_model(model_config([1, 28, 28], 10, [784, 256], normalize={"mean": 0.3, "std": 0.35}))
    names = [n for n, _ in model.named_children()]
    assert names == ["flatten", "normalize", "fc1", "bn1", "act1", "fc2", "bn2", "act2", "head"]
    assert model(torch.rand(3, 1, 28, 28)).shape == (3, 10)
    assert count_parameters(model) == 784 * 784 + 784 + 784 * 256 + 256 + 256 * 10 + 10 + 2 * (784 + 256)


@pytest.mark.parametrize("activation", ["relu", "gelu", "tanh", "sigmoid"])
def test_activations_and_dropout(activation):
    model = build_model(model_config([1, 8, 8], 3, [16], dropout=0.5, activation=activation))
    assert isinstance(model.drop1, nn.Dropout) and model(torch.rand(2, 1, 8, 8)).shape == (2, 3)


def test_softmax_regression_is_one_linear_layer():
    model = build_model(model_config([1, 8, 8], 10, [64], arch="softmax"))
    assert [type(m) for m in model.children()] == [nn.Flatten, nn.Linear]


@pytest.mark.parametrize(
    "change",
    [{"arch": "rnn"}, {"arch": "cnn"}, {"activation": "swish"}, {"hidden": [0]}, {"dropout": 1.0}, {"normalize": {"mean": 0, "std": 0}}],
)
def test_invalid_configs_are_user_errors(change):
    config = {**model_config([1, 8, 8], 10, [16]), **change}
    with pytest.raises(FcxError):
        build_model(config)
