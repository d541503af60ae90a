"""ddpm_lib: the companion package of *Diffusion Models, Derived and Run*.

Modules are named by concept and meant to be read beside the chapters:

========================  ==================================================================
``schedules``             beta schedules (linear, cosine), zero-terminal-SNR rescale, respacing
``diffusion``             ``GaussianDiffusion``: q(x_t | x_0), the posterior, model mean/variance
``losses``                L_simple, hybrid and VLB losses; bits/dim through the variational bound
``samplers``              DDPM, respaced DDPM, DDIM (and inversion), DPM-Solver++
``guidance``              classifier-free, classifier and loss guidance as eps-model wrappers
``analytic``              the exact Gaussian-mixture denoiser (the samplers' oracle)
``gaussian``              Gaussian helpers: KL divergence, discretised likelihood
``models``                U-Net, 2-D MLP, noisy and feature classifiers, from JSON configs
``data``                  2-D toys, scikit-learn digits, procedural shapes, torchvision sets
``configs``               ``DiffusionConfig``, ``TrainConfig``: frozen dataclasses <-> JSON
``train``                 the training loop (resume, divergence check, CUDA switches)
``classifier_training``   the classifiers' training loop (same checkpoints)
``ema``                   the EMA of the weights, with warm-up
``distributed``           DDP from torchrun's environment
``checkpoint``            safetensors + JSON checkpoints, atomic, checked on load
``metrics``               sliced Wasserstein, energy distance, Frechet distance, KID, accuracy,
                          memorisation
``presets``               the shipped run configs of ``ddpm train`` (``*.json``) and the data
``pretrained``            the shipped weights, their manifest and SHA-256 checks
``viz``                   image grids and 2-D scatter plots of samples
``cli``                   ``python -m ddpm_lib train|sample|eval`` (the ``ddpm`` command)
``book``                  switches shared by the notebooks (quick mode, device, one thread)
``symbolic``              SymPy helpers of the derivations (normal densities, log ratios, display)
``bench``                 ``python -m ddpm_lib.bench``: training images/s and peak memory
========================  ==================================================================
"""

__version__ = "0.1.0"
