r"""Training the classifiers: the noisy one of classifier guidance and the clean feature extractor.

* :class:`~ddpm_lib.models.NoisyClassifier` learns :math:`p_\phi(y \mid x_t, t)` on
  :math:`x_t \sim q(x_t \mid x_0)` at uniform t (Dhariwal & Nichol 2021, sec. 4; chapter 10): the
  same t and noise draws as the diffusion loop, then cross-entropy.
* :class:`~ddpm_lib.models.FeatureClassifier` learns :math:`p(y \mid x_0)` on clean images; its
  penultimate features are the feature space of ``ddpm_lib.metrics`` (Frechet distance, KID).

One function, :func:`train_classifier`, runs the package's one training loop
(``ddpm_lib.loop.TrainLoop``: batch stream, seeded generators, LR schedule, EMA, resume,
divergence check, the caller's RNG untouched) with cross-entropy as its loss, writing the same
checkpoint (``ddpm_lib.checkpoint``; safetensors + JSON, atomic): ``load_model`` rebuilds the
classifier. Its log adds ``train_acc``, the training accuracy over the logged window (its sum
so far is in the checkpoint: a resumed run logs what an uninterrupted one does). A
feature classifier's checkpoint records a default ``DiffusionConfig`` it does not use. Single
process (no DDP): these nets train in minutes on a CPU::

    result = train_classifier({"kind": "feature_classifier"}, TrainConfig(steps=1500), (x, y), out_dir="runs/fc")
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ddpm_lib.configs import DiffusionConfig
from ddpm_lib.loop import TrainLoop, TrainResult
from ddpm_lib.metrics import classifier_accuracy
from ddpm_lib.presets import CLASSIFIERS

__all__ = ["train_classifier", "noisy_accuracy", "ClassifierLoop"]


def _logits(model: nn.Module, diffusion, x0: Tensor, t: Tensor | None, noise: Tensor | None) -> Tensor:
    """The classifier's logits: on x0 (feature classifier) or on x_t = q_sample(x0, t, noise) (noisy)."""
    if t is None:
        return model(x0)
    return model(diffusion.q_sample(x0, t, noise=noise), t)


class ClassifierLoop(TrainLoop):
    """:class:`~ddpm_lib.loop.TrainLoop` with the cross-entropy of a classifier: on clean x0, or,
    for the noisy classifier of guidance, on x_t ~ q(x_t | x_0) at uniform t with the same t and
    noise draws as the diffusion loop (Dhariwal & Nichol 2021, sec. 4)."""

    shown = ("loss", "train_acc")

    def setup(self) -> None:
        if self.info.world_size > 1:  # W copies of one run would race on out_dir: refuse instead
            raise ValueError(f"classifier training runs in one process; it was started on {self.info.world_size} "
                             f"ranks (torchrun): run it without torchrun")
        super().setup()
        kind = self.model_config["kind"]
        if kind not in CLASSIFIERS:
            raise ValueError(f"train_classifier trains classifiers, got a model of kind {kind!r}")
        if not self.source.has_labels:
            raise ValueError("classifier training needs labelled data: (images, labels)")
        self.noisy, self.correct = kind == "noisy_classifier", torch.zeros((), device=self.device)

    def compute_loss(self, x0: Tensor, y: Tensor | None) -> Tensor:
        t, noise = self.timesteps_and_noise(x0) if self.noisy else (None, None)
        logits = _logits(self.net, self.diffusion, x0, t, noise)
        self.correct += (logits.argmax(1) == y).float().mean().detach()  # summed on the device: no sync
        return F.cross_entropy(logits, y)

    def log_entries(self, window: Tensor) -> dict:
        entries = super().log_entries(window)
        entries["train_acc"] = (self.correct / len(window)).item()
        self.correct = torch.zeros((), device=self.device)
        return entries

    def loop_state(self) -> dict:
        """Adds the accuracy summed since the last log line (float32, exact as a JSON double), so
        that a resumed run logs the uninterrupted run's ``train_acc``."""
        return {**super().loop_state(), "train_correct": self.correct.item()}

    def load_loop_state(self, state: dict) -> None:
        super().load_loop_state(state)
        correct = state["train_correct"]
        if not isinstance(correct, (int, float)) or isinstance(correct, bool):
            raise TypeError(f"train_correct must be a number, got {correct!r}")
        self.correct = torch.tensor(float(correct), device=self.device)


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
    Returns a :class:`ddpm_lib.loop.TrainResult` (``ema`` is what the pretrained models ship).
    """
    return ClassifierLoop(model_config, diffusion_config or DiffusionConfig(), train_config, data, out_dir=out_dir,
                          resume=resume, progress=progress).run()


@torch.no_grad()
def noisy_accuracy(classifier: nn.Module, diffusion, images: Tensor, labels: Tensor, t: int, *,
                   generator: torch.Generator | None = None) -> float:
    """Accuracy of a noisy classifier on x_t ~ q(x_t | x_0) at ONE original timestep ``t`` (0-based);
    the noise is drawn on the CPU from ``generator``."""
    device = next(classifier.parameters()).device
    x0 = images.to(device)
    t_all = torch.full((x0.shape[0],), t, dtype=torch.long, device=device)
    x_t = diffusion.to(device).q_sample(x0, t_all, noise=torch.randn(x0.shape, generator=generator).to(device))
    return classifier_accuracy(lambda x: classifier(x, t_all[: x.shape[0]]), x_t, labels)
