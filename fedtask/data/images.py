"""Images as the models take them, and the training-time augmentation of vision tasks.

Decoding happens once, when a task is built: each image is centre-cropped to a square,
resized to ``size`` and normalised to a float tensor (C, size, size). Augmentation is
applied later, per round, to a client's training batch only (never to held-out data or
the adversary's queries), vectorised over the batch and seeded by (seed, round, task)
so every engine and every rerun draws the same transformations.
"""
from __future__ import annotations

import io
import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def images_to_tensor(images: Iterable, mode: str, size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """(n, C, size, size) float32 from PIL images, encoded bytes or pixel arrays; C = 1 ('L') or 3 ('RGB')."""
    channels = 1 if mode == "L" else 3
    out = [_square_resize(_as_uint8(image, mode, channels), size) for image in images]
    if not out:
        return torch.empty(0, channels, size, size)
    x = torch.stack(out)
    mean_t = torch.tensor(mean[:channels]).view(1, channels, 1, 1)
    std_t = torch.tensor(std[:channels]).view(1, channels, 1, 1)
    return (x - mean_t) / std_t


def check_decodable(dataset, column: str, mode: str, where: str) -> None:
    """Fail at load time, naming the source, when the image column is not images at all
    (tasks decode lazily, inside the clients, where an error would be far from its cause)."""
    if len(dataset) == 0:
        raise ValueError(f"{where}: no rows")
    try:
        images_to_tensor(dataset.select([0])[column], mode, 8, (0.0,) * 3, (1.0,) * 3)
    except Exception as err:
        raise ValueError(f"{where}: column {column!r} does not decode as images ({type(err).__name__}: "
                         f"{str(err).strip()[:160]})") from None


def _as_uint8(image, mode: str, channels: int) -> torch.Tensor:
    from PIL import Image

    if isinstance(image, dict) and image.get("bytes") is not None:  # an undecoded Image struct
        image = Image.open(io.BytesIO(image["bytes"]))
    if isinstance(image, Image.Image):
        array = np.array(image.convert(mode))  # a writable copy
    else:  # pixel values: (H, W), (H, W, C) or flat H*W, in [0, 1] or [0, 255]
        array = np.asarray(image, dtype=np.float64)
        if array.ndim == 1:
            side = math.isqrt(array.size)
            if side * side != array.size:
                raise ValueError(f"image: a flat pixel list of length {array.size} is not square")
            array = array.reshape(side, side)
        if array.max(initial=0.0) <= 1.0:
            array = array * 255.0
        array = np.clip(np.rint(array), 0, 255).astype(np.uint8)
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    tensor = tensor.unsqueeze(0) if tensor.dim() == 2 else tensor.permute(2, 0, 1)
    if tensor.shape[0] != channels:
        tensor = tensor.float().mean(0, keepdim=True).round().to(torch.uint8) if channels == 1 \
            else tensor[:1].expand(3, -1, -1)
    return tensor


def _square_resize(image: torch.Tensor, size: int) -> torch.Tensor:
    """Centre square crop (CelebA's aligned faces are 178x218), then resize; float in [0, 1]."""
    _, h, w = image.shape
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    x = image[:, top:top + side, left:left + side].float().div(255.0)
    if side != size:
        x = F.interpolate(x.unsqueeze(0), size=(size, size), mode="bilinear", antialias=True,
                          align_corners=False).squeeze(0)
    return x


@dataclass(frozen=True)
class ShiftFlipAugment:
    """Standard light augmentation: a random shift of up to ``pad`` pixels (edge-padded crop)
    and, with ``flip``, a random horizontal flip (faces yes; handwritten characters no)."""

    pad: int
    flip: bool

    def __call__(self, x: torch.Tensor, seed: int, server_round: int, task_index: int) -> torch.Tensor:
        n, c, h, w = x.shape
        if n == 0 or (self.pad <= 0 and not self.flip):
            return x
        gen = torch.Generator().manual_seed(((seed * 1_000_003 + server_round) * 1_000_033 + task_index) + 7_777_777)
        shift_y = torch.randint(0, 2 * self.pad + 1, (n,), generator=gen)
        shift_x = torch.randint(0, 2 * self.pad + 1, (n,), generator=gen)
        flips = torch.rand(n, generator=gen) < 0.5 if self.flip else torch.zeros(n, dtype=torch.bool)
        device = x.device
        if self.pad > 0:
            padded = F.pad(x, (self.pad,) * 4, mode="replicate")
            rows = (shift_y[:, None] + torch.arange(h)).to(device)  # (n, h)
            cols = (shift_x[:, None] + torch.arange(w)).to(device)  # (n, w)
            batch = torch.arange(n, device=device)[:, None, None, None]
            channel = torch.arange(c, device=device)[None, :, None, None]
            x = padded[batch, channel, rows[:, None, :, None], cols[:, None, None, :]]
        if self.flip:
            x = torch.where(flips.to(device)[:, None, None, None], x.flip(-1), x)
        return x
