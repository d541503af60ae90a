r"""Latent diffusion, part one: training the autoencoder and moving between pixels and latents
(Rombach et al. 2022, arXiv 2112.10752; book chapter 13).

* :func:`autoencoder_losses`: the autoencoder's objective, a reconstruction error plus
  ``kl_weight`` times :math:`\mathrm{KL}(q_\phi(z \mid x)\,\|\,\mathcal N(0, I))` (their sec. 3, the
  "KL-reg" variant, without the perceptual and adversarial terms). With a Gaussian decoder of
  fixed variance it is a reweighted negative ELBO of chapter 1's VAE: the KL term per latent
  dimension is the closed form of chapter 1,
  :math:`\tfrac12(\mu^2 + \sigma^2 - 1 - \log\sigma^2)`.
* :func:`train_autoencoder`: the package's one training loop (``ddpm_lib.loop.TrainLoop``:
  seeded batches, EMA, atomic checkpoints, exact resume, divergence guard) with that loss;
  ``ddpm train --config <an autoencoder config>`` runs it.
* :func:`encoded_data` (``DataConfig.encoder``): a data set's images as scaled latents, for
  ``ddpm train``; :func:`decode_samples` maps a latent model's samples back to images.
* :func:`latent_scale`, :func:`encode`, :func:`decode`: the latents a diffusion model is trained
  on are the encoder's means times a scale factor chosen so that they have unit standard
  deviation over the training set (Rombach et al., sec. 4.3.2 and App. G: their 0.18215 is
  1 / std of the first batch), because the diffusion's forward process assumes data of about
  unit scale (chapter 2).
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor, nn

from ddpm_lib import distributed
from ddpm_lib.configs import DiffusionConfig
from ddpm_lib.loop import TrainLoop, TrainResult

__all__ = ["kl_to_standard_normal", "autoencoder_losses", "AutoencoderLoop", "train_autoencoder", "latent_scale",
           "encode", "decode", "encoder_config", "load_encoder", "data_scale", "encoded_data", "decode_samples"]


def kl_to_standard_normal(mean: Tensor, logvar: Tensor) -> Tensor:
    r""":math:`\mathrm{KL}(\mathcal N(\mu, \operatorname{diag} e^{\ell})\,\|\,\mathcal N(0, I))` per example
    [B], summed over the latent's dimensions (Kingma & Welling 2014, App. B; chapter 1)."""
    return 0.5 * (mean.square() + logvar.exp() - 1.0 - logvar).flatten(1).sum(dim=1)


def autoencoder_losses(autoencoder: nn.Module, x: Tensor, noise: Tensor | None) -> dict[str, Tensor]:
    r"""Per-example terms [B] of the autoencoder's objective on images ``x``, with the latent drawn
    by the reparameterisation :math:`z = \mu + \sigma\,\varepsilon` from ``noise`` (latent-shaped;
    None decodes the mean, as evaluation does):
    ``"recon"`` the mean squared error per pixel, ``"kl"`` the KL per latent dimension, ``"loss"``
    = recon + ``kl_weight`` * kl (``kl_weight`` from the model's config)."""
    recon, mean, logvar = autoencoder(x, noise)
    rec = (recon - x).square().flatten(1).mean(dim=1)
    kl = kl_to_standard_normal(mean, logvar) / mean[0].numel()
    return {"recon": rec, "kl": kl, "loss": rec + autoencoder.config.kl_weight * kl}


class AutoencoderLoop(TrainLoop):
    """:class:`~ddpm_lib.loop.TrainLoop` with :func:`autoencoder_losses`; the latent noise is drawn
    for the GLOBAL batch from the loop's seeded noise generator (W ranks draw what one does). Its
    log adds ``recon`` and ``kl``, the window means of the two terms."""

    shown = ("loss", "recon", "kl")

    def setup(self) -> None:
        super().setup()
        if self.model_config["kind"] != "autoencoder":
            raise ValueError(f"train_autoencoder trains an autoencoder, got a model of kind {self.model_config['kind']!r}")
        self.sums = torch.zeros(2, device=self.device)

    def compute_loss(self, x0: Tensor, y: Tensor | None) -> Tensor:
        shape = self.model.config.latent_shape
        noise = torch.randn((self.cfg.batch_size, *shape), generator=self.gens["noise"], device=self.device)
        terms = autoencoder_losses(self.net, x0, distributed.shard(noise, self.info))
        self.sums += torch.stack([terms["recon"].mean(), terms["kl"].mean()]).detach()  # no sync
        return terms["loss"].mean()

    def log_entries(self, window: Tensor) -> dict:
        entries = super().log_entries(window)
        recon, kl = (self.sums / len(window)).tolist()
        entries.update(recon=recon, kl=kl)
        self.sums = torch.zeros(2, device=self.device)
        return entries

    def loop_state(self) -> dict:
        """Adds the window sums (exact as JSON doubles), so a resumed run logs what an uninterrupted one does."""
        return {**super().loop_state(), "autoencoder_sums": self.sums.tolist()}

    def load_loop_state(self, state: dict) -> None:
        super().load_loop_state(state)
        sums = state["autoencoder_sums"]
        if not (isinstance(sums, list) and len(sums) == 2 and all(isinstance(v, (int, float)) for v in sums)):
            raise TypeError(f"autoencoder_sums must be a list of two numbers, got {sums!r}")
        self.sums = torch.tensor(sums, device=self.device)


def train_autoencoder(model_config, train_config, data, *, out_dir, resume: bool = True,
                      progress: bool = True) -> TrainResult:
    """Train an ``autoencoder`` (``ddpm_lib.models.AutoencoderConfig``) on images in [-1, 1];
    checkpoint to ``out_dir`` (``checkpoint.load_model`` rebuilds it; the checkpoint records a
    default ``DiffusionConfig`` it does not use). ``data``: images [N, C, H, W], an
    ``(images, labels)`` pair (labels unused) or a Dataset. Returns a ``TrainResult``."""
    return AutoencoderLoop(model_config, DiffusionConfig(), train_config, data, out_dir=out_dir, resume=resume,
                           progress=progress).run()


@torch.no_grad()
def latent_scale(autoencoder: nn.Module, images: Tensor, *, batch_size: int = 256) -> float:
    """1 / (standard deviation of the encoder's means over ``images``), in float64: the factor that
    gives the diffusion model latents of unit scale (Rombach et al. 2022, sec. 4.3.2)."""
    means = encode(autoencoder, images, scale=1.0, batch_size=batch_size).double()
    std = float(means.std())
    if not std > 0:
        raise ValueError("the encoder maps every image to the same latent: no scale can normalise it")
    return 1.0 / std


@torch.no_grad()
def encode(autoencoder: nn.Module, images: Tensor, *, scale: float, batch_size: int = 256) -> Tensor:
    """``scale`` times the encoder's means of ``images`` (the deterministic latent), batch by batch,
    on the autoencoder's device; returned on the images' device."""
    device = next(autoencoder.parameters()).device
    out = [autoencoder.encode(x.to(device))[0] * scale for x in images.split(batch_size)]
    return torch.cat(out).to(images.device)


@torch.no_grad()
def decode(autoencoder: nn.Module, latents: Tensor, *, scale: float, batch_size: int = 256) -> Tensor:
    """Images decoded from scaled ``latents`` (divided by ``scale`` first), clamped to [-1, 1]."""
    device = next(autoencoder.parameters()).device
    out = [autoencoder.decode(z.to(device) / scale).clamp(-1, 1) for z in latents.split(batch_size)]
    return torch.cat(out).to(latents.device)


# --- latents as data (``DataConfig.encoder``) ------------------------------------------------


def encoder_config(spec: str):
    """The ``AutoencoderConfig`` of ``spec``: a pretrained name or a checkpoint / run directory."""
    from ddpm_lib import pretrained
    from ddpm_lib.checkpoint import read_config
    from ddpm_lib.models import AutoencoderConfig

    if spec in pretrained.available():
        model = pretrained.run_config(spec).model.to_dict()
    else:
        model = read_config(spec)["model"]
    if model.get("kind") != "autoencoder":
        raise ValueError(f"data.encoder {spec!r} is a {model.get('kind')!r}, not an autoencoder")
    return AutoencoderConfig.from_dict(model)


def load_encoder(spec: str, device: str | torch.device = "cpu") -> nn.Module:
    """The autoencoder ``spec`` (pretrained name or checkpoint path), EMA weights, eval mode."""
    from ddpm_lib import pretrained
    from ddpm_lib.checkpoint import load_model

    encoder_config(spec)  # a clear error for a model that is not an autoencoder
    if spec in pretrained.available():
        return pretrained.load(spec, device)
    return load_model(spec, device=device)[0]


@functools.lru_cache(maxsize=4)
def data_scale(data) -> float:
    """:func:`latent_scale` of ``data.encoder`` on the training split of ``data.pixels()``."""
    from ddpm_lib.presets import load_tensors

    return latent_scale(load_encoder(data.encoder), load_tensors(data.pixels(), "train")[0])


@functools.lru_cache(maxsize=4)
def encoded_data(data, split: str):
    """(scaled latents, labels) of ``data``'s images through ``data.encoder``: what
    ``presets.load_data`` gives a latent diffusion model to train on (Rombach et al. 2022, sec. 3),
    as ``ddpm_lib.data.Latents`` (a TensorDataset the training loop does not hold to [-1, 1])."""
    from ddpm_lib.data import Latents
    from ddpm_lib.presets import load_tensors

    images, labels = load_tensors(data.pixels(), split)
    ae = load_encoder(data.encoder)
    want = (ae.config.in_channels, ae.config.image_size, ae.config.image_size)
    if tuple(images.shape[1:]) != want:
        raise ValueError(f"data.encoder {data.encoder!r} takes images {list(want)}, but the data gives "
                         f"{list(images.shape[1:])}")
    return Latents(encode(ae, images, scale=data_scale(data)), labels)


def decode_samples(data, latents: Tensor) -> Tensor:
    """Images [-1, 1] of a latent model's samples: :func:`decode` with ``data``'s encoder and scale."""
    ae = load_encoder(data.encoder, latents.device)
    return decode(ae, latents, scale=data_scale(data))
