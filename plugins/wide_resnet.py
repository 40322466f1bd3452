"""Model `wrn50-2`: the Tiny ImageNet network of the paper (appendix A.2), built from timm's `wide_resnet50_2`.

timm's model already has what the paper keeps: bottleneck blocks [3, 4, 6, 3], 3x3 convolutions of
[64, 128, 256, 512] x 2 channels, batch normalization, no dropout. The paper's changes, made here:
- the 7x7 stride-2 stem convolution becomes 3x3, stride 1, padding 1;
- the max pooling after it is removed;
- every convolution is initialized Xavier-uniform (Glorot & Bengio, 2010).
timm's `zero_init_last` (zeroing each block's last batch-norm scale) is turned off: the paper does not use it,
and it would silence every residual branch's gradient at the first step.
"""

from __future__ import annotations

from torch import nn

from harness.plugin import ModelPlugin


def xavier_conv_init(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)


class WideResNet50_2(ModelPlugin):
    """timm's wide_resnet50_2 with a 3x3 stride-1 stem, no max pool, Xavier-uniform convolutions (paper A.2)."""

    def build(self, num_classes: int, input_shape: tuple[int, int, int]) -> nn.Module:
        import timm

        model = timm.create_model("wide_resnet50_2", pretrained=False, num_classes=num_classes,
                                  in_chans=input_shape[0], drop_rate=0.0, zero_init_last=False)
        stem_width = model.conv1.out_channels
        model.conv1 = nn.Conv2d(input_shape[0], stem_width, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
        xavier_conv_init(model)
        return self.normalize(model)
