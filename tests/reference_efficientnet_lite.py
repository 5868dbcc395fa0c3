"""Independent EfficientNet-Lite0 (eval only) used to check the HF conversion.

Written from the TF EfficientNet-Lite definition (tensorflow/tpu efficientnet/lite) with the
lukemelas/EfficientNet-PyTorch module names, so the raw ``.pth`` loads with ``strict=True`` and no key
mapping.  It deliberately shares no code with transformers: padding is TF "SAME", computed from the
actual input size at every convolution.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# TF block strings: repeats, kernel, stride, expand ratio, input and output filters.  Lite drops SE.
LITE0_BLOCKS = (
    "r1_k3_s11_e1_i32_o16",
    "r2_k3_s22_e6_i16_o24",
    "r2_k5_s22_e6_i24_o40",
    "r3_k3_s22_e6_i40_o80",
    "r3_k5_s11_e6_i80_o112",
    "r4_k5_s22_e6_i112_o192",
    "r1_k3_s11_e6_i192_o320",
)
BN_EPS = 1e-3


def decode(block: str) -> dict[str, int]:
    fields = {part[0]: part[1:] for part in block.split("_")}
    return {
        "repeats": int(fields["r"]),
        "kernel": int(fields["k"]),
        "stride": int(fields["s"][0]),
        "expand": int(fields["e"]),
        "in": int(fields["i"]),
        "out": int(fields["o"]),
    }


def conv_same(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """TF "SAME": output = ceil(in / stride); the odd pixel of padding goes to the bottom/right."""
    pads = []
    for size, k, s in zip(
        reversed(x.shape[-2:]), reversed(conv.kernel_size), reversed(conv.stride), strict=True
    ):
        total = max((math.ceil(size / s) - 1) * s + k - size, 0)
        pads += [total // 2, total - total // 2]
    return conv(F.pad(x, pads))


def bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS)


class MBConv(nn.Module):
    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = c_in * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = nn.Conv2d(c_in, hidden, 1, bias=False)
            self._bn0 = bn(hidden)
        self._depthwise_conv = nn.Conv2d(hidden, hidden, kernel, stride, groups=hidden, bias=False)
        self._bn1 = bn(hidden)
        self._project_conv = nn.Conv2d(hidden, c_out, 1, bias=False)
        self._bn2 = bn(c_out)
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        if self.has_expand:
            h = F.relu6(self._bn0(self._expand_conv(h)))
        h = F.relu6(self._bn1(conv_same(self._depthwise_conv, h)))
        h = self._bn2(self._project_conv(h))
        return h + x if self.residual else h


class EfficientNetLite0(nn.Module):
    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self._conv_stem = nn.Conv2d(3, 32, 3, 2, bias=False)
        self._bn0 = bn(32)
        blocks = []
        for spec in map(decode, LITE0_BLOCKS):
            for i in range(spec["repeats"]):
                c_in = spec["in"] if i == 0 else spec["out"]
                stride = spec["stride"] if i == 0 else 1
                blocks.append(MBConv(c_in, spec["out"], spec["kernel"], stride, spec["expand"]))
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = nn.Conv2d(320, 1280, 1, bias=False)
        self._bn1 = bn(1280)
        self._fc = nn.Linear(1280, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self._bn0(conv_same(self._conv_stem, x)))
        for block in self._blocks:
            x = block(x)
        x = F.relu6(self._bn1(self._conv_head(x)))
        return self._fc(x.mean(dim=(2, 3)))


def load_reference(pth_path: str) -> EfficientNetLite0:
    model = EfficientNetLite0()
    model.load_state_dict(torch.load(pth_path, map_location="cpu", weights_only=True), strict=True)
    return model.eval()
