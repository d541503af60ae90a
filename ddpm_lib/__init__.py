"""ddpm_lib: the companion package of *Diffusion Models, Derived and Run*.

Modules are named by concept and meant to be read beside the chapters:

=================  =========================================================
``gaussian``       Gaussian helpers: KL divergence, discretised likelihood
``book``           switches shared by the notebooks (quick mode, device)
=================  =========================================================
"""

__version__ = "0.1.0"
