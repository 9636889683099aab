import pytest
import torch

from lightning_prune import count_cost
from lightning_prune.models import CifarResNet, CifarVGG, LeNet5, LeNet300100, WideResNet, torchvision_model

MNIST_INPUT = torch.zeros(2, 1, 28, 28)
CIFAR_INPUT = torch.zeros(2, 3, 32, 32)


@pytest.mark.parametrize(
    ("factory", "example", "published", "rel_tol"),
    [
        # exact counts of the architectures as defined
        (lambda: LeNet5(), MNIST_INPUT, 431_080, 0.0),  # LeNet-5 Caffe: 431K
        (lambda: LeNet300100(), MNIST_INPUT, 266_610, 0.0),  # LeNet-300-100: 267K
        # published figures (rounded in the papers)
        (lambda: CifarVGG(), CIFAR_INPUT, 15.0e6, 0.01),  # Li et al. 2017: 1.5e7
        (lambda: CifarResNet(20), CIFAR_INPUT, 0.27e6, 0.02),  # He et al. 2016: 0.27M
        (lambda: CifarResNet(32), CIFAR_INPUT, 0.46e6, 0.02),
        (lambda: CifarResNet(56), CIFAR_INPUT, 0.85e6, 0.01),
        (lambda: CifarResNet(110), CIFAR_INPUT, 1.7e6, 0.02),
        (lambda: WideResNet(16, 4), CIFAR_INPUT, 2.75e6, 0.01),  # Zagoruyko & Komodakis: 2.7M
        (lambda: WideResNet(28, 10), CIFAR_INPUT, 36.5e6, 0.01),  # 36.5M
        (lambda: torchvision_model("resnet18", num_classes=10), CIFAR_INPUT, 11_181_642, 0.0),
    ],
)
def test_output_shape_and_parameter_count(factory, example, published, rel_tol):
    model = factory().eval()
    with torch.no_grad():
        out = model(example)
    assert out.shape == (2, 10)
    params = sum(p.numel() for p in model.parameters())
    assert params == pytest.approx(published, rel=rel_tol)


def test_lenet5_macs_match_the_paper_baseline():
    # Lemaire, Achkar and Jodoin, "Structured Pruning of Neural Networks with Budget-Aware
    # Regularization" (CVPR 2019, arXiv:1811.09332) and the issue: LeNet-5 keeps all 2.29M MACs.
    assert count_cost(LeNet5(), MNIST_INPUT).macs == 2_293_000


def test_option_b_shortcut_adds_2720_parameters_to_every_depth():
    # Option A ResNet-20 has 269,722 parameters; option B adds two 1x1 convs + BN.
    assert sum(p.numel() for p in CifarResNet(20).parameters()) == 269_722 + 2_752


def test_width_multiplier_scales_hidden_layers_but_not_the_head():
    half = LeNet5(width=0.5)
    assert half.features[0].out_channels == 10
    assert half.features[2].out_channels == 25
    assert half.classifier[1].out_features == 250
    assert half.classifier[3].out_features == 10
    r = CifarResNet(20, width=0.5)
    assert [r.conv1.out_channels, r.layer2[0].conv1.out_channels, r.fc.in_features] == [8, 16, 32]
    assert r(CIFAR_INPUT).shape == (2, 10)


def test_num_classes_and_in_channels():
    assert LeNet5(num_classes=7)(MNIST_INPUT).shape == (2, 7)
    assert CifarVGG(num_classes=100).eval()(CIFAR_INPUT).shape == (2, 100)
    assert CifarResNet(20, in_channels=1).eval()(torch.zeros(2, 1, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: CifarResNet(21), ValueError, "depth must be 6n\\+2"),
        (lambda: WideResNet(17, 4), ValueError, "depth must be 6n\\+4"),
        (lambda: WideResNet(16, 0), ValueError, "widen_factor"),
        (lambda: LeNet5(width=0), ValueError, "width must be > 0"),
        (lambda: LeNet5(width="1"), TypeError, "width must be a number"),
        (lambda: torchvision_model("not_a_model"), ValueError, "name must be a torchvision classification model"),
        (lambda: torchvision_model("resnet18", weights="DEFAULT"), ValueError, "weights"),
    ],
)
def test_bad_arguments_raise_clear_errors(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_torchvision_model_by_name_depthwise_and_concat():
    for name in ("mobilenet_v2", "densenet121"):
        m = torchvision_model(name, num_classes=5).eval()
        with torch.no_grad():
            assert m(torch.zeros(1, 3, 64, 64)).shape == (1, 5)
