"""MoCo augmentations with PIL + torchvision: the reference recipe, the yardstick of both backends.

The recipes are those of facebookresearch/moco main_moco.py (commit 7397dfe):

    moco_v1: RandomResizedCrop(S, scale=(0.2, 1.)), RandomGrayscale(p=0.2),
             ColorJitter(0.4, 0.4, 0.4, 0.4), RandomHorizontalFlip, ToTensor, Normalize
    moco_v2: RandomResizedCrop(S, scale=(0.2, 1.)), RandomApply([ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
             RandomGrayscale(p=0.2), RandomApply([GaussianBlur([.1, 2.])], p=0.5),
             RandomHorizontalFlip, ToTensor, Normalize

and of facebookresearch/moco-v3 main_moco.py (BYOL's asymmetric recipe; view 0 is x1, view 1 is x2):

    moco_v3: RandomResizedCrop(S, scale=(0.08, 1.)), RandomApply([ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
             RandomGrayscale(p=0.2), RandomApply([GaussianBlur([.1, 2.])], p=1.0 / 0.1),
             RandomApply([Solarize()], p=0.0 / 0.2), RandomHorizontalFlip, ToTensor, Normalize

`reference_transform` is that pipeline unchanged (float output): the tests and benchmarks hold both backends
(DALI, augment_dali.py, and OpenCV, augment_cv.py) against it. Both backends ship uint8 views and
normalise whole batches: `normalize(PILToTensor(x)[None]) == Normalize(ToTensor(x))[None]` exactly (same
float ops). `decode_rgb` is the PIL decode with named failure reasons that both fall back on.
"""
from __future__ import annotations

import io
import random

import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps, UnidentifiedImageError
from torchvision import transforms

from mocostream.pipeline.image_check import MAX_PIXELS
from mocostream.pipeline.vocabulary import RECIPES


def blur_sigma_range(size: int) -> tuple[float, float]:
    """The reference blur, U[0.1, 2.0] px on 224-px crops, scaled to crops of side `size`: the same blur
    relative to the image at every size (identical at 224; at 32 px an unscaled sigma of 2 wipes out
    most detail)."""
    return (0.1 * size / 224, 2.0 * size / 224)

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


class UndecodableImage(Exception):
    """Bytes that do not decode to an image; `reason` is one of image_check.REASONS."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def decode_rgb(data: bytes, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Decode to an RGB PIL image with the EXIF orientation applied (as DALI's decoder does).

    Raises UndecodableImage. Alpha is dropped, not composited (DALI does the same).
    """
    if not data:
        raise UndecodableImage("not_an_image", "empty")
    try:
        img = Image.open(io.BytesIO(data))
        w, h = img.size
        if w * h > max_pixels:
            raise UndecodableImage("decompression_bomb", f"{w}x{h}")
        img.load()
        img = ImageOps.exif_transpose(img)
        return img.convert("RGB")
    except UndecodableImage:
        raise
    except Image.DecompressionBombError as e:
        raise UndecodableImage("decompression_bomb", str(e)) from e
    except UnidentifiedImageError as e:
        raise UndecodableImage("not_an_image", str(e)) from e
    except Exception as e:  # OSError, SyntaxError, struct.error, ...: PIL raises many kinds
        text = str(e).lower()
        reason = "truncated" if isinstance(e, EOFError) or "truncated" in text else "corrupt"
        raise UndecodableImage(reason, str(e)) from e


class GaussianBlur:
    """Gaussian blur augmentation in SimCLR https://arxiv.org/abs/2002.05709 (moco/loader.py, verbatim
    semantics: sigma ~ U[sigma[0], sigma[1]] from Python's `random`, PIL's GaussianBlur(radius=sigma),
    where PIL's radius is the standard deviation)."""

    def __init__(self, sigma=(0.1, 2.0)):
        self.sigma = sigma

    def __call__(self, x: Image.Image) -> Image.Image:
        sigma = random.uniform(self.sigma[0], self.sigma[1])
        return x.filter(ImageFilter.GaussianBlur(radius=sigma))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(sigma={list(self.sigma)})"


class Solarize:
    """Solarize augmentation from BYOL https://arxiv.org/abs/2006.07733 (moco-v3 moco/loader.py):
    PIL's ImageOps.solarize, threshold 128."""

    def __call__(self, x: Image.Image) -> Image.Image:
        return ImageOps.solarize(x)


def _augmentations(recipe: str, size: int, view: int = 0) -> list:
    """The recipe's steps before ToTensor/Normalize (moco_v3: view 0 or 1)."""
    if recipe == "moco_v1":
        return [
            transforms.RandomResizedCrop(size, scale=(0.2, 1.0)),
            transforms.RandomGrayscale(p=0.2),
            transforms.ColorJitter(0.4, 0.4, 0.4, 0.4),
            transforms.RandomHorizontalFlip(),
        ]
    if recipe == "moco_v2":
        return [
            transforms.RandomResizedCrop(size, scale=(0.2, 1.0)),
            transforms.RandomApply([transforms.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
            transforms.RandomGrayscale(p=0.2),
            transforms.RandomApply([GaussianBlur(blur_sigma_range(size))], p=0.5),
            transforms.RandomHorizontalFlip(),
        ]
    if recipe == "moco_v3":
        return [
            transforms.RandomResizedCrop(size, scale=(0.08, 1.0)),
            transforms.RandomApply([transforms.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
            transforms.RandomGrayscale(p=0.2),
            transforms.RandomApply([GaussianBlur(blur_sigma_range(size))], p=(1.0, 0.1)[view]),
            transforms.RandomApply([Solarize()], p=(0.0, 0.2)[view]),
            transforms.RandomHorizontalFlip(),
        ]
    raise ValueError(f"unknown augmentation recipe {recipe!r}; expected one of {RECIPES}")


def reference_transform(recipe: str, size: int = 224, view: int = 0) -> transforms.Compose:
    """The unmodified reference pipeline: PIL image -> normalised float (3, S, S) tensor. `view` picks
    moco_v3's first (0) or second (1) augmentation; v1 and v2 use one for both views."""
    return transforms.Compose(
        _augmentations(recipe, size, view) + [transforms.ToTensor(), transforms.Normalize(MEAN, STD)]
    )


def normalize(batch_uint8: torch.Tensor | np.ndarray) -> torch.Tensor:
    """uint8 (B, 3, S, S) (or (3, S, S)) -> float32 (x / 255 - mean) / std, on the input's device.

    The same float operations as ToTensor + Normalize, so results match them bit for bit. A numpy array is
    normalised with numpy, on the calling thread: torch's intra-op pool would keep its threads spinning
    after each op, taking ~15 % of the CPU from the augmentation workers beside it.
    """
    if str(batch_uint8.dtype) not in ("uint8", "torch.uint8"):
        raise TypeError(f"normalize expects a uint8 tensor, got {batch_uint8.dtype}")
    if batch_uint8.ndim < 3 or batch_uint8.shape[-3] != 3:
        raise ValueError(f"normalize expects (..., 3, H, W), got {tuple(batch_uint8.shape)}")
    if isinstance(batch_uint8, np.ndarray):
        x = batch_uint8.astype(np.float32)
        x /= np.float32(255)
        x -= np.asarray(MEAN, np.float32)[:, None, None]
        x /= np.asarray(STD, np.float32)[:, None, None]
        return torch.from_numpy(x)
    x = batch_uint8.to(torch.float32).div(255)
    mean = torch.as_tensor(MEAN, dtype=torch.float32, device=x.device).view(3, 1, 1)
    std = torch.as_tensor(STD, dtype=torch.float32, device=x.device).view(3, 1, 1)
    return x.sub_(mean).div_(std)
