"""MIMO-UNet and MIMO-UNet+ (Cho et al., ICCV 2021).

Attribute names follow the official implementation so that its checkpoints load with
strict key matching; ``tests/test_model_parity.py`` holds the layout to the official spec.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class BasicConv(nn.Module):
    """Convolution (or 2x transposed convolution) followed by an optional ReLU."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        relu: bool = True,
        transpose: bool = False,
    ):
        super().__init__()
        if transpose:
            conv = nn.ConvTranspose2d(
                in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2 - 1
            )
        else:
            conv = nn.Conv2d(
                in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2
            )
        layers: list[nn.Module] = [conv]
        if relu:
            layers.append(nn.ReLU(inplace=True))
        self.main = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)


class ResBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.main = nn.Sequential(
            BasicConv(channels, channels, 3, relu=True),
            BasicConv(channels, channels, 3, relu=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x) + x


class ResStack(nn.Module):
    """The official EBlock / DBlock: ``num_res`` residual blocks at one width."""

    def __init__(self, channels: int, num_res: int):
        super().__init__()
        self.layers = nn.Sequential(*(ResBlock(channels) for _ in range(num_res)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class AFF(nn.Module):
    """Asymmetric feature fusion: merges the three encoder scales for one decoder level."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Sequential(
            BasicConv(in_channels, out_channels, 1, relu=True),
            BasicConv(out_channels, out_channels, 3, relu=False),
        )

    def forward(self, *features: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat(features, dim=1))


class SCM(nn.Module):
    """Shallow convolutional module: features straight from a downscaled input image."""

    def __init__(self, out_channels: int):
        super().__init__()
        self.main = nn.Sequential(
            BasicConv(3, out_channels // 4, 3, relu=True),
            BasicConv(out_channels // 4, out_channels // 2, 1, relu=True),
            BasicConv(out_channels // 2, out_channels // 2, 3, relu=True),
            BasicConv(out_channels // 2, out_channels - 3, 1, relu=True),
        )
        self.conv = BasicConv(out_channels, out_channels, 1, relu=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([x, self.main(x)], dim=1))


class FAM(nn.Module):
    """Feature attention module: gates encoder features with SCM features."""

    def __init__(self, channels: int):
        super().__init__()
        self.merge = BasicConv(channels, channels, 3, relu=False)

    def forward(self, x: torch.Tensor, guide: torch.Tensor) -> torch.Tensor:
        return x + self.merge(x * guide)


def _resize(x: torch.Tensor, factor: float) -> torch.Tensor:
    # Nearest neighbour, as the official network does; bilinear would change its outputs.
    return F.interpolate(x, scale_factor=factor)


class MIMOUNet(nn.Module):
    """Multi-input multi-output U-Net.

    Args:
        num_res: residual blocks per encoder/decoder level (8 for MIMO-UNet, 20 for MIMO-UNet+).
        dropout: channel dropout on the fused skip connections (0.1 in MIMO-UNet+).

    The forward pass takes ``N x 3 x H x W`` with H and W multiples of 4 and returns the
    restored image at quarter, half and full resolution, in that order. The weights may be cast
    to bfloat16 or float16 once (``model.to(dtype)``): the input is then cast to them for the
    body, while each output adds the body's residual to the input at the input's own precision,
    so a float32 input keeps float32 skip connections (bfloat16 alone would cost about a level
    of 8-bit precision near white).
    """

    def __init__(self, num_res: int = 8, dropout: float = 0.0):
        super().__init__()
        c = 32
        self.Encoder = nn.ModuleList([ResStack(c, num_res), ResStack(2 * c, num_res),
                                      ResStack(4 * c, num_res)])
        self.feat_extract = nn.ModuleList([
            BasicConv(3, c, 3, relu=True),
            BasicConv(c, 2 * c, 3, stride=2, relu=True),
            BasicConv(2 * c, 4 * c, 3, stride=2, relu=True),
            BasicConv(4 * c, 2 * c, 4, stride=2, relu=True, transpose=True),
            BasicConv(2 * c, c, 4, stride=2, relu=True, transpose=True),
            BasicConv(c, 3, 3, relu=False),
        ])
        self.Decoder = nn.ModuleList([ResStack(4 * c, num_res), ResStack(2 * c, num_res),
                                      ResStack(c, num_res)])
        self.Convs = nn.ModuleList([BasicConv(4 * c, 2 * c, 1, relu=True),
                                    BasicConv(2 * c, c, 1, relu=True)])
        self.ConvsOut = nn.ModuleList([BasicConv(4 * c, 3, 3, relu=False),
                                       BasicConv(2 * c, 3, 3, relu=False)])
        self.AFFs = nn.ModuleList([AFF(7 * c, c), AFF(7 * c, 2 * c)])
        self.FAM1 = FAM(4 * c)
        self.SCM1 = SCM(4 * c)
        self.FAM2 = FAM(2 * c)
        self.SCM2 = SCM(2 * c)
        # Dropout2d has no parameters, so MIMO-UNet and MIMO-UNet+ keep the same key layout.
        self.drop1 = nn.Dropout2d(dropout) if dropout else nn.Identity()
        self.drop2 = nn.Dropout2d(dropout) if dropout else nn.Identity()

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        dtype = self.feat_extract[0].main[0].weight.dtype
        x_2 = _resize(x, 0.5)
        x_4 = _resize(x_2, 0.5)
        z2 = self.SCM2(x_2.to(dtype))
        z4 = self.SCM1(x_4.to(dtype))

        res1 = self.Encoder[0](self.feat_extract[0](x.to(dtype)))
        z = self.FAM2(self.feat_extract[1](res1), z2)
        res2 = self.Encoder[1](z)
        z = self.FAM1(self.feat_extract[2](res2), z4)
        z = self.Encoder[2](z)

        z12 = _resize(res1, 0.5)
        z21 = _resize(res2, 2)
        z42 = _resize(z, 2)
        z41 = _resize(z42, 2)
        res2 = self.drop2(self.AFFs[1](z12, res2, z42))
        res1 = self.drop1(self.AFFs[0](res1, z21, z41))

        z = self.Decoder[0](z)
        out_4 = self.ConvsOut[0](z) + x_4
        z = self.feat_extract[3](z)
        z = self.Decoder[1](self.Convs[0](torch.cat([z, res2], dim=1)))
        out_2 = self.ConvsOut[1](z) + x_2
        z = self.feat_extract[4](z)
        z = self.Decoder[2](self.Convs[1](torch.cat([z, res1], dim=1)))
        out_1 = self.feat_extract[5](z) + x
        return [out_4, out_2, out_1]
