"""ddpm_lib: the companion package of *Diffusion Models, Derived and Run*.

Modules are named by concept and meant to be read beside the chapters:

========================  ==================================================================
``schedules``             beta schedules (linear, cosine), zero-terminal-SNR rescale, respacing,
                          the samplers' grids (``sampling_timesteps``: leading/trailing/linspace)
``diffusion``             ``GaussianDiffusion``: q(x_t | x_0), the posterior, model mean/variance
``predictions``           what a model predicts (eps, x0, v, learned variance): the one conversion
``checks``                input checks at entry points, none in the loops (no GPU waits)
``losses``                L_simple, hybrid and VLB losses; bits/dim through the variational bound
``samplers``              DDPM, respaced DDPM, DDIM (and inversion), DPM-Solver++
``guidance``              classifier-free, classifier and loss guidance as eps-model wrappers
``inpainting``            inpainting with an unconditional model: replacement and RePaint resampling
``superres``              super-resolution as conditioning: downsampling, noise conditioning
                          augmentation, the loss and sampler of a cascade's second stage
``latent``                latent diffusion: the autoencoder's loss and training, latent scale,
                          latents as training data (``DataConfig.encoder``), decoding
``analytic``              the exact Gaussian-mixture denoiser (the samplers' oracle)
``gaussian``              Gaussian helpers: KL divergence, discretised likelihood
``models``                U-Net, 2-D MLP, noisy and feature classifiers, autoencoder, from JSON configs
``data``                  2-D toys, scikit-learn digits, procedural shapes, torchvision sets
``configs``               ``DiffusionConfig``, ``TrainConfig``: frozen dataclasses <-> JSON
``loop``                  ``TrainLoop``: the one training loop (step, log, checkpoint, resume) of both trainers
``train``                 the denoiser's training (Algorithm 1 on ``TrainLoop``; DDP, CUDA switches)
``classifier_training``   the classifiers' training loop (same checkpoints)
``ema``                   the EMA of the weights, with warm-up
``distributed``           DDP from torchrun's environment
``checkpoint``            safetensors + JSON checkpoints, atomic, checked on load
``metrics``               sliced Wasserstein, energy distance, Frechet distance, KID, accuracy,
                          diversity, memorisation
``presets``               the shipped run configs of ``ddpm train`` (``*.json``) and the data
``pretrained``            the shipped weights, their manifest and SHA-256 checks
``viz``                   image grids and 2-D scatter plots of samples
``evaluation``            loading a model by path or name, sampling and measuring it (used by the CLI)
``interop``               diffusers schedulers and ``UNet2DModel`` as ddpm_lib chains and models
``cli``                   ``python -m ddpm_lib train|sample|eval`` (the ``ddpm`` command)
``book``                  switches shared by the notebooks (quick mode, device, one thread)
``symbolic``              SymPy helpers of the derivations (normal densities, log ratios, display)
``bench``                 ``python -m ddpm_lib.bench``: training images/s and peak memory; ``--compare diffusers``
========================  ==================================================================

The names a reader uses most are importable from the package itself::

    import ddpm_lib

    model, diffusion = ddpm_lib.pretrained.load("digits")
    x = ddpm_lib.ddim_sample(model, diffusion, (16, 1, 8, 8), steps=50, generator=ddpm_lib.seeded(0))
"""

__version__ = "0.1.0"

import torch as _torch

from ddpm_lib import pretrained
from ddpm_lib.analytic import GaussianMixture
from ddpm_lib.configs import DiffusionConfig, TrainConfig
from ddpm_lib.diffusion import GaussianDiffusion
from ddpm_lib.guidance import classifier_free, classifier_guidance, loss_guidance
from ddpm_lib.inpainting import inpaint, repaint_schedule
from ddpm_lib.models import MLPConfig, MLPDenoiser, UNet, UNetConfig, model_from_config
from ddpm_lib.predictions import set_parameterization
from ddpm_lib.samplers import StepInfo, ddim_invert, ddim_sample, ddpm_sample, dpm_solver_pp_sample, heun_sample
from ddpm_lib.schedules import cosine_betas, get_betas, linear_betas, rescale_zero_terminal_snr, sampling_timesteps


def seeded(seed: int, device: str | _torch.device = "cpu") -> _torch.Generator:
    """A ``torch.Generator`` on ``device`` seeded with ``seed``: the package's only source of
    randomness is explicit generators (DESIGN.md), and this is the short way to make one."""
    return _torch.Generator(device).manual_seed(seed)


__all__ = [
    "GaussianDiffusion", "DiffusionConfig", "TrainConfig", "GaussianMixture",
    "linear_betas", "cosine_betas", "get_betas", "rescale_zero_terminal_snr", "sampling_timesteps",
    "ddpm_sample", "ddim_sample", "ddim_invert", "dpm_solver_pp_sample", "heun_sample", "StepInfo",
    "classifier_free", "classifier_guidance", "loss_guidance", "inpaint", "repaint_schedule",
    "UNet", "UNetConfig", "MLPDenoiser", "MLPConfig", "model_from_config", "set_parameterization",
    "pretrained", "seeded",
]
