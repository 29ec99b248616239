"""A folder of PNG/JPEG images as model inputs, with the preprocessing a ViT expects.

Presets name the common recipes (ImageNet-style resize-then-crop with ImageNet statistics; the
0.5/0.5 normalisation of the original ViT and DeiT-distilled checkpoints; single-channel digits);
any field can be overridden. Needs Pillow (`pip install 'mfconvert[images]'`).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, replace

import numpy as np

from mfconvert.calibrate.data import DataError, Examples

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


@dataclass(frozen=True)
class ImageSpec:
    resize: int = 256                    # shorter side, before the centre crop
    crop: int = 224
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)
    channels: int = 3                    # 1 = grayscale
    layout: str = "NCHW"                 # or "NHWC"

    def __post_init__(self):
        if self.layout not in ("NCHW", "NHWC"):
            raise DataError(f"image layout must be NCHW or NHWC, got {self.layout!r}")
        if self.channels not in (1, 3) or len(self.mean) != self.channels or len(self.std) != self.channels:
            raise DataError("image mean/std need one value per channel (1 or 3 channels)")


PRESETS = {
    "imagenet": ImageSpec(),
    "vit": ImageSpec(resize=224, crop=224, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
    "digits": ImageSpec(resize=28, crop=28, mean=(0.1307,), std=(0.3081,), channels=1),
}


def image_spec(preset: str = "imagenet", **overrides) -> ImageSpec:
    if preset not in PRESETS:
        raise DataError(f"unknown image preset {preset!r} (have {sorted(PRESETS)})")
    return replace(PRESETS[preset], **overrides)


def preprocess(path: str, spec: ImageSpec) -> np.ndarray:
    """One image → float32 [C, crop, crop] (or [crop, crop, C] for NHWC)."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            img = img.convert("L" if spec.channels == 1 else "RGB")
            w, h = img.size
            scale = spec.resize / min(w, h)
            img = img.resize((max(spec.crop, round(w * scale)), max(spec.crop, round(h * scale))), Image.BILINEAR)
            w, h = img.size
            left, top = (w - spec.crop) // 2, (h - spec.crop) // 2
            img = img.crop((left, top, left + spec.crop, top + spec.crop))
            x = np.asarray(img, dtype=np.float32) / 255.0
    except OSError as err:
        raise DataError(f"{path}: not a readable image ({err})") from None
    x = x.reshape(spec.crop, spec.crop, spec.channels)
    x = (x - np.asarray(spec.mean, np.float32)) / np.asarray(spec.std, np.float32)
    return x if spec.layout == "NHWC" else x.transpose(2, 0, 1).copy()


def from_image_folder(folder: str, input_names: list[str], spec: ImageSpec | None = None) -> Examples:
    """Every PNG/JPEG under `folder` (sorted, recursive) as one example of the model's one input."""
    if len(input_names) != 1:
        raise DataError(f"{folder}: an image folder feeds one input, the model takes {input_names}")
    spec = spec or PRESETS["imagenet"]
    paths = sorted(os.path.join(d, f) for d, _, files in os.walk(folder) for f in files
                   if f.lower().endswith(IMAGE_SUFFIXES))
    if not paths:
        raise DataError(f"{folder}: no PNG or JPEG images")
    return Examples([{input_names[0]: preprocess(p, spec)} for p in paths])
