"""BatchNorm input statistics gathered by hooks equal an independent eval-mode pass over the same
images; the hooks leave the network's outputs alone; saved statistics load back exactly."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from tl_lightning.advisor.bn_stats import BatchNormInputs


def tiny_net() -> nn.Sequential:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 6, 3),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(6, 5),
        nn.BatchNorm1d(5),
    )
    for m in net:  # pretrained-like running statistics, far from the defaults
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-2, 2)
            m.running_var.uniform_(0.5, 3)
            m.weight.data.uniform_(0.5, 2)
            m.bias.data.uniform_(-1, 1)
    return net.eval()


@torch.no_grad()
def independent_moments(net: nn.Sequential, images: torch.Tensor) -> list[tuple]:
    """Each BN layer's input over all ``images`` at once, in float64, layer by layer by hand:
    eval-mode BN applied with its formula, per-channel mean and population variance by numpy."""
    x = images.double()
    out = []
    for m in net:
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            v = x.transpose(0, 1).reshape(x.shape[1], -1).numpy()
            out.append((v.mean(1), v.var(1)))
            shape = [1, -1] + [1] * (x.ndim - 2)
            mean, var = m.running_mean.double().view(shape), m.running_var.double().view(shape)
            x = (x - mean) / torch.sqrt(var + m.eps) * m.weight.double().view(
                shape
            ) + m.bias.double().view(shape)
        else:
            x = copy.deepcopy(m).double()(x)
    return out


@pytest.mark.parametrize("channels_last", [False, True])
def test_hooked_statistics_equal_an_independent_eval_pass(channels_last):
    net = tiny_net()
    g = torch.Generator().manual_seed(1)
    images = torch.randn(23, 3, 6, 6, generator=g) * 2.0 + 1.5
    expected = independent_moments(net, images)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    with torch.no_grad(), BatchNormInputs(net) as bn:
        for batch in images.split(5):  # 5, 5, 5, 5, 3: unequal batches weigh by their size
            x = batch.contiguous(memory_format=torch.channels_last) if channels_last else batch
            net(x)
    got = list(bn.moments().values())
    assert [n for n, _, _ in got] == [23 * 36, 23 * 16, 23]
    for (_, mean, var), (mean_ref, var_ref) in zip(got, expected, strict=True):
        np.testing.assert_allclose(mean.numpy(), mean_ref, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(var.numpy(), var_ref, rtol=1e-5, atol=1e-5)


def test_shift_is_the_formula_over_the_moments():
    net = tiny_net()
    images = torch.randn(16, 3, 6, 6, generator=torch.Generator().manual_seed(2))
    expected = independent_moments(net, images)
    with torch.no_grad(), BatchNormInputs(net) as bn:
        net(images)
    layers = [m for m in net if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    by_hand = np.mean(
        [
            np.mean(
                np.abs(mean - m.running_mean.double().numpy())
                / np.sqrt(m.running_var.double().numpy() + m.eps)
                + np.abs(
                    np.log(np.sqrt(var + m.eps) / np.sqrt(m.running_var.double().numpy() + m.eps))
                )
            )
            for m, (mean, var) in zip(layers, expected, strict=True)
        ]
    )
    assert bn.shift() == pytest.approx(by_hand, rel=1e-5)


def test_the_hooks_leave_the_outputs_alone():
    net = tiny_net()
    images = torch.randn(8, 3, 6, 6)
    with torch.no_grad():
        plain = net(images)
        with BatchNormInputs(net):
            hooked = net(images)
        after = net(images)
    assert torch.equal(plain, hooked) and torch.equal(plain, after)  # and the hooks are gone
    assert all(not m._forward_pre_hooks for m in net)


def test_saved_statistics_load_back_and_only_into_the_same_layers(tmp_path):
    net = tiny_net()
    with torch.no_grad(), BatchNormInputs(net) as bn:
        net(torch.randn(7, 3, 6, 6))
    path = bn.save(tmp_path / "stats.npz")
    again = BatchNormInputs(net)
    assert not again.seen and again.load(path) and again.seen
    for (n, m, v), (n2, m2, v2) in zip(bn.moments().values(), again.moments().values()):
        assert n == n2 and torch.equal(m, m2) and torch.equal(v, v2)
    assert again.shift() == bn.shift()
    other = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    assert not BatchNormInputs(other).load(path)
    assert not BatchNormInputs(net).load(tmp_path / "absent.npz")


def test_a_network_in_train_mode_is_refused():
    net = tiny_net().train()
    before = [m.running_mean.clone() for m in net if hasattr(m, "running_mean")]
    with torch.no_grad(), BatchNormInputs(net), pytest.raises(RuntimeError, match="eval mode"):
        net(torch.randn(4, 3, 6, 6))
    # refused before the first layer normalised anything: no running statistic moved
    after = [m.running_mean for m in net if hasattr(m, "running_mean")]
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
