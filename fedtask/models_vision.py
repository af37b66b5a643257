"""ResNet encoders for the vision federations (paper Appendix A.2.1).

``resnet8`` is the small CIFAR-style ResNet (6n+2 layers with n=1: a 3x3 stem, three basic
blocks of 16/32/64 channels, ~78k parameters) the paper trains from scratch on FEMNIST;
``resnet18`` / ``resnet34`` / ``resnet50`` are torchvision's, for CelebA, optionally
initialised from local ImageNet weights (``model.pretrained_path``: nothing is downloaded).
Every encoder ends in the linear bottleneck to ``model.embedding_dim`` (Appendix A.3: it
keeps the few-sample linear heads from overfitting): the shared representation the
adversary queries.

Normalisation (``model.norm``) is a deliberate choice, because plain BatchNorm is wrong
here twice over. A client's batch is one task (one writer, one face): batch statistics
would normalise every task towards the same mean, erasing exactly the per-task signal the
heads (and the paper's attacks) are about, and would make an embedding depend on the other
images of its batch, so the adversary's oracle would answer differently for the same image.
And the running statistics are buffers updated in place as a side effect, which neither
``torch.func.functional_call`` (the per-task math) nor FedSGD aggregation (gradients only)
can carry. So:

- ``group`` (default): GroupNorm, per-sample statistics, no buffers, trained from scratch
  like any other layer. Right for ResNet-8 on FEMNIST.
- ``frozen_batch``: BatchNorm that always normalises with its stored running statistics
  (ImageNet's, when ``model.pretrained_path`` is set) and never updates them; its affine
  scale and shift still train. Right for a pretrained ResNet, whose every later layer
  expects inputs normalised by those statistics.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.models.resnet import BasicBlock

from fedtask.config import ConfigError
from fedtask.data.base import TaskSpec
from fedtask.models import register_encoder

NORMS = ("group", "frozen_batch")


class FrozenBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm with fixed statistics in train and eval alike; weight and bias stay trainable.

    Its state dict has BatchNorm's keys, so torchvision's ImageNet weights load unchanged.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                            training=False, momentum=0.0, eps=self.eps)


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with groups of 4 channels, at most 32 groups (Wu & He's default for wide layers)."""
    return nn.GroupNorm(min(32, max(1, channels // 4)), channels)


def norm_layer(kind: str):
    if kind == "group":
        return group_norm
    if kind == "frozen_batch":
        return FrozenBatchNorm2d
    raise ConfigError(f"model.norm: must be one of {', '.join(NORMS)}; got {kind!r}")


def resnet8_backbone(in_channels: int, norm: str, widths: tuple[int, int, int] = (16, 32, 64)) -> nn.Sequential:
    """Stem conv + three basic blocks (strides 1, 2, 2) + global average pool: (n, widths[-1])."""
    make_norm = norm_layer(norm)
    layers: list[nn.Module] = [nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False), make_norm(widths[0]),
                               nn.ReLU(inplace=False)]
    inplanes = widths[0]
    for width, stride in zip(widths, (1, 2, 2)):
        downsample = None
        if stride != 1 or inplanes != width:
            downsample = nn.Sequential(nn.Conv2d(inplanes, width, 1, stride=stride, bias=False), make_norm(width))
        layers.append(BasicBlock(inplanes, width, stride, downsample, norm_layer=make_norm))
        inplanes = width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return nn.Sequential(*layers)


TORCHVISION = {"resnet18": (torchvision.models.resnet18, 512), "resnet34": (torchvision.models.resnet34, 512),
               "resnet50": (torchvision.models.resnet50, 2048)}


def torchvision_backbone(name: str, norm: str) -> nn.Module:
    """torchvision's ResNet without its ImageNet classifier: (n, 512) or (n, 2048) features."""
    builder, _ = TORCHVISION[name]
    model = builder(weights=None, norm_layer=norm_layer(norm))
    model.fc = nn.Identity()
    return model


class ResNetEncoder(nn.Module):
    """A ResNet backbone, then the linear bottleneck to the embedding the adversary sees."""

    def __init__(self, backbone: nn.Module, feature_dim: int, embedding_dim: int, gray_to_rgb: bool = False):
        super().__init__()
        self.backbone = backbone
        self.bottleneck = nn.Linear(feature_dim, embedding_dim)
        self.gray_to_rgb = gray_to_rgb  # 1-channel images into an RGB (ImageNet) stem

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gray_to_rgb:
            x = x.expand(-1, 3, -1, -1)
        return self.bottleneck(self.backbone(x))


def _image_channels(config, spec: TaskSpec) -> int:
    if spec.input_kind != "image":
        raise ConfigError(f"model.encoder: {config.model.encoder!r} needs image inputs; "
                          f"data.name={config.data.name!r} gives {spec.input_kind}")
    return int(spec.input_shape[0])


@register_encoder("resnet8")
def build_resnet8(config, spec: TaskSpec) -> nn.Module:
    model = config.model
    encoder = ResNetEncoder(resnet8_backbone(_image_channels(config, spec), model.norm), 64,
                            model.embedding_dim)
    if model.pretrained_path:
        load_pretrained(encoder, Path(model.pretrained_path), "resnet8", model.norm)
    return encoder


def _register_torchvision(name: str) -> None:
    @register_encoder(name)
    def build(config, spec: TaskSpec) -> nn.Module:
        model = config.model
        channels = _image_channels(config, spec)
        if channels not in (1, 3):
            raise ConfigError(f"model.encoder: {name} takes 1- or 3-channel images; data gives {channels}")
        encoder = ResNetEncoder(torchvision_backbone(name, model.norm), TORCHVISION[name][1],
                                model.embedding_dim, gray_to_rgb=channels == 1)
        if model.pretrained_path:
            load_pretrained(encoder, Path(model.pretrained_path), name, model.norm)
        return encoder


for _name in TORCHVISION:
    _register_torchvision(_name)


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors from a safetensors file or a torch state dict (``weights_only``: no pickle code runs)."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:
        raise ConfigError(f"model.pretrained_path: {path}: not a safetensors file or torch state dict "
                          f"({type(err).__name__}: {str(err).strip().splitlines()[0][:160] if str(err).strip() else ''})") from None
    for wrapper in ("state_dict", "model"):  # common checkpoint wrappers
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"model.pretrained_path: {path}: holds no state dict of tensors")
    return state


def load_pretrained(encoder: ResNetEncoder, path: Path, name: str, norm: str) -> None:
    """Load backbone weights (torchvision key names, or an earlier fedtask encoder's) in place.

    The ImageNet classifier (``fc.*``) is dropped; a bottleneck is loaded when the file has
    one. With ``model.norm = group`` BatchNorm statistics in the file are ignored (only the
    affine parameters carry over). Any other missing or misshapen weight is an error.
    """
    state = {}
    for key, value in read_state_dict(path).items():
        for prefix in ("module.", "encoder."):
            key = key.removeprefix(prefix)
        if not key.startswith(("backbone.", "bottleneck.")):
            key = "backbone." + key
        if key.startswith("backbone.fc."):
            continue
        state[key] = value
    own = encoder.state_dict()
    statistics = ("running_mean", "running_var", "num_batches_tracked")
    if norm == "group":
        state = {k: v for k, v in state.items() if not k.endswith(statistics)}
    wrong_shape = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    missing = [k for k in own if k.startswith("backbone.") and k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    if wrong_shape or missing or unexpected:
        detail = (f"shapes differ for {wrong_shape[:3]}" if wrong_shape else
                  f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}")
        raise ConfigError(f"model.pretrained_path: {path}: does not fit model.encoder={name!r} "
                          f"with model.norm={norm!r} ({detail})")
    encoder.load_state_dict(state, strict=False)
