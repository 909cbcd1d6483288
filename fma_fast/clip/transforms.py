"""CLIP preprocessing: a centre-crop pass for val/test and seeded augmented views for training.

Augmentation draws from a generator seeded by (seed, image path), never from the global RNG,
so every view is reproducible and independent of batching, worker count and process count.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any

import torch

from .encoder import MissingExtraError

#: The released training views' crop area range (torchvision's RandomResizedCrop default);
#: aspect ratios and flip as torchvision's default too.
AUGMENT_SCALE = (0.08, 1.0)
AUGMENT_RATIO = (3 / 4, 4 / 3)
FLIP_PROBABILITY = 0.5


def check_crop_scale(scale) -> tuple[float, float]:
    """A crop area range (low, high) with 0 < low <= high <= 1."""
    try:
        low, high = (float(v) for v in scale)
    except (TypeError, ValueError):
        raise ValueError(f"crop_scale must be two numbers (low, high), got {scale!r}") from None
    if not 0 < low <= high <= 1:
        raise ValueError(f"crop_scale must satisfy 0 < low <= high <= 1, got ({low}, {high})")
    return low, high


def require_image_libraries() -> None:
    """Fail once and clearly before reading images: a missing PIL would otherwise make every
    image look unreadable."""
    try:
        import PIL.Image  # noqa: F401
        import torchvision  # noqa: F401
    except ImportError as error:
        raise MissingExtraError(
            f"reading images needs pillow and torchvision ({error}); pip install fma_fast[clip]"
        ) from None


def open_image(path):
    """The image at ``path`` as RGB (PIL is imported here: only extraction needs it)."""
    from PIL import Image

    with Image.open(path) as image:
        return image.convert("RGB")


def view_generator(seed: int, key: str) -> torch.Generator:
    """A generator for one image's views: depends on the seed and the image, nothing else."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


@dataclass(frozen=True)
class Preprocess:
    """Resize/crop/normalise settings; ``size`` (H, W) comes from the model's config."""

    size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = "bicubic"
    scale: tuple[float, float] = AUGMENT_SCALE
    ratio: tuple[float, float] = AUGMENT_RATIO

    @classmethod
    def from_encoder(cls, encoder, scale: tuple[float, float] = AUGMENT_SCALE) -> Preprocess:
        """The encoder's resize and normalisation; ``scale``: the training crops' area range."""
        cfg = encoder.preprocessing
        return cls(
            size=tuple(cfg["size"]),
            mean=tuple(cfg["mean"]),
            std=tuple(cfg["std"]),
            interpolation=cfg["interpolation"],
            scale=check_crop_scale(scale),
        )

    def describe(self, *, train: bool = True) -> dict[str, Any]:
        """Everything that changes the pixels, for cache metadata; ``train`` False leaves out
        the training augmentation (what every split shares)."""
        described: dict[str, Any] = {
            "size": list(self.size),
            "mean": list(self.mean),
            "std": list(self.std),
            "interpolation": self.interpolation,
            "test": "resize shortest side + centre crop",
        }
        if train:
            described["train"] = self.augmentation()
        return described

    def augmentation(self) -> dict[str, Any]:
        """The training views' random resized crop and flip."""
        return {
            "crop": "random resized crop",
            "scale": list(self.scale),
            "ratio": list(self.ratio),
            "flip": FLIP_PROBABILITY,
        }

    def _mode(self):
        from torchvision.transforms import InterpolationMode

        return InterpolationMode(self.interpolation)

    def _finish(self, image) -> torch.Tensor:
        from torchvision.transforms import functional as TF

        return TF.normalize(TF.to_tensor(image), self.mean, self.std)

    def centre(self, image) -> torch.Tensor:
        """Bicubic resize of the shortest side, then a centre crop: (3, H, W)."""
        from torchvision.transforms import functional as TF

        height, width = self.size
        if height == width:
            image = TF.resize(image, height, interpolation=self._mode())
        else:  # scale so that the crop fits, keeping the aspect ratio
            scale = max(height / image.height, width / image.width)
            target = [round(image.height * scale), round(image.width * scale)]
            image = TF.resize(image, target, interpolation=self._mode())
        return self._finish(TF.center_crop(image, [height, width]))

    def _crop_box(self, height: int, width: int, generator: torch.Generator):
        """A random box covering ``scale`` of the area with aspect ratio in ``ratio`` (ten tries,
        then the largest centred box of an allowed ratio)."""
        area = height * width
        log_low, log_high = math.log(self.ratio[0]), math.log(self.ratio[1])
        for _ in range(10):
            draws = torch.rand(2, generator=generator).tolist()
            target = area * (self.scale[0] + draws[0] * (self.scale[1] - self.scale[0]))
            aspect = math.exp(log_low + draws[1] * (log_high - log_low))
            w = round(math.sqrt(target * aspect))
            h = round(math.sqrt(target / aspect))
            if 0 < w <= width and 0 < h <= height:
                top = int(torch.randint(0, height - h + 1, (1,), generator=generator))
                left = int(torch.randint(0, width - w + 1, (1,), generator=generator))
                return top, left, h, w
        aspect = width / height
        if aspect < self.ratio[0]:
            w, h = width, round(width / self.ratio[0])
        elif aspect > self.ratio[1]:
            h, w = height, round(height * self.ratio[1])
        else:
            h, w = height, width
        return (height - h) // 2, (width - w) // 2, h, w

    def views(self, image, count: int, generator: torch.Generator) -> torch.Tensor:
        """``count`` augmented views (count, 3, H, W): random resized crop + horizontal flip."""
        from torchvision.transforms import functional as TF

        out = []
        for _ in range(count):
            top, left, h, w = self._crop_box(image.height, image.width, generator)
            view = TF.resized_crop(
                image, top, left, h, w, list(self.size), interpolation=self._mode()
            )
            if float(torch.rand(1, generator=generator)) < FLIP_PROBABILITY:
                view = TF.hflip(view)
            out.append(self._finish(view))
        return torch.stack(out)
