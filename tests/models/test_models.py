"""LeNet-5 and the CIFAR ResNets (models/): layer shapes, the paper's layer order, ResNet-20."""

import pytest
import torch

from bigbatch.models import LeNet5, build_model, has_batchnorm


@pytest.mark.parametrize(
    "channels, size, flat", [(3, (32, 32), 400), (1, (28, 28), 256), (1, (40, 36), 16 * 7 * 6)]
)
def test_lenet5_matches_the_seed_table(channels, size, flat):
    model = LeNet5(channels, size, 10)
    assert (
        model.conv1.in_channels == channels
        and model.conv1.out_channels == 6
        and model.conv1.kernel_size == (5, 5)
    )
    assert model.conv2.out_channels == 16 and model.conv2.kernel_size == (5, 5)
    assert (model.fc1.in_features, model.fc1.out_features) == (flat, 120)
    assert (model.fc2.out_features, model.fc3.out_features) == (84, 10)
    assert model(torch.randn(4, channels, *size)).shape == (4, 10)


def test_lenet5_rejects_tiny_images():
    with pytest.raises(ValueError, match="16x16"):
        LeNet5(1, (8, 8))


def test_lenet5_equals_the_paper_order_values_and_gradients_ties_included():
    from torch.nn.functional import cross_entropy, max_pool2d, relu

    torch.manual_seed(0)
    model = LeNet5(3, (32, 32), 10)
    with torch.no_grad():  # coarse weights: many exact ties and zeros inside pooling windows
        for p in model.parameters():
            p.copy_((p * 8).round() / 8)
    x = (torch.randn(16, 3, 32, 32) * 2).round()
    y = torch.randint(0, 10, (16,))

    def paper_order(x):  # conv -> ReLU -> pool, as in the paper's Table 1
        x = max_pool2d(relu(model.conv1(x)), 2)
        x = max_pool2d(relu(model.conv2(x)), 2).flatten(1)
        return model.fc3(relu(model.fc2(relu(model.fc1(x)))))

    grads = []
    for forward in (model, paper_order):
        model.zero_grad()
        logits = forward(x)
        cross_entropy(logits, y).backward()
        grads.append((logits.detach(), [p.grad.clone() for p in model.parameters()]))
    assert torch.equal(grads[0][0], grads[1][0])
    assert all(torch.equal(a, b) for a, b in zip(grads[0][1], grads[1][1]))
    with torch.inference_mode():
        assert torch.equal(model.eval()(x), paper_order(x))


def test_resnet20():
    model = build_model("resnet20", 3, (32, 32), 10)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 19  # plus one fc layer = 20 weighted layers
    assert has_batchnorm(model) and not has_batchnorm(build_model("lenet5", 3, (32, 32), 10))
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
