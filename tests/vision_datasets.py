"""Small FEMNIST- and CelebA-shaped datasets for the vision tests, written as parquet.

Same column names and feature types as the published flwrlabs/femnist and flwrlabs/celeba
(PNG images through ``datasets.Image``, ``writer_id`` strings, ``character`` ClassLabel of
62, ``celeb_id`` int64, 40 boolean attributes). Pixels carry markers the tests read back:
FEMNIST pixel (0, 0) encodes the writer and pixel (0, 1) the row; a CelebA image is one flat
colour whose red/green channels encode the row and blue channel the identity.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

CHARACTERS = [str(d) for d in range(10)] + [chr(c) for c in range(ord("A"), ord("Z") + 1)] + \
             [chr(c) for c in range(ord("a"), ord("z") + 1)]


def _png(array: np.ndarray) -> dict:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return {"bytes": buffer.getvalue(), "path": None}


def femnist_rows(samples_per_writer: list[int], seed: int = 0) -> dict:
    """Columns of a FEMNIST-like split: writer w has samples_per_writer[w] images."""
    rng = np.random.default_rng(seed)
    columns = {"image": [], "writer_id": [], "hsf_id": [], "character": []}
    row = 0
    for writer, count in enumerate(samples_per_writer):
        for _ in range(count):
            label = int(rng.integers(0, 62))
            pixels = rng.integers(0, 40, size=(28, 28)).astype(np.uint8)
            top, left = 4 + label % 8 * 2, 4 + label // 8 * 2  # a stroke placed by the character
            pixels[top:top + 6, left:left + 3] = 255
            pixels[0, 0] = writer_marker(writer)
            pixels[0, 1] = row % 256
            columns["image"].append(_png(pixels))
            columns["writer_id"].append(f"f{writer:04d}_{writer % 100:02d}")
            columns["hsf_id"].append(writer % 8)
            columns["character"].append(label)
            row += 1
    return columns


def writer_marker(writer: int) -> int:
    return 4 * writer + 2


def write_femnist(directory: Path, samples_per_writer: list[int], seed: int = 0) -> Path:
    """A folder like the hub's layout: data/train-00000-of-00001.parquet."""
    import datasets

    features = datasets.Features({"image": datasets.Image(), "writer_id": datasets.Value("string"),
                                  "hsf_id": datasets.Value("int64"),
                                  "character": datasets.ClassLabel(names=CHARACTERS)})
    dataset = datasets.Dataset.from_dict(femnist_rows(samples_per_writer, seed), features=features)
    path = Path(directory) / "data" / "train-00000-of-00001.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    dataset.to_parquet(str(path))
    return Path(directory)


CELEBA_ATTRIBUTES = (
    "5_o_Clock_Shadow", "Arched_Eyebrows", "Attractive", "Bags_Under_Eyes", "Bald", "Bangs", "Big_Lips",
    "Big_Nose", "Black_Hair", "Blond_Hair", "Blurry", "Brown_Hair", "Bushy_Eyebrows", "Chubby", "Double_Chin",
    "Eyeglasses", "Goatee", "Gray_Hair", "Heavy_Makeup", "High_Cheekbones", "Male", "Mouth_Slightly_Open",
    "Mustache", "Narrow_Eyes", "No_Beard", "Oval_Face", "Pale_Skin", "Pointy_Nose", "Receding_Hairline",
    "Rosy_Cheeks", "Sideburns", "Smiling", "Straight_Hair", "Wavy_Hair", "Wearing_Earrings", "Wearing_Hat",
    "Wearing_Lipstick", "Wearing_Necklace", "Wearing_Necktie", "Young",
)


def write_celeba(directory: Path, images_per_identity: list[int], seed: int = 0, size=(218, 178)) -> Path:
    """The hub layout img_align+identity+attr/train-*.parquet (plus a valid split to ignore)."""
    import datasets

    rng = np.random.default_rng(seed)
    features = datasets.Features({"image": datasets.Image(), "celeb_id": datasets.Value("int64"),
                                  **{name: datasets.Value("bool") for name in CELEBA_ATTRIBUTES}})
    # positive rates from 4% (rare, like Bald) to 60%
    rates = np.linspace(0.04, 0.6, len(CELEBA_ATTRIBUTES))
    columns = {"image": [], "celeb_id": [], **{name: [] for name in CELEBA_ATTRIBUTES}}
    row = 0
    for identity, count in enumerate(images_per_identity):
        for _ in range(count):
            colour = np.array([row % 256, row // 256, identity % 256], dtype=np.uint8)
            columns["image"].append(_png(np.broadcast_to(colour, (*size, 3)).copy()))
            columns["celeb_id"].append(1000 + identity)
            for name, rate in zip(CELEBA_ATTRIBUTES, rates):
                columns[name].append(bool(rng.random() < rate))
            row += 1
    root = Path(directory) / "img_align+identity+attr"
    root.mkdir(parents=True, exist_ok=True)
    dataset = datasets.Dataset.from_dict(columns, features=features)
    half = len(dataset) // 2
    dataset.select(range(half)).to_parquet(str(root / "train-00000-of-00002.parquet"))
    dataset.select(range(half, len(dataset))).to_parquet(str(root / "train-00001-of-00002.parquet"))
    dataset.select(range(4)).to_parquet(str(root / "valid-00000-of-00001.parquet"))  # must be ignored
    return Path(directory)


def celeba_row_and_identity(images) -> tuple[np.ndarray, np.ndarray]:
    """Read the markers back from normalised CelebA tensors (n, 3, s, s)."""
    from fedtask.data.images import IMAGENET_MEAN, IMAGENET_STD

    mean = np.array(IMAGENET_MEAN)[None, :]
    std = np.array(IMAGENET_STD)[None, :]
    pixel = images[:, :, 0, 0].double().numpy() * std + mean
    values = np.rint(pixel * 255).astype(np.int64)
    return values[:, 0] + 256 * values[:, 1], values[:, 2]
