"""LeanUNet: shapes, zero-initialised output, gradient flow, per-item noise embedding."""

from __future__ import annotations

import json

import pytest
import torch

from mediff.nets import Attention, LeanUNet, ResBlock, UNetConfig


def _net(cond_dim: int = 0, seed: int = 0, **kw) -> LeanUNet:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return LeanUNet(UNetConfig(cond_dim=cond_dim, **kw))


def _perturb_zero_init(net: LeanUNet, everywhere: bool) -> None:
    """Give the zero-initialised layers small random weights (only the output layer, or all of them)."""
    g = torch.Generator().manual_seed(123)
    layers = [net.out]
    if everywhere:
        layers += [m.conv2 for m in net.modules() if isinstance(m, ResBlock)]
        layers += [m.proj for m in net.modules() if isinstance(m, Attention)]
    with torch.no_grad():
        for layer in layers:
            for p in (layer.weight, layer.bias):
                p.copy_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))


@pytest.mark.parametrize("size", [64, 128])
@pytest.mark.parametrize("cond_dim", [0, 4])
def test_shape_and_zero_output_at_init(size, cond_dim):
    net = _net(cond_dim)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 1, size, size, generator=g)
    c_noise = torch.tensor([-1.0, 0.7])
    cond = torch.randn(2, cond_dim, generator=g) if cond_dim else None
    with torch.no_grad():
        out = net(x, c_noise, cond)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert torch.count_nonzero(out) == 0  # the output conv is zero-initialised
    _perturb_zero_init(net, everywhere=False)
    with torch.no_grad():
        out = net(x, c_noise, cond)
    assert out.shape == x.shape and torch.isfinite(out).all() and out.abs().max() > 0


def test_gradients_flow_to_all_parameters():
    net = _net(cond_dim=4)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 1, 64, 64, generator=g)
    c_noise, cond = torch.tensor([-0.5, 0.5]), torch.randn(2, 4, generator=g)
    w = torch.randn(2, 1, 64, 64, generator=g)

    # Only the output layer perturbed: every trainable parameter gets a gradient, and in particular the
    # zero-initialised convolutions (residual conv2, attention proj) get non-zero ones, so they can learn.
    _perturb_zero_init(net, everywhere=False)
    (net(x, c_noise, cond) * w).sum().backward()
    for name, p in net.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
    zero_init = [n for n, _ in net.named_parameters() if n.endswith(("conv2.weight", "proj.weight"))]
    assert zero_init
    params = dict(net.named_parameters())
    for name in zero_init:
        assert params[name].grad.abs().sum() > 0, name

    # All zero-initialised layers perturbed: every trainable parameter gets a non-zero gradient.
    net.zero_grad(set_to_none=True)
    _perturb_zero_init(net, everywhere=True)
    (net(x, c_noise, cond) * w).sum().backward()
    trainable = [(n, p) for n, p in net.named_parameters() if p.requires_grad]
    assert len(trainable) > 50
    for name, p in trainable:
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert net.freqs.grad is None  # the Fourier features are fixed


def test_per_item_noise_level_and_cond():
    net = _net(cond_dim=4).double()
    _perturb_zero_init(net, everywhere=True)
    g = torch.Generator().manual_seed(3)
    x1 = torch.randn(1, 1, 64, 64, generator=g, dtype=torch.float64)
    x = x1.expand(3, -1, -1, -1).contiguous()
    c_noise = torch.tensor([-1.2, 0.0, 0.9], dtype=torch.float64)
    cond = torch.randn(3, 4, generator=g, dtype=torch.float64)
    with torch.no_grad():
        batch = net(x, c_noise, cond)
        for i in range(3):
            assert torch.allclose(batch[i:i + 1], net(x[i:i + 1], c_noise[i:i + 1], cond[i:i + 1]), atol=1e-10)
        # Same image, different noise levels / covariates: different outputs.
        assert (batch[0] - batch[1]).abs().max() > 1e-4
        other = net(x, c_noise, cond + 1.0)
        assert (other - batch).abs().max() > 1e-4
        # No covariates means the zero vector (the classifier-free guidance null condition).
        assert torch.allclose(net(x, c_noise, None), net(x, c_noise, torch.zeros_like(cond)), atol=1e-12)


def test_config_round_trips_through_json():
    cfg = UNetConfig(channels=(16, 32), blocks=(1, 2), attention_levels=(1,), cond_dim=3)
    assert UNetConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_small_config_shapes():
    net = _net(channels=(16, 32), blocks=(1, 2), attention_levels=(1,), emb_dim=32, groups=8, in_channels=2)
    x = torch.randn(3, 2, 16, 16, generator=torch.Generator().manual_seed(4))
    _perturb_zero_init(net, everywhere=True)
    with torch.no_grad():
        assert net(x, torch.zeros(3)).shape == x.shape
