"""Classifier training: a short run learns the digits, the noisy classifier sees q(x_t | x_0),
checkpoints load through ``checkpoint.load_model``, and resume is exact."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from ddpm_lib.checkpoint import load_model
from ddpm_lib.classifier_training import noisy_accuracy, train_classifier
from ddpm_lib.configs import DiffusionConfig, TrainConfig
from ddpm_lib.data import load_digits_dataset
from ddpm_lib.diffusion import GaussianDiffusion
from ddpm_lib.metrics import classifier_accuracy
from ddpm_lib.models import FeatureClassifier, NoisyClassifier

SMALL_FC = {"kind": "feature_classifier", "channels": [16, 32], "feature_dim": 32, "norm_groups": 8}
SMALL_NC = {"kind": "noisy_classifier", "model_channels": 16, "num_res_blocks": 1, "norm_groups": 8}


@pytest.fixture(scope="module")
def digits():
    train, test = load_digits_dataset("train"), load_digits_dataset("test")
    return (train.images, train.labels), (test.images, test.labels)


def test_short_run_reaches_test_accuracy(digits, tmp_path):
    (x, y), (x_test, y_test) = digits
    cfg = TrainConfig(steps=150, batch_size=64, lr=3e-3, warmup_steps=10, lr_schedule="cosine", ema_decay=0.9,
                      log_every=50, checkpoint_every=0, seed=0)
    result = train_classifier(SMALL_FC, cfg, (x, y), out_dir=tmp_path, progress=False)
    assert result.step == 150
    accuracy = classifier_accuracy(result.ema, x_test, y_test)
    assert accuracy >= 0.9, f"test accuracy {accuracy:.3f} after 150 steps (chance 0.1)"
    model, _ = load_model(tmp_path)  # the same checkpoint format: the EMA comes back
    assert isinstance(model, FeatureClassifier)
    assert classifier_accuracy(model, x_test, y_test) == pytest.approx(accuracy)


def test_noisy_classifier_trains_on_noisy_inputs(digits, tmp_path):
    (x, y), (x_test, y_test) = digits
    dcfg = DiffusionConfig(T=1000)
    cfg = TrainConfig(steps=120, batch_size=64, lr=3e-3, warmup_steps=10, ema_decay=0.9, log_every=60,
                      checkpoint_every=0, seed=0)
    result = train_classifier(SMALL_NC, cfg, (x, y), diffusion_config=dcfg, out_dir=tmp_path, progress=False)
    model, diffusion = load_model(tmp_path)
    assert isinstance(model, NoisyClassifier) and diffusion.T == 1000
    g = torch.Generator().manual_seed(0)
    clean = noisy_accuracy(result.ema, diffusion, x_test, y_test, 0, generator=g)
    pure_noise = noisy_accuracy(result.ema, diffusion, x_test, y_test, 999, generator=g)
    assert clean >= 0.6, f"accuracy at t = 0 is {clean:.3f} (chance 0.1)"
    assert pure_noise <= 0.3, f"accuracy at t = 999 is {pure_noise:.3f}: x_999 carries almost no signal"


def test_resume_is_exact(digits, tmp_path):
    (x, y), _ = digits
    x, y = x[:200], y[:200]
    cfg = TrainConfig(steps=6, batch_size=16, lr=1e-3, ema_decay=0.9, log_every=2, checkpoint_every=3, seed=1)
    train_classifier(SMALL_NC, cfg, (x, y), out_dir=tmp_path / "straight", progress=False)
    train_classifier(SMALL_NC, cfg.replace(steps=3), (x, y), out_dir=tmp_path / "resumed", progress=False)
    train_classifier(SMALL_NC, cfg, (x, y), out_dir=tmp_path / "resumed", progress=False)
    for name in ("model.safetensors", "ema.safetensors"):
        a = load_file(str(tmp_path / "straight" / "checkpoint" / name))
        b = load_file(str(tmp_path / "resumed" / "checkpoint" / name))
        assert all(torch.equal(a[k], b[k]) for k in a), f"{name} differs after resume"


def test_a_resumed_runs_log_equals_the_uninterrupted_one(digits, tmp_path, monkeypatch):
    """The checkpoint at step 6 lies inside the window of the log line at 10: the accuracy summed
    since the line at 5 (train_acc's accumulator) and the losses of that window are in the
    checkpoint, so after a crash during step 8 and a resume the log is the uninterrupted one's,
    all but the timing entries."""
    import json

    from ddpm_lib.classifier_training import ClassifierLoop
    from ddpm_lib.loop import TIMING_KEYS

    (x, y), _ = digits
    x, y = x[:200], y[:200]
    cfg = TrainConfig(steps=10, batch_size=16, lr=1e-3, ema_decay=0.9, log_every=5, checkpoint_every=3, seed=1)
    train_classifier(SMALL_NC, cfg, (x, y), out_dir=tmp_path / "straight", progress=False)
    real = ClassifierLoop.compute_loss

    def killed_during_step_8(self, x0, y):
        if self.step == 7:
            raise KeyboardInterrupt("killed (simulated)")
        return real(self, x0, y)

    with monkeypatch.context() as m:
        m.setattr(ClassifierLoop, "compute_loss", killed_during_step_8)
        with pytest.raises(KeyboardInterrupt):
            train_classifier(SMALL_NC, cfg, (x, y), out_dir=tmp_path / "resumed", progress=False)
    train_classifier(SMALL_NC, cfg, (x, y), out_dir=tmp_path / "resumed", progress=False)
    logs = [[{k: v for k, v in json.loads(line).items() if k not in TIMING_KEYS}
             for line in (tmp_path / run / "log.jsonl").read_text().splitlines()] for run in ("straight", "resumed")]
    assert [r["step"] for r in logs[0]] == [5, 10] and 0 < logs[0][1]["train_acc"] < 1
    assert logs[1] == logs[0]


def test_refuses_denoisers_and_unlabelled_data(digits, tmp_path):
    (x, y), _ = digits
    cfg = TrainConfig(steps=1, batch_size=8)
    with pytest.raises(ValueError, match="trains classifiers"):
        train_classifier({"kind": "mlp"}, cfg, (x.flatten(1)[:, :2], y), out_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="labelled"):
        train_classifier(SMALL_FC, cfg, x, out_dir=tmp_path, progress=False)


def test_callers_rng_untouched_and_noise_explicit(digits, tmp_path, monkeypatch):
    """A fresh and a resumed run leave ``torch.get_rng_state()`` as it was, and q(x_t | x_0) always
    gets its noise from the loop's generator."""
    (x, y), _ = digits
    explicit, q_sample = [], GaussianDiffusion.q_sample

    def checked(self, x0, t, noise=None, **kwargs):
        explicit.append(noise is not None)
        return q_sample(self, x0, t, noise=noise, **kwargs)

    monkeypatch.setattr(GaussianDiffusion, "q_sample", checked)
    cfg = TrainConfig(steps=2, batch_size=8, log_every=1, checkpoint_every=0, seed=1)
    torch.manual_seed(1234)
    before = torch.get_rng_state()
    train_classifier(SMALL_NC, cfg, (x[:64], y[:64]), out_dir=tmp_path, progress=False)
    assert torch.equal(torch.get_rng_state(), before), "a fresh run changed the caller's RNG"
    train_classifier(SMALL_NC, cfg.replace(steps=3), (x[:64], y[:64]), out_dir=tmp_path, progress=False)
    assert torch.equal(torch.get_rng_state(), before), "a resumed run changed the caller's RNG"
    assert explicit and all(explicit)


def test_one_loop_for_denoisers_and_classifiers():
    """Both trainers are thin users of ``ddpm_lib.loop.TrainLoop``; none borrows the other's privates."""
    import inspect

    from ddpm_lib import classifier_training, train
    from ddpm_lib.loop import TrainLoop

    assert issubclass(classifier_training.ClassifierLoop, TrainLoop) and issubclass(train.DenoiserLoop, TrainLoop)
    assert "ddpm_lib.train import" not in inspect.getsource(classifier_training)
    assert len(inspect.getsource(train).splitlines()) < 400
