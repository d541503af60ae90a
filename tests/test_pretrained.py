"""The shipped pretrained models: the manifest, hash verification, and quality thresholds that
the shipped models pass and broken models (untrained; labels shuffled) fail.

The thresholds were set from measurements at the test's own sizes (seed 0; the numbers in the
comments come from ``ddpm_lib.cli.evaluate`` on the shipped weights and on the broken models
built below), far enough from both sides that seed changes do not flip them.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from ddpm_lib import pretrained
from ddpm_lib.cli import Loaded, evaluate, load_source
from ddpm_lib.models import Autoencoder, FeatureClassifier, MLPDenoiser, NoisyClassifier, UNet, model_from_config
from ddpm_lib.presets import NOT_DENOISERS, preset_names

ROOT = Path(pretrained.__file__).parent
EXPECTED = {"swissroll": MLPDenoiser, "digits": UNet, "digits_cond": UNet, "digits_noisy_classifier": NoisyClassifier,
            "digits_features": FeatureClassifier, "shapes_features": FeatureClassifier,
            "digits_cond_p10": UNet, "digits_cond_p50": UNet, "digits4": UNet, "digits_sr": UNet,
            "shapes_ae": Autoencoder, "shapes_latent": UNet}
WEIGHTS_BUDGET = 40e6  # bytes of shipped weights, all models together

# Digits, n = 200 samples, DDPM respaced to 25 steps, seed 0 (measured on the shipped weights):
FD_MAX = 6.0  # shipped digits 2.6, digits_cond 0.17; untrained U-Net 42
KID_MAX = 0.2  # shipped -0.03 and -0.11 (unbiased: ~0 or below); untrained 0.83
COND_ACCURACY_MIN = 0.8  # shipped digits_cond 0.995; labels shuffled 0.0; untrained ~0.1 (chance)
SW_FLOOR_RATIO_MAX = 2.0  # swiss roll, n = 1000, DDPM 50 steps: shipped 1.01x its real-vs-real floor; untrained 6400x

def untrained(loaded: Loaded) -> Loaded:
    torch.manual_seed(0)
    return Loaded(model_from_config(loaded.model.config).eval(), loaded.diffusion_config, loaded.data, "untrained")


def digits_failures(loaded: Loaded) -> list[str]:
    """The digits thresholds a model misses (empty: it passes)."""
    r = evaluate(loaded, n=200, sampler="ddpm", steps=25, metrics={"fd", "kid", "acc"}, seed=0)
    fails = []
    if r["frechet_distance"]["value"] > FD_MAX:
        fails.append(f"frechet_distance {r['frechet_distance']['value']:.3g} > {FD_MAX}")
    if r["kid"]["value"] > KID_MAX:
        fails.append(f"kid {r['kid']['value']:.3g} > {KID_MAX}")
    if loaded.num_classes and r["class_accuracy"]["value"] < COND_ACCURACY_MIN:
        fails.append(f"class_accuracy {r['class_accuracy']['value']:.3g} < {COND_ACCURACY_MIN}")
    return fails


# --- the manifest and the files ------------------------------------------------------------


def test_manifest_lists_every_model_with_its_provenance():
    models = pretrained.manifest()["models"]
    assert set(models) == set(EXPECTED) == set(pretrained.available())
    total = 0
    for name, entry in models.items():
        assert entry["config"] in preset_names(), name
        # the preset, then any --set overrides (e.g. chapter 11's label-dropout variants), then the run folder
        assert re.search(rf"ddpm train --config {entry['config']}( --set \S+)* --out runs/{name}$", entry["command"]), name
        assert entry.get("dtype", "float32") in ("float32", "float16"), name
        assert entry["wall_time_s"] > 0 and entry["metrics"] and f"ddpm eval --checkpoint {name}" in entry["eval_command"]
        config = json.loads((ROOT / name / "config.json").read_text())
        assert config["step"] == entry["steps"] == config["train"]["steps"] and entry["seed"] == config["train"]["seed"]
        assert set(entry["files"]) == {"config.json", "model.safetensors"}
        for file, recorded in entry["files"].items():
            assert (ROOT / name / file).stat().st_size == recorded["bytes"], f"{name}/{file}"
            total += recorded["bytes"]
    assert total < WEIGHTS_BUDGET, f"pretrained weights take {total / 1e6:.1f} MB"


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_entry_loads(name):
    out = pretrained.load(name)
    model = out if name in ("digits_noisy_classifier", "digits_features", "shapes_features", "shapes_ae") else out[0]
    assert isinstance(model, EXPECTED[name]) and not model.training
    assert (pretrained.run_config(name).kind in NOT_DENOISERS) == (not isinstance(out, tuple))
    if isinstance(out, tuple):
        assert out[1].T == pretrained.run_config(name).diffusion.T


def test_load_returns_the_model_ready_to_sample():
    """A denoiser carries its prediction and variance, and its chain is on ``device`` too (the meta
    device: placement only, no data)."""
    model, diffusion = pretrained.load("digits", "meta")
    run = pretrained.run_config("digits")
    assert (model.prediction, model.variance) == (run.diffusion.prediction, run.diffusion.variance)
    assert next(model.parameters()).device.type == "meta" and diffusion.betas.device.type == "meta"
    assert pretrained.load("digits", "cpu")[1].betas.device.type == "cpu"


def test_tampered_or_missing_file_is_named(tmp_path):
    copy = tmp_path / "pretrained"
    shutil.copytree(ROOT, copy, ignore=shutil.ignore_patterns("__pycache__", "*.py"))
    pretrained.load("digits", root=copy)  # an intact copy loads
    weights = copy / "digits" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit of one weight
    weights.write_bytes(bytes(data))
    with pytest.raises(pretrained.PretrainedError, match=r"digits/model\.safetensors: SHA-256 differs"):
        pretrained.load("digits", root=copy)
    (copy / "swissroll" / "config.json").unlink()
    with pytest.raises(pretrained.PretrainedError, match=r"swissroll/config\.json: missing"):
        pretrained.load("swissroll", root=copy)
    with pytest.raises(pretrained.PretrainedError, match="no pretrained model 'nope'"):
        pretrained.load("nope", root=copy)


# --- quality: the shipped models pass, broken ones fail ---------------------------------------


def test_swiss_roll_within_twice_the_floor():
    shipped = load_source("swissroll")
    for loaded, should_pass in ((shipped, True), (untrained(shipped), False)):
        r = evaluate(loaded, n=1000, sampler="ddpm", steps=50, metrics={"sw"}, seed=0)["sliced_wasserstein"]
        ratio = r["value"] / r["reference"]
        assert (ratio <= SW_FLOOR_RATIO_MAX) == should_pass, f"{loaded.source}: SW {ratio:.2f} x the floor"


def test_digits_unconditional_passes_and_untrained_fails():
    shipped = load_source("digits")
    assert digits_failures(shipped) == []
    fails = digits_failures(untrained(shipped))
    assert any(f.startswith("frechet_distance") for f in fails), fails
    assert any(f.startswith("kid") for f in fails), fails  # both thresholds catch the broken model


def test_digits_conditional_passes_and_shuffled_labels_fail():
    shipped = load_source("digits_cond")
    assert digits_failures(shipped) == []
    shuffled = load_source("digits_cond")  # the same net with its label embeddings rotated: y -> y + 1
    with torch.no_grad():
        rows = shuffled.model.label_embed.weight
        rows[:10] = rows[:10].roll(-1, dims=0).clone()
    fails = digits_failures(shuffled)
    assert len(fails) == 1 and fails[0].startswith("class_accuracy"), fails  # the marginal is intact, the labels not


@pytest.mark.parametrize("name", ["digits_cond_p10", "digits_cond_p50"])
def test_label_dropout_variants_pass_in_float16(name):
    """Chapter 11's dropout variants ship in float16 and still pass the digits thresholds."""
    assert pretrained.manifest()["models"][name]["dtype"] == "float16"
    assert pretrained.run_config(name).train.label_dropout == {"digits_cond_p10": 0.1, "digits_cond_p50": 0.5}[name]
    assert digits_failures(load_source(name)) == []


def test_superres_model_refines_real_low_resolution_digits():
    """digits_sr on the 4x4 block means of 100 held-out digits (DDIM 20 steps): measured on the
    shipped fp16 weights, one sample's MSE to the true 8x8 image 0.11 and the mean of two 0.083,
    against 0.20 for bilinear upsampling; downsampled again the samples are 0.014 from their
    input. An untrained network of the same config gives MSE ~1e4 (eps ~ 0 at the noisiest steps)."""
    from ddpm_lib.data.digits import load_digits_dataset
    from ddpm_lib.superres import downsample, superres_sample, upsample

    model, diffusion = pretrained.load("digits_sr")
    assert (model.config.cond_channels, model.config.cond_augment) == (1, True)
    test = load_digits_dataset("test").images[:100]
    z = downsample(test, 2)
    with torch.no_grad():
        draws = [superres_sample(model, diffusion, z, steps=20, generator=torch.Generator().manual_seed(k))
                 for k in range(2)]

    def mse(a, b):
        return float((a - b).square().mean())

    bilinear = mse(upsample(z, 8), test)
    assert mse(draws[0], test) < 0.75 * bilinear
    assert mse((draws[0] + draws[1]) / 2, test) < 0.6 * bilinear
    assert mse(downsample(draws[0], 2), z) < 0.15 * bilinear


def test_cascade_of_digits4_and_digits_sr_passes_and_an_untrained_first_stage_fails():
    """The two-stage cascade (digits4 draws 4x4 digits, digits_sr refines them after noising to
    t = 200), n = 200, DDPM 25 steps: measured Frechet distance 1.32 (shipped), 43 with an
    untrained first stage; the same threshold as the single-stage digits model."""
    base, sr = load_source("digits4"), load_source("digits_sr")
    for first, should_pass in ((base, True), (untrained(base), False)):
        r = evaluate(sr, n=200, sampler="ddpm", steps=25, metrics={"fd"}, cascade=first, aug_level=200, seed=0)
        assert (r["frechet_distance"]["value"] <= FD_MAX) == should_pass, (first.source, r)


def test_shapes_autoencoder_reconstructs_held_out_shapes():
    """shapes_ae (fp16 weights) on the shapes test split: measured reconstruction MSE 4.5e-4 through
    the encoder's mean, where the images' own variance is about 0.3 and an untrained one scores
    about 0.3; the 4x8x8 latent is 12x smaller than the 3x32x32 image."""
    shipped = load_source("shapes_ae")
    assert shipped.model.config.latent_shape == (4, 8, 8)
    for loaded, should_pass in ((shipped, True), (untrained(shipped), False)):
        r = evaluate(loaded)
        assert (r["reconstruction_mse"]["value"] < 0.01) == should_pass, (loaded.source, r)


def test_latent_shapes_model_passes_in_pixel_space_and_untrained_fails():
    """shapes_latent samples 4x8x8 latents that shapes_ae decodes to 32x32 images; measured in the
    shapes feature space (n = 200, DDIM 20 steps): Frechet distance 0.33 (real-vs-real 0.66 at
    this n), class accuracy 0.99; an untrained U-Net on the same latents 87 and 0.05."""
    shipped = load_source("shapes_latent")
    assert shipped.data.encoder == "shapes_ae" and shipped.model.config.in_channels == 4
    for loaded, should_pass in ((shipped, True), (untrained(shipped), False)):
        r = evaluate(loaded, n=200, sampler="ddim", steps=20, metrics={"fd", "acc"}, seed=0)
        ok = r["frechet_distance"]["value"] < 2.0 and r["class_accuracy"]["value"] > 0.9
        assert ok == should_pass, (loaded.source, r)


def test_classifiers_are_accurate_and_untrained_ones_are_not():
    noisy = load_source("digits_noisy_classifier")
    for loaded, low in ((noisy, 0.9), (untrained(noisy), None)):
        r = evaluate(loaded, seed=0)
        accuracy = (r["test_accuracy_t0"]["value"], r["test_accuracy_t100"]["value"])
        assert (min(accuracy) > 0.9) == (low is not None), f"{loaded.source}: accuracy at t = 0, 100: {accuracy}"
    for name, low in (("digits_features", 0.97), ("shapes_features", 0.95)):
        shipped = load_source(name)
        assert evaluate(shipped)["test_accuracy"]["value"] >= low, name
        assert evaluate(untrained(shipped))["test_accuracy"]["value"] < 0.5, name
