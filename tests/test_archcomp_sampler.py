"""Random architectures of Ashok, Architecture Compression (arXiv:1902.03326), Appendix 9."""

from __future__ import annotations

import pytest
import torch

from lightning_prune import count_cost
from lightning_prune.archcomp import ArchitectureSampler, LayerType, Token, build, param_count, plan

MNIST = (1, 28, 28)
LIMITS = dict(max_macs=2e6, max_params=100e3, max_activations=50e3)


def small_sampler(**kwargs: object) -> ArchitectureSampler:
    args = dict(length=(2, 16), kernel=(1, 5), stride=(1, 3), padding=(0, 2), channels=(4, 32), **LIMITS, seed=3)
    args.update(kwargs)
    return ArchitectureSampler(MNIST, 10, **args)  # type: ignore[arg-type]


def test_sampled_architectures_are_valid_and_run() -> None:
    sampler = small_sampler()
    kinds = set()
    for index in range(25):
        arch = sampler.sample(index)
        tokens = list(arch.tokens)
        checked = plan(tokens, MNIST, num_classes=10)  # strict: canonical, valid, ends in Linear(10)
        assert checked.tokens == arch.tokens
        assert 2 <= len(tokens) <= 16
        assert tokens[-1] == Token(LayerType.LINEAR, 0, 10, 0, 0)
        assert any(t.t == LayerType.CONV for t in tokens)
        kinds.update(t.t for t in tokens)
        net = build(tokens, MNIST)
        out = net(torch.randn(3, *MNIST))
        assert out.shape == (3, 10) and torch.isfinite(out).all()
        cost = count_cost(net, torch.zeros(1, *MNIST))
        assert (cost.macs, cost.params, cost.volume) == (arch.macs, arch.params, arch.activations)
        assert cost.params == param_count(tokens, MNIST)
        assert cost.macs <= LIMITS["max_macs"] and cost.params <= LIMITS["max_params"]
        assert cost.volume <= LIMITS["max_activations"]
        for i, tok in enumerate(tokens):  # nothing spatial after the first Linear
            if tok.t == LayerType.LINEAR:
                assert all(t.t not in (LayerType.CONV, LayerType.MAXPOOL, LayerType.AVGPOOL) for t in tokens[i:])
                break
    assert kinds == set(LayerType)  # all 8 layer types occur


def test_sampling_is_deterministic_per_index() -> None:
    a, b = small_sampler(), small_sampler()
    assert [a.sample(i).tokens for i in (0, 7)] == [b.sample(i).tokens for i in (7, 0)][::-1]
    assert a.sample(0).tokens != a.sample(1).tokens
    assert small_sampler(seed=4).sample(0).tokens != a.sample(0).tokens


def test_degenerate_architectures_are_rejected() -> None:
    sampler = small_sampler()
    assert sampler.rejection([Token(8, 0, 10, 0, 0)]).startswith("no-conv")
    assert sampler.rejection([Token(1, 5, 4, 5, 0), Token(2, 7, 4, 5, 0), Token(8, 0, 10, 0, 0)]).startswith("invalid")
    assert sampler.rejection([Token(1, 3, 64, 1, 1), Token(8, 0, 10, 0, 0)]).startswith("params")  # 502K params
    assert sampler.rejection([Token(1, 3, 4, 1, 1), Token(8, 0, 10, 0, 0)]) is None
    tight = small_sampler(max_macs=10.0, max_tries=50)
    with pytest.raises(RuntimeError, match=r"no valid architecture in 50 draws .*macs"):
        tight.sample(0)


def test_sampler_argument_validation() -> None:
    with pytest.raises(ValueError, match="length"):
        small_sampler(length=(1, 5))
    with pytest.raises(ValueError, match="channels"):
        small_sampler(channels=(8, 4))
    with pytest.raises(TypeError, match="kernel"):
        small_sampler(kernel=3)
    with pytest.raises(ValueError, match="max_macs"):
        small_sampler(max_macs=-1)
    with pytest.raises(ValueError, match="index"):
        small_sampler().sample(-1)
