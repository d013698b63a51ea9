"""Aux-loss-free balancing: the bias moves against the load; the violation metric."""

import pytest
import torch

from seektrain.model.config import ModelConfig
from seektrain.model.transformer import Transformer
from seektrain.train.balance import max_violation, update_expert_bias


def test_bias_update_direction_on_the_real_model():
    cfg = ModelConfig.from_preset("tiny")
    model = Transformer(cfg)
    layers = model.moe_layers()
    E = cfg.n_routed_experts
    counts = torch.zeros(len(layers), E, dtype=torch.int64)
    counts[:, 0] = 10  # overloaded
    counts[:, 1] = 2  # mean is 1 when the rest is 0... set a known mean below
    counts[:, 2:] = 1
    mean = counts.float().mean(dim=1, keepdim=True)
    update_expert_bias(layers, counts, speed=0.01)
    for row, layer in zip(counts, layers, strict=False):
        bias = layer.e_score_correction_bias
        expected = 0.01 * torch.sign(mean[0] - row.float())
        torch.testing.assert_close(bias, expected)
        assert bias[0] < 0  # the overloaded expert is chosen less often next time
        assert bias[2] > 0 or row[2] >= mean[0]
    assert not any(b is layers[0].e_score_correction_bias for b in model.parameters())


def test_speed_zero_is_off():
    model = Transformer(ModelConfig.from_preset("tiny"))
    layers = model.moe_layers()
    counts = torch.randint(0, 9, (len(layers), model.cfg.n_routed_experts))
    update_expert_bias(layers, counts, speed=0.0)
    assert all(torch.count_nonzero(layer.e_score_correction_bias) == 0 for layer in layers)


def test_max_violation():
    counts = torch.tensor([[4, 4, 4, 4], [8, 0, 4, 4]])
    assert max_violation(counts) == pytest.approx((0.0 + 1.0) / 2)
