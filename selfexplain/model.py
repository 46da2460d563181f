"""The classifier: torchvision's ResNet-18 with a 1-channel stem, split at layer4.

``features(x)`` returns the layer4 map A (B, 512, H/s, W/s) and ``head(A)`` applies
global average pooling and the linear layer, so later stages can splice an SAE
reconstruction between the two. ``layer4_stride`` sets s: 2 is torchvision's ResNet-18
(s = 32: a 2x2 map at 64 px, 7x7 at 224), 1 keeps layer4 at layer3's resolution (s = 16:
4x4 at 64 px, 14x14 at 224), the "CAM-friendly" ResNet, so a latent can say where it fires.
Stride changes no weight shape; the checkpoint's ``arch`` dict records it.
``traced_features`` / ``input_gradients`` give ∂/∂x of many objectives of A from one forward
(the transposed convs of that forward), for stage 5's pixel attribution.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torch.nn.grad import conv2d_input

from .errors import UserError


class SketchResNet(nn.Module):
    """ResNet-18 for 1-channel sketches.

    Parameters
    ----------
    num_classes : number of output classes.
    in_channels : input channels (1 for sketches).
    pretrained : start from ImageNet weights, the RGB stem averaged to one channel.
    layer4_stride : 2 (torchvision's ResNet-18, map H/32) or 1 (map H/16).
    """

    def __init__(self, num_classes: int, in_channels: int = 1, pretrained: bool = False, layer4_stride: int = 2):
        super().__init__()
        if layer4_stride not in (1, 2):
            raise UserError(f"LAYER4_STRIDE must be 1 or 2, got {layer4_stride!r}")
        # zero-init the last BN of each residual block: blocks start as identities, which
        # trains faster from scratch (Goyal et al. 2017); pretrained weights overwrite it
        net = torchvision.models.resnet18(weights=None, num_classes=1000, zero_init_residual=True)
        if pretrained:
            net.load_state_dict(_imagenet_state_dict())
        rgb = net.conv1.weight.data
        net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        if pretrained:
            net.conv1.weight.data.copy_(rgb.mean(dim=1, keepdim=True).repeat(1, in_channels, 1, 1))
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        # layer4's only stride sits in its first block: the 3x3 conv and the 1x1 shortcut
        self.layer4[0].conv1.stride = (layer4_stride, layer4_stride)
        self.layer4[0].downsample[0].stride = (layer4_stride, layer4_stride)
        self.layer4_stride = layer4_stride
        self.fc = nn.Linear(512, num_classes)
        self.num_classes = num_classes
        self.feature_dim = 512

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The last convolutional map A, shape (B, 512, H/s, W/s), s = 16 * layer4_stride."""
        x = self.stem(x)
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def head(self, feature_map: torch.Tensor) -> torch.Tensor:
        """Logits from a layer4 map: ``fc(GAP(A))``."""
        return self.fc(feature_map.mean(dim=(2, 3)).to(self.fc.weight.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    # ------------------------------------------------------------------ input gradients, many objectives at once
    @torch.no_grad()
    def traced_features(self, x: torch.Tensor) -> tuple[torch.Tensor, list]:
        """:meth:`features` of one input (1, 1, S, S) in eval mode, and the trace :meth:`input_gradients` needs:
        each ReLU's on-mask, the max-pool's indices and each conv's input shape."""
        if x.shape[0] != 1:
            raise ValueError(f"traced_features takes one input, (1, C, S, S); got {tuple(x.shape)}")
        conv, bn, _, pool = self.stem
        stem = _bn(bn, conv(x))
        on = stem > 0
        pooled, where = F.max_pool2d(stem.relu(), pool.kernel_size, pool.stride, pool.padding, pool.dilation,
                                     pool.ceil_mode, return_indices=True)
        trace, h = [(x.shape, on, stem.shape, where)], pooled
        for block in (*self.layer1, *self.layer2, *self.layer3, *self.layer4):
            inner = _bn(block.bn1, block.conv1(h))
            shortcut = h if block.downsample is None else _bn(block.downsample[1], block.downsample[0](h))
            out = _bn(block.bn2, block.conv2(inner.relu())) + shortcut
            trace.append((block, h.shape, inner > 0, inner.shape, out > 0))
            h = out.relu()
        return h, trace

    @torch.no_grad()
    def input_gradients(self, trace: list, grad_map: torch.Tensor) -> torch.Tensor:
        """∂⟨grad_map[d], features(x)⟩/∂x for D cotangents (D, 512, H, W) at once: (D, 1, S, S).

        The map from x to layer4 is linear once its ReLU masks and pooling choices are fixed
        (eval mode), so one forward (:meth:`traced_features`) serves every objective; each
        layer's backward is its transposed conv. Equal to autograd on D copies of x (to fp32
        rounding) without running the D-copy forward, and faster on CPU (bench_explain).
        """
        g = grad_map
        for block, in_shape, inner_on, inner_shape, out_on in reversed(trace[1:]):
            g = g * out_on
            inner = _conv_input(block.conv2, g * _bn_scale(block.bn2), inner_shape) * inner_on
            main = _conv_input(block.conv1, inner * _bn_scale(block.bn1), in_shape)
            g = main + (g if block.downsample is None else
                        _conv_input(block.downsample[0], g * _bn_scale(block.downsample[1]), in_shape))
        in_shape, on, stem_shape, where = trace[0]
        d, c = g.shape[:2]  # max-pool windows overlap: a pixel that wins two windows gets both gradients
        unpooled = g.new_zeros(d, c, stem_shape[2] * stem_shape[3]).scatter_add_(
            2, where.flatten(2).expand(d, c, -1), g.flatten(2)).view(d, c, *stem_shape[2:])
        return _conv_input(self.stem[0], unpooled * on * _bn_scale(self.stem[1]), in_shape)


def _bn(bn: nn.BatchNorm2d, x: torch.Tensor) -> torch.Tensor:
    """BatchNorm with its running statistics, whatever the module's mode."""
    return F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)


def _bn_scale(bn: nn.BatchNorm2d) -> torch.Tensor:
    """Eval-mode BatchNorm's slope per channel, (1, C, 1, 1)."""
    return (bn.weight / torch.sqrt(bn.running_var + bn.eps))[None, :, None, None]


def _conv_input(conv: nn.Conv2d, grad_out: torch.Tensor, in_shape: torch.Size) -> torch.Tensor:
    """A bias-free conv's backward to its input for a batch of cotangents (the transposed conv)."""
    return conv2d_input((grad_out.shape[0], *in_shape[1:]), conv.weight, grad_out, conv.stride, conv.padding,
                        conv.dilation, conv.groups)


def _imagenet_state_dict() -> dict:
    """ImageNet ResNet-18 weights through torchvision's cache, or a clear error offline."""
    try:
        weights = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
        return weights.get_state_dict(progress=False)
    except Exception as exc:  # URLError, SSL, HTTP errors: all mean "cannot be had"
        raise UserError(
            "PRETRAINED=True needs the ImageNet ResNet-18 weights, which could not be downloaded "
            f"({exc.__class__.__name__}); put resnet18-f37072fd.pth in $TORCH_HOME/hub/checkpoints "
            "or use --pretrained=False"
        ) from None


def build_classifier(arch: dict) -> SketchResNet:
    """Rebuild the model from the ``arch`` dict stored in a checkpoint (never pretrained).

    Checkpoints written before ``layer4_stride`` was recorded used stride 2.
    """
    return SketchResNet(num_classes=arch["num_classes"], in_channels=arch.get("in_channels", 1),
                        layer4_stride=arch.get("layer4_stride", 2))


def classifier_arch(model: SketchResNet) -> dict:
    """The ``arch`` dict a checkpoint records: what :func:`build_classifier` needs."""
    return {"name": "resnet18", "num_classes": model.num_classes, "in_channels": model.stem[0].in_channels,
            "layer4_stride": model.layer4_stride}
