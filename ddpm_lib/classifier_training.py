r"""Training the classifiers: the noisy one of classifier guidance and the clean feature extractor.

* :class:`~ddpm_lib.models.NoisyClassifier` learns :math:`p_\phi(y \mid x_t, t)` on
  :math:`x_t \sim q(x_t \mid x_0)` at uniform t (Dhariwal & Nichol 2021, sec. 4; chapter 10): the
  same t and noise draws as the diffusion loop, then cross-entropy.
* :class:`~ddpm_lib.models.FeatureClassifier` learns :math:`p(y \mid x_0)` on clean images; its
  penultimate features are the feature space of ``ddpm_lib.metrics`` (Frechet distance, KID).

One function, :func:`train_classifier`, shaped like :func:`ddpm_lib.train.train` and built from
its pieces (batch stream, seeded generators, LR schedule, EMA, resume, divergence check), writing
the same checkpoint (``ddpm_lib.checkpoint``; safetensors + JSON, atomic): ``load_model`` rebuilds
the classifier. A feature classifier's checkpoint records a default ``DiffusionConfig`` it does
not use. Single process (no DDP): these nets train in minutes on a CPU::

    result = train_classifier({"kind": "feature_classifier"}, TrainConfig(steps=1500), (x, y), out_dir="runs/fc")
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ddpm_lib import distributed
from ddpm_lib.checkpoint import build_model, latest_checkpoint, save_checkpoint
from ddpm_lib.configs import DiffusionConfig, TrainConfig, config_from_dict
from ddpm_lib.ema import ema_decay, ema_update, make_ema
from ddpm_lib.metrics import classifier_accuracy
from ddpm_lib.train import (
    BatchStream, TrainResult, _checked_losses, _Data, _generators, _normalize, _restore, _rng_states, _trim_log, lr_at,
)

__all__ = ["train_classifier", "noisy_accuracy"]


def _logits(model: nn.Module, diffusion, x0: Tensor, t: Tensor | None, noise: Tensor | None) -> Tensor:
    """The classifier's logits: on x0 (feature classifier) or on x_t = q_sample(x0, t, noise) (noisy)."""
    if t is None:
        return model(x0)
    return model(diffusion.q_sample(x0, t, noise), t)


def train_classifier(model_config, train_config, data, *, diffusion_config=None, out_dir, resume: bool = True,
                     progress: bool = True) -> TrainResult:
    """Train a ``feature_classifier`` or ``noisy_classifier`` by cross-entropy; checkpoint to ``out_dir``.

    Args:
        model_config: dict with its ``"kind"`` (or a config object) of a classifier.
        train_config: ``TrainConfig`` (or dict); ``label_dropout`` and the sample fields are unused.
        data: ``(images [N, C, H, W] in [-1, 1], labels [N])``, a TensorDataset of those, or a
            Dataset of ``(x, label)`` items.
        diffusion_config: the chain whose q(x_t | x_0) the noisy classifier sees (that of the
            denoiser it will guide); default ``DiffusionConfig()``.
    Returns a :class:`ddpm_lib.train.TrainResult` (``ema`` is what the pretrained models ship).
    """
    dcfg = config_from_dict(DiffusionConfig, diffusion_config or DiffusionConfig())
    cfg = config_from_dict(TrainConfig, train_config)
    out_dir = Path(out_dir)
    info = distributed.setup(cfg.device)
    device = info.device
    try:
        if info.world_size > 1:  # W copies of one run would race on out_dir: refuse instead
            raise ValueError(f"classifier training runs in one process; it was started on {info.world_size} "
                             f"ranks (torchrun): run it without torchrun")
        # 1. set-up: model, EMA, optimiser, generators, data (labels required)
        torch.manual_seed(cfg.seed)
        model = build_model(_normalize(model_config)).to(device)
        model_config = _normalize(model_config, model)
        if model_config["kind"] not in ("feature_classifier", "noisy_classifier"):
            raise ValueError(f"train_classifier trains classifiers, got a model of kind {model_config['kind']!r}")
        noisy = model_config["kind"] == "noisy_classifier"
        ema = make_ema(model)
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        gens = _generators(cfg.seed, device)
        source = _Data(data, device)
        if not source.has_labels:
            raise ValueError("classifier training needs labelled data: (images, labels)")
        stream = BatchStream(len(source), gens["data"])
        diffusion = dcfg.build().to(device)

        # 2. resume from the last good checkpoint (same checks as the diffusion loop)
        step = 0
        if resume and (found := latest_checkpoint(out_dir)) is not None:
            step = _restore(found, model, ema, optimizer, gens, stream, model_config, dcfg, cfg, device)
        out_dir.mkdir(parents=True, exist_ok=True)
        log_path = out_dir / "log.jsonl"
        _trim_log(log_path, step)
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, initial=step, unit="step", disable=not progress)
        pending: list[Tensor] = []
        correct = torch.zeros((), device=device)

        # 3. the loop: batch, (uniform t and noise), cross-entropy, AdamW, EMA
        model.train()
        while step < cfg.steps:
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, cfg)
            x0, y = source.get(stream.take(cfg.batch_size))
            t = noise = None
            if noisy:
                t = torch.randint(diffusion.T, (x0.shape[0],), generator=gens["timestep"], device=device)
                noise = torch.randn(x0.shape, generator=gens["noise"], device=device)
            logits = _logits(model, diffusion, x0, t, noise)
            loss = F.cross_entropy(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip is not None:
                nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            step += 1
            ema_update(ema, model, ema_decay(cfg.ema_decay, step, cfg.ema_warmup))
            pending.append(loss.detach().float())
            correct += (logits.argmax(1) == y).float().mean().detach()
            bar.update(1)

            # 4. log (loss and training accuracy over the window) and atomic checkpoint
            last = step == cfg.steps
            do_log, do_ckpt = step % cfg.log_every == 0 or last, (cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or last
            if do_log or do_ckpt:
                window = _checked_losses(pending, step, info)
            if do_log:
                record = {"step": step, "loss": window.mean().item(), "train_acc": (correct / len(pending)).item()}
                bar.set_postfix(loss=f"{record['loss']:.4g}", acc=f"{record['train_acc']:.3f}", refresh=False)
                with log_path.open("a") as f:
                    f.write(json.dumps(record) + "\n")
                pending, correct = [], torch.zeros((), device=device)
            if do_ckpt:
                save_checkpoint(out_dir, step=step, model_config=model_config, diffusion_config=dcfg, train_config=cfg,
                                model=model.state_dict(), ema=ema.state_dict(), optimizer=optimizer.state_dict(),
                                rng=_rng_states(gens, stream, device), state={"data_pos": stream.pos})
        bar.close()
        return TrainResult(model=model, ema=ema, diffusion=diffusion, step=step, out_dir=out_dir)
    finally:
        distributed.teardown(info)


@torch.no_grad()
def noisy_accuracy(classifier: nn.Module, diffusion, images: Tensor, labels: Tensor, t: int, *,
                   generator: torch.Generator | None = None) -> float:
    """Accuracy of a noisy classifier on x_t ~ q(x_t | x_0) at ONE original timestep ``t`` (0-based);
    the noise is drawn on the CPU from ``generator``."""
    device = next(classifier.parameters()).device
    x0 = images.to(device)
    t_all = torch.full((x0.shape[0],), t, dtype=torch.long, device=device)
    x_t = diffusion.to(device).q_sample(x0, t_all, torch.randn(x0.shape, generator=generator).to(device))
    return classifier_accuracy(lambda x: classifier(x, t_all[: x.shape[0]]), x_t, labels)
