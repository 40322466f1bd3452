"""Models `vgg16`, `vgg19`: the CIFAR networks of the paper (appendix A.2).

VGG-16 / VGG-19 (Simonyan & Zisserman's configurations D and E, taken from torchvision's `vgg.cfgs`) as the paper
changes them: no batch normalization, no dropout, the two 4096-unit fully connected layers replaced by 512-unit
ones, every weight initialized orthogonally (Saxe et al., 2014), biases zero. On 32x32 inputs the five max pools
leave a 1x1x512 feature map; other input sizes work too (the first linear layer follows from the size).

torchvision's `make_layers` is not used because it hard-codes 3 input channels; the configuration lists are its.
"""

from __future__ import annotations

from torch import nn
from torchvision.models.vgg import cfgs as VGG_CONFIGS

from harness.plugin import ModelPlugin

HIDDEN = 512  # the paper's replacement for VGG's 4096


def vgg_features(config: list, in_channels: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for item in config:
        if item == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(in_channels, item, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
            in_channels = item
    return nn.Sequential(*layers)


def orthogonal_init(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            nn.init.orthogonal_(module.weight)  # flattens conv weights to out x (in*k*k), as spectral norm does
            if module.bias is not None:
                nn.init.zeros_(module.bias)


class _VGG(ModelPlugin):
    config_key = ""

    def build(self, num_classes: int, input_shape: tuple[int, int, int]) -> nn.Module:
        channels, height, width = input_shape
        if height < 32 or width < 32:
            from harness.errors import BadInput

            raise BadInput(f"{type(self).__name__} needs inputs of at least 32x32 (five 2x2 max pools), "
                           f"got {height}x{width}", fix="use a dataset with larger images, or another model")
        model = nn.Sequential(
            vgg_features(VGG_CONFIGS[self.config_key], channels),
            nn.Flatten(),
            nn.Linear(512 * (height // 32) * (width // 32), HIDDEN), nn.ReLU(inplace=True),
            nn.Linear(HIDDEN, HIDDEN), nn.ReLU(inplace=True),
            nn.Linear(HIDDEN, num_classes),
        )
        orthogonal_init(model)
        return self.normalize(model)


class VGG16(_VGG):
    """VGG-16 without batch norm or dropout, 512-unit classifier, orthogonal init (paper A.2)."""

    config_key = "D"


class VGG19(_VGG):
    """VGG-19 without batch norm or dropout, 512-unit classifier, orthogonal init (paper A.2)."""

    config_key = "E"
