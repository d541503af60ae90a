r"""The scikit-learn digits: 1,797 greyscale 8x8 images of 10 classes, shipped with scikit-learn.

Pixels are integers 0..16 (17 levels: each is a count of "on" pixels in a 4x4 block of the
original 32x32 bitmap, Alpaydin & Kaynak 1998). They map to [-1, 1] by ``x / 8 - 1``: level k
goes to ``k / 8 - 1``, spaced 1/8 apart; the discretised likelihood of chapter 4 uses that bin
width (``DIGITS_NUM_LEVELS``).
"""

from __future__ import annotations

from functools import lru_cache

import torch

from ddpm_lib.data.loading import LabelledImages

__all__ = ["DIGITS_NUM_LEVELS", "load_digits_dataset", "digits_split_indices"]

DIGITS_NUM_LEVELS = 17  # pixel values 0..16


def digits_split_indices(labels: torch.Tensor, *, seed: int = 0, test_fraction: float = 0.2):
    """A fixed stratified split: per class, ``round(test_fraction * count)`` indices go to test.

    Returns sorted (train_idx, test_idx) LongTensors; the same seed gives the same split on any
    machine (the permutation comes from a seeded CPU ``torch.Generator``).
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    gen = torch.Generator().manual_seed(seed)
    train, test = [], []
    for c in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        k = round(test_fraction * len(idx))
        test.append(idx[:k])
        train.append(idx[k:])
    return torch.sort(torch.cat(train)).values, torch.sort(torch.cat(test)).values


@lru_cache(maxsize=1)
def _all_digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits  # ships with scikit-learn: no download

    raw = load_digits()
    images = torch.as_tensor(raw.images, dtype=torch.float32)[:, None] / 8.0 - 1.0  # 0..16 -> [-1, 1]
    return images, torch.as_tensor(raw.target, dtype=torch.long)


def load_digits_dataset(split: str = "train", *, seed: int = 0, test_fraction: float = 0.2) -> LabelledImages:
    """The digits as a dataset of ``(image [1, 8, 8] float32 in [-1, 1], label)`` items.

    ``split`` is "train", "test" or "all"; the split is fixed by ``seed`` and ``test_fraction``
    (defaults: 1,438 train / 359 test, stratified by class). ``.images`` and ``.labels`` give the
    whole split as tensors.
    """
    images, labels = _all_digits()
    classes = [str(c) for c in range(10)]
    if split == "all":
        return LabelledImages(images.clone(), labels.clone(), classes)
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train', 'test' or 'all', got {split!r}")
    train_idx, test_idx = digits_split_indices(labels, seed=seed, test_fraction=test_fraction)
    idx = train_idx if split == "train" else test_idx
    return LabelledImages(images[idx], labels[idx], classes)
