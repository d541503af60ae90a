"""Image sets for readers with a network: MNIST, Fashion-MNIST, CIFAR-10 (through torchvision)
and any folder of images (through Pillow). Both are the ``vision`` extra::

    pip install "ddpm_lib[vision]"

The pixel transform is ours (:class:`ImageTransform`): uint8 pixels ``p`` become
``p / 127.5 - 1`` in [-1, 1] (DESIGN.md pitfall 9), optionally centre-cropped to a square and
resized with antialiased bilinear interpolation. It needs neither torchvision nor Pillow, so it
is tested everywhere.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from ddpm_lib.data.loading import check_range

__all__ = ["to_model_range", "center_crop_square", "resize_image", "ImageTransform", "TORCHVISION_SETS",
           "load_torchvision", "ImageFolderDataset", "IMAGE_EXTENSIONS"]

TORCHVISION_SETS = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST", "cifar10": "CIFAR10"}
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def _require(module: str, user: str):
    try:
        return importlib.import_module(module)
    except ImportError as e:
        top = module.split(".")[0]
        raise ImportError(f"{user} needs {top}, which is not installed; install the vision extra: "
                          f"pip install 'ddpm_lib[vision]'") from e


def to_model_range(image) -> Tensor:
    """A PIL image or uint8 array ([H, W] or [H, W, C]) as a float32 [C, H, W] tensor in [-1, 1]."""
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        raise ValueError(f"expected uint8 pixels (0..255), got dtype {arr.dtype}")
    x = torch.from_numpy(arr.astype(np.float32) / 127.5 - 1.0)
    if x.ndim == 2:
        x = x[None]
    elif x.ndim == 3:
        x = x.permute(2, 0, 1)
    else:
        raise ValueError(f"expected an [H, W] or [H, W, C] image, got shape {arr.shape}")
    return x.contiguous()


def center_crop_square(x: Tensor) -> Tensor:
    """The central min(H, W) x min(H, W) square of a [C, H, W] image."""
    H, W = x.shape[-2:]
    s = min(H, W)
    top, left = (H - s) // 2, (W - s) // 2
    return x[..., top:top + s, left:left + s]


def resize_image(x: Tensor, size: int) -> Tensor:
    """Resize a [C, H, W] image in [-1, 1] to [C, size, size] (antialiased bilinear; clamped,
    since bilinear overshoot is impossible but float rounding is not)."""
    if tuple(x.shape[-2:]) == (size, size):
        return x
    out = F.interpolate(x[None].float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]
    return out.clamp(-1.0, 1.0)


class ImageTransform:
    """uint8 image -> [C, H, W] float32 in [-1, 1]; with ``image_size``, centre-crop and resize.

    ``channels`` (1 or 3) converts a PIL image to greyscale ("L") or RGB first, e.g. MNIST to
    three channels for an RGB network. A class rather than a lambda so DataLoader workers can
    pickle it.
    """

    def __init__(self, image_size: int | None = None, channels: int | None = None):
        if channels not in (None, 1, 3):
            raise ValueError(f"channels must be None, 1 or 3, got {channels}")
        self.image_size, self.channels = image_size, channels

    def __call__(self, image) -> Tensor:
        if self.channels is not None and hasattr(image, "convert"):  # a PIL image
            image = image.convert("L" if self.channels == 1 else "RGB")
        x = to_model_range(image)
        if self.channels is not None and x.shape[0] != self.channels:
            raise ValueError(f"expected a {self.channels}-channel image, got {x.shape[0]} channels")
        if self.image_size is not None:
            x = resize_image(center_crop_square(x), self.image_size)
        return x

    def __repr__(self) -> str:
        return f"ImageTransform(image_size={self.image_size}, channels={self.channels})"


def load_torchvision(name: str, root: str | Path, *, train: bool = True, download: bool = False,
                     image_size: int | None = None, channels: int | None = None) -> Dataset:
    """MNIST, Fashion-MNIST or CIFAR-10 through torchvision, items ``(image in [-1, 1], label)``.

    Args:
        name: "mnist", "fashion_mnist" or "cifar10".
        root: the torchvision root folder (e.g. ``root/MNIST/raw``, ``root/cifar-10-batches-py``).
        train: the training split (else the test split).
        download: fetch the files if missing (needs a network).
        image_size: resize to this square size (e.g. 32 for MNIST in a CIFAR-sized U-Net).
        channels: convert to 1 (greyscale) or 3 (RGB) channels; default the set's own.
    """
    key = name.lower().replace("-", "_")
    if key not in TORCHVISION_SETS:
        raise ValueError(f"unknown torchvision set {name!r}; known: {sorted(TORCHVISION_SETS)}")
    datasets = _require("torchvision.datasets", f"load_torchvision({name!r})")
    cls = getattr(datasets, TORCHVISION_SETS[key])
    try:
        return cls(str(root), train=train, download=download, transform=ImageTransform(image_size, channels))
    except RuntimeError as e:  # torchvision: "Dataset not found or corrupted. You can use download=True ..."
        if download:
            raise
        raise FileNotFoundError(f"{TORCHVISION_SETS[key]} is not under {root} (torchvision: {e}); pass "
                                f"download=True (ddpm train: --set data.download=true) to fetch it") from None


class ImageFolderDataset(Dataset):
    """Every image under ``root`` (recursively), as ``(image [C, S, S] in [-1, 1], label)``.

    Images are converted to RGB (``channels=3``) or greyscale (``channels=1``), centre-cropped to
    a square and resized to ``image_size``. ``classes`` are the sorted folder names (relative to
    ``root``; "." for files directly in it) and the label is the index of the file's folder.
    """

    def __init__(self, root: str | Path, image_size: int, *, channels: int = 3):
        self.pil_image = _require("PIL.Image", "ImageFolderDataset")
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        self.root, self.channels = Path(root), channels
        self.transform = ImageTransform(image_size)
        self.files = sorted(p for p in self.root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        if not self.files:
            raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {self.root}")
        folders = [str(p.parent.relative_to(self.root).as_posix()) for p in self.files]
        self.classes = sorted(set(folders))
        self.labels = [self.classes.index(f) for f in folders]

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int):
        with self.pil_image.open(self.files[index]) as im:
            x = self.transform(im.convert("RGB" if self.channels == 3 else "L"))
        return check_range(x, name=str(self.files[index])), self.labels[index]
