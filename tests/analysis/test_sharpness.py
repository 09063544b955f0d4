"""Epsilon-sharpness (analysis/sharpness.py)."""

import pytest
from analysis_toys import conv_net, toy_data

from bigbatch.analysis.landscape import evaluate_loss
from bigbatch.analysis.sharpness import epsilon_sharpness


def test_epsilon_sharpness_is_nonnegative_and_grows_with_epsilon():
    model = conv_net().eval()
    batches, _, _ = toy_data()
    small = epsilon_sharpness(model, batches, epsilon=1e-4, steps=5)
    large = epsilon_sharpness(model, batches, epsilon=1e-2, steps=5)
    assert 0 <= small["epsilon_sharpness"] < large["epsilon_sharpness"]
    assert small["base_loss"] == pytest.approx(evaluate_loss(model, batches)[0])
