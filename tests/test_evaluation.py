"""ddpm_lib.evaluation without training: what ``generate`` hands each sampler (the checkpoint's
prediction, variance and the spacing), and the bits/dim path keeping the model, the chain and
the images on one device. Tiny untrained models; the samplers and the NLL are spied on."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from ddpm_lib import samplers
from ddpm_lib.diffusion import GaussianDiffusion
from ddpm_lib.evaluation import Loaded, _image_metrics, evaluate, generate
from ddpm_lib.models import model_from_config
from ddpm_lib.presets import dry_run, load_run_config


def tiny(preset: str, **diffusion) -> Loaded:
    """The dry-run model of a shipped config, untrained, with diffusion config overrides."""
    run = dry_run(load_run_config(preset))
    torch.manual_seed(0)
    model = model_from_config(run.model).eval()
    return Loaded(model, dataclasses.replace(run.diffusion, **diffusion), run.data, preset)


SAMPLER_FUNCTIONS = {"ddpm": "ddpm_sample", "ddim": "ddim_sample", "dpm++": "dpm_solver_pp_sample"}


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
@pytest.mark.parametrize("sampler", sorted(SAMPLER_FUNCTIONS))
def test_generate_passes_the_checkpoints_parameterisation_to_every_sampler(sampler, prediction, monkeypatch):
    calls = []

    def spy(model, diffusion, shape, **kw):
        calls.append(kw)
        return torch.zeros(shape)

    monkeypatch.setattr(samplers, SAMPLER_FUNCTIONS[sampler], spy)
    loaded = tiny("swissroll", prediction=prediction, variance="fixed_large")
    x, y = generate(loaded, 6, sampler=sampler, steps=4, spacing="linspace", seed=1)
    assert x.shape == (6, 2) and y is None
    (kw,) = calls
    assert kw["prediction"] == prediction and kw["steps"] == 4 and kw["spacing"] == "linspace"
    # only DDPM's reverse variance is a choice; DDIM and DPM-Solver++ have their own
    assert kw.get("variance") == ("fixed_large" if sampler == "ddpm" else None)


@pytest.mark.parametrize("prediction", ["x0", "v"])
def test_non_eps_models_sample_with_ddim_and_dpm_solver(prediction):
    loaded = tiny("swissroll", prediction=prediction)
    for sampler in ("ddim", "dpm++"):
        x, _ = generate(loaded, 8, sampler=sampler, steps=3)
        assert x.shape == (8, 2) and torch.isfinite(x).all(), (sampler, prediction)


def test_non_finite_samples_are_refused_naming_the_model():
    loaded = tiny("swissroll")
    with torch.no_grad():
        loaded.model.output.bias.fill_(3e38)  # finite weights, an output that overflows
    for sampler in SAMPLER_FUNCTIONS:
        with pytest.raises(ValueError, match=r"^swissroll: .*non-finite"):
            generate(loaded, 4, sampler=sampler, steps=3)


def _spy_bits_per_dim(monkeypatch) -> tuple[list, list]:
    """Record the chains made by ``GaussianDiffusion.to`` and what ``nll_bits_per_dim`` is called with."""
    moved, seen = [], []
    original_to = GaussianDiffusion.to

    def to(self, device):
        out = original_to(self, device)
        moved.append((out, torch.device(device)))
        return out

    def nll(self, model, x0, **kw):
        y = kw["model_kwargs"].get("y")
        seen.append({"diffusion": self, "model": next(model.parameters()).device, "x0": x0.device,
                     "y": None if y is None else y.device})
        return {"total_bpd": torch.ones(len(x0), device=x0.device)}

    monkeypatch.setattr(GaussianDiffusion, "to", to)
    monkeypatch.setattr(GaussianDiffusion, "nll_bits_per_dim", nll)
    return moved, seen


def test_bits_per_dim_runs_the_chain_and_the_images_on_the_models_device(monkeypatch):
    moved, seen = _spy_bits_per_dim(monkeypatch)
    loaded = tiny("digits_cond")
    out = _image_metrics(loaded, torch.zeros(4, 1, 8, 8), None, {"bpd"}, seed=0, nll_batches=2)
    assert out["bits_per_dim"]["value"] == 1.0 and "128 images" in out["bits_per_dim"]["note"]
    assert len(seen) == 2
    for call in seen:
        # the chain is not the one built on the CPU by DiffusionConfig.build: it was moved to the model
        assert any(call["diffusion"] is d and device == call["model"] for d, device in moved), "diffusion not moved"
        assert call["x0"] == call["y"] == call["model"] == loaded.device


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bits_per_dim_and_noisy_accuracy_on_cuda():
    loaded = tiny("digits_cond")
    loaded.model.cuda()
    out = _image_metrics(loaded, torch.zeros(4, 1, 8, 8), None, {"bpd"}, seed=0, nll_batches=1)
    assert out["bits_per_dim"]["value"] > 0
    noisy = tiny("digits_noisy_classifier")
    noisy.model.cuda()
    assert all(0 <= r["value"] <= 1 for r in evaluate(noisy).values())
