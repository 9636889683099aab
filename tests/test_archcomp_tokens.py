"""o(A) and o⁻¹ of Ashok, Architecture Compression (arXiv:1902.03326): architectures <-> [t, k, o, s, p] token sequences."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_prune import count_cost
from lightning_prune.archcomp import ConvK, InvalidArchitecture, LayerType, Token, build, param_count, plan, to_tokens
from lightning_prune.models import CifarResNet, CifarVGG, LeNet5

MNIST = (1, 28, 28)
CIFAR = (3, 32, 32)


def leaf_types(model: nn.Module) -> list[type]:
    return [type(m) for m in model.modules() if next(m.children(), None) is None and not isinstance(m, (nn.Flatten, nn.Identity))]


def assert_same_network(original: nn.Module, rebuilt: nn.Module, shape: tuple[int, int, int]) -> None:
    """Same layer types in order, same parameter count, and, with the original's weights, the same outputs."""
    assert leaf_types(rebuilt) == leaf_types(original)
    x = torch.randn(2, *shape)
    assert count_cost(rebuilt, x[:1]).params == count_cost(original, x[:1]).params
    src, dst = original.state_dict(), rebuilt.state_dict()
    assert [v.shape for v in src.values()] == [v.shape for v in dst.values()]
    rebuilt.load_state_dict(dict(zip(dst.keys(), src.values())))
    original.eval(), rebuilt.eval()
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), original(x))


def test_conv_k_tokens_golden() -> None:
    assert to_tokens(ConvK(depth=2, channels=4), MNIST) == [
        Token(1, 3, 4, 1, 1), Token(3, 0, 4, 0, 0), Token(4, 0, 4, 0, 0),
        Token(1, 3, 4, 1, 1), Token(3, 0, 4, 0, 0), Token(4, 0, 4, 0, 0),
        Token(8, 0, 10, 0, 0),
    ]  # fmt: skip


def test_conv7_roundtrip_and_paper_size() -> None:
    net = ConvK(depth=7, channels=64)
    tokens = to_tokens(net, MNIST)
    assert len(tokens) == 22
    rebuilt = build(tokens, MNIST, num_classes=10)
    assert rebuilt.plan.params == param_count(tokens, MNIST) == 724_426  # the paper reports 708K
    assert_same_network(net, rebuilt, MNIST)


@pytest.mark.parametrize("depth, channels", [(3, [4, 8, 16]), (10, 6)])
def test_conv_k_family_roundtrip(depth: int, channels: int | list[int]) -> None:
    net = ConvK(depth=depth, channels=channels, input_shape=CIFAR)
    assert_same_network(net, build(to_tokens(net, CIFAR), CIFAR), CIFAR)


def test_vgg16_roundtrip() -> None:
    net = CifarVGG(num_classes=10)
    tokens = to_tokens(net, CIFAR)
    kinds = [LayerType(t.t) for t in tokens]
    assert kinds.count(LayerType.CONV) == 13 and kinds.count(LayerType.MAXPOOL) == 5
    assert kinds[-5:] == [LayerType.MAXPOOL, LayerType.LINEAR, LayerType.BATCHNORM, LayerType.RELU, LayerType.LINEAR]
    rebuilt = build(tokens, CIFAR, num_classes=10)
    assert isinstance(rebuilt[-3], nn.BatchNorm1d)  # BatchNorm after the flatten
    assert rebuilt.plan.params == 14_987_722
    assert_same_network(net, rebuilt, CIFAR)


def test_conv_with_bias_without_batchnorm_roundtrip() -> None:
    net = LeNet5()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # LeNet-5 follows the bias convention: no warning
        tokens = to_tokens(net, MNIST)
    assert_same_network(net, build(tokens, MNIST), MNIST)


def test_functional_relu_and_flatten_are_traced() -> None:
    class Functional(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 3, 5, stride=2)
            self.fc = nn.Linear(3 * 12 * 12, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(torch.flatten(F.relu(self.conv(x)), 1))

    assert to_tokens(Functional(), MNIST) == [Token(1, 5, 3, 2, 0), Token(4, 0, 3, 0, 0), Token(8, 0, 10, 0, 0)]


def test_skip_connections_are_rejected_with_reason() -> None:
    with pytest.raises(ValueError, match="skip connections"):
        to_tokens(CifarResNet(depth=20), CIFAR)


def test_unrepresentable_layers_are_rejected() -> None:
    with pytest.raises(ValueError, match="grouped or dilated"):
        to_tokens(nn.Sequential(nn.Conv2d(2, 4, 3, groups=2), nn.Flatten(), nn.Linear(4 * 26 * 26, 10)), (2, 28, 28))
    with pytest.raises(ValueError, match="AdaptiveAvgPool2d is not one of the 8"):
        to_tokens(nn.Sequential(nn.Conv2d(1, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10)), MNIST)
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        to_tokens("vgg", CIFAR)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="input_shape"):
        to_tokens(ConvK(1, 2), (28, 28))  # type: ignore[arg-type]


def test_bias_convention_departure_warns() -> None:
    net = nn.Sequential(nn.Conv2d(1, 4, 3, bias=True), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 26 * 26, 10))
    with pytest.warns(UserWarning, match="rebuild it without one"):
        tokens = to_tokens(net, MNIST)
    assert param_count(tokens, MNIST) == count_cost(net, torch.zeros(1, *MNIST)).params - 4


def test_strict_plan_lists_every_problem() -> None:
    tokens = [
        [4, 0, 7, 0, 0],  # ReLU claiming 7 channels on a 1-channel input
        [1, 3, 8, 1, 1],
        [8, 0, 32, 0, 0],
        [1, 3, 8, 1, 1],  # conv after a Linear
        [8, 0, 5, 0, 0],  # last layer not Linear(10)
    ]
    with pytest.raises(InvalidArchitecture) as info:
        plan(tokens, MNIST, num_classes=10)
    reasons = info.value.reasons
    assert len(reasons) == 3
    assert "not canonical" in reasons[0] and "cannot follow a Linear" in reasons[1] and "Linear(10)" in reasons[2]


def test_strict_plan_rejects_collapsing_feature_map() -> None:
    with pytest.raises(InvalidArchitecture, match=r"layer 1 \(MAXPOOL\): a 3x3 input becomes 0x0"):
        plan([[1, 5, 4, 10, 0], [2, 5, 4, 5, 0], [8, 0, 10, 0, 0]], MNIST)


def test_repair_fixes_decoder_output_and_says_what_it_did() -> None:
    decoded = [
        [0.2, 0, 0, 0, 0],  # empty slot
        [1.1, 2.9, 15.6, 0.8, 1.2],  # conv, fields not integers, stride 1
        [2, 7, 99, 2, 9],  # max-pool: channels = input, padding capped at k // 2
        [4, 3, 0, 2, 1],  # ReLU with fields it does not have
        [8, 0, 20, 0, 0],
        [2, 2, 5, 2, 0],  # pool after a Linear: removed
        [11, 0, 3, 0, 0],  # type out of range -> Linear; outputs set to num_classes
    ]
    fixed = plan(decoded, MNIST, num_classes=10, repair=True)
    assert fixed.tokens == (
        Token(1, 3, 16, 1, 1), Token(2, 7, 16, 2, 3), Token(4, 0, 16, 0, 0), Token(8, 0, 20, 0, 0), Token(8, 0, 10, 0, 0),
    )  # fmt: skip
    assert len(fixed.repairs) >= 6
    assert any("empty slot" in r for r in fixed.repairs) and any("after a Linear" in r for r in fixed.repairs)
    net = build(fixed)
    assert net(torch.zeros(2, *MNIST)).shape == (2, 10)
    assert count_cost(net, torch.zeros(1, *MNIST)).params == fixed.params


def test_repair_appends_classifier_and_drops_collapsing_layers() -> None:
    fixed = plan([[1, 3, 4, 1, 0], [7, 30, 4, 9, 0], [4, 0, 4, 0, 0]], MNIST, num_classes=10, repair=True)
    assert [t.t for t in fixed.tokens] == [LayerType.CONV, LayerType.RELU, LayerType.LINEAR]
    assert fixed.shapes[-1] == (10,) and fixed.params == 1 * 9 * 4 + 4 + 4 * 26 * 26 * 10 + 10


def test_repair_cannot_invent_a_network() -> None:
    with pytest.raises(InvalidArchitecture, match="no layers"):
        plan([[0, 0, 0, 0, 0]], MNIST, num_classes=10, repair=True)


def test_plan_input_validation() -> None:
    with pytest.raises(ValueError, match=r"tokens\[0\] must have 5 fields"):
        plan([[1, 3, 4]], MNIST)
    with pytest.raises(TypeError, match="tokens must be a sequence"):
        plan("conv", MNIST)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="num_classes"):
        plan([[8, 0, 10, 0, 0]], MNIST, num_classes=0)
    assert plan(torch.tensor([[8, 0, 10, 0, 0]]), MNIST).params == 784 * 10 + 10
