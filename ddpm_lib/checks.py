"""Input checks at the public entry points, and none inside the loops (DESIGN.md, "Samplers").

On CUDA, reading a tensor's value on the host (``.item()``, ``bool(tensor)``, ``float(tensor)``,
``.tolist()``, a Python ``if`` on a comparison) makes the host wait until the GPU has finished
every queued kernel: a sync. One per training step or sampling step stalls the pipeline, so
checks that read VALUES run only where the data already is on the host (:func:`on_host`), once
per call, before any loop; checks of shapes and dtypes read metadata and run everywhere. On a
device an out-of-range timestep then fails inside the indexing kernel instead of here.
"""

from __future__ import annotations

from torch import Tensor
import torch

__all__ = ["on_host", "check_timesteps", "check_finite"]


def on_host(x: Tensor) -> bool:
    """Whether reading ``x``'s values costs no device sync (it lives in CPU memory). The one
    switch of the value checks; tests patch it to False to walk the device path on a CPU."""
    return x.device.type == "cpu"


def check_timesteps(t: object, T: int, batch: int | None = None) -> Tensor:
    """``t`` as checked: an integer tensor [B] (B = ``batch`` when given) of indices in [0, T).

    The range is checked only :func:`on_host`, through a NumPy view (no copy, no sync)."""
    if not isinstance(t, Tensor) or t.dtype == torch.bool or t.is_floating_point() or t.is_complex():
        raise ValueError(f"t must be an integer tensor (LongTensor), got {getattr(t, 'dtype', type(t).__name__)}")
    if t.ndim != 1 or (batch is not None and t.shape[0] != batch):
        raise ValueError(f"t must have shape [B] = [{batch}] to match x, got {tuple(t.shape)}")
    if t.numel() and on_host(t):
        values = t.detach().numpy()
        lo, hi = int(values.min()), int(values.max())
        if lo < 0 or hi >= T:
            raise ValueError(f"timestep out of range: t must lie in [0, {T}), got min {lo}, max {hi}")
    return t


def check_finite(name: str, x: Tensor) -> None:
    """ValueError if ``x`` holds NaN or inf; only :func:`on_host` (on a device a non-finite input
    makes the loss non-finite, which the training loop checks when it logs)."""
    if on_host(x) and not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or inf")
