"""Data that works offline, in the diffusion's range [-1, 1] (NCHW images, [n, 2] points).

=====================  ===================================================================
``toy2d``              2-D toys: ``swiss_roll``, ``two_moons``, ``checkerboard``,
                       ``eight_gaussians`` (an exact ``GaussianMixture``)
``digits``             scikit-learn's 8x8 digits with a fixed train/test split
``shapes``             procedurally drawn shape x colour images, regenerated per index
``vision``             MNIST / Fashion-MNIST / CIFAR-10 (torchvision) and image folders
``loading``            ``check_range`` (the [-1, 1] boundary), ``infinite_loader``
=====================  ===================================================================

Every random function takes ``generator=`` (a ``torch.Generator`` or an int seed) or ``seed=``.
"""

from ddpm_lib.data.digits import DIGITS_NUM_LEVELS, digits_split_indices, load_digits_dataset
from ddpm_lib.data.loading import LabelledImages, Latents, as_generator, check_range, infinite_loader
from ddpm_lib.data.shapes import BACKGROUND, COLOURS, SHAPES, ShapeParams, ShapesDataset, draw_shape
from ddpm_lib.data.toy2d import checkerboard, eight_gaussians, swiss_roll, two_moons
from ddpm_lib.data.vision import (
    TORCHVISION_SETS, ImageFolderDataset, ImageTransform, center_crop_square, load_torchvision, resize_image,
    to_model_range,
)

__all__ = [
    "swiss_roll", "two_moons", "checkerboard", "eight_gaussians",
    "DIGITS_NUM_LEVELS", "load_digits_dataset", "digits_split_indices",
    "SHAPES", "COLOURS", "BACKGROUND", "ShapeParams", "draw_shape", "ShapesDataset",
    "TORCHVISION_SETS", "load_torchvision", "ImageFolderDataset", "ImageTransform", "to_model_range",
    "center_crop_square", "resize_image",
    "check_range", "as_generator", "LabelledImages", "Latents", "infinite_loader",
]
