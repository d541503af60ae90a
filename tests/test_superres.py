"""Super-resolution as conditioning (ddpm_lib.superres; the U-Net's low_res / aug_level inputs)."""

from __future__ import annotations

import pytest
import torch

from ddpm_lib import superres
from ddpm_lib.configs import DiffusionConfig, TrainConfig
from ddpm_lib.data.digits import load_digits_dataset
from ddpm_lib.diffusion import GaussianDiffusion
from ddpm_lib.models import UNet, UNetConfig
from ddpm_lib.samplers import ddim_sample

pytestmark = pytest.mark.usefixtures("single_thread")

SR = dict(in_channels=1, image_size=8, model_channels=16, channel_mult=(1, 2), num_res_blocks=1,
          attention_resolutions=(), num_heads=1, norm_groups=8, cond_channels=1)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randomised(model: UNet) -> UNet:
    """Zero-initialised layers (the output conv, each residual branch's last conv) given random
    weights, so that the output depends on every input, as a trained network's does."""
    g = gen(9)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim > 1 and not p.any():
                p.normal_(0, 0.1, generator=g)
    return model


def test_downsample_is_the_block_mean_and_upsample_keeps_constants():
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    z = superres.downsample(x, 2)
    assert z.shape == (1, 1, 2, 2)
    assert z.flatten().tolist() == [(0 + 1 + 4 + 5) / 4, (2 + 3 + 6 + 7) / 4, (8 + 9 + 12 + 13) / 4, (10 + 11 + 14 + 15) / 4]
    assert torch.equal(superres.downsample(x, 1), x)
    flat = torch.full((2, 3, 4, 4), 0.25)
    assert torch.allclose(superres.upsample(superres.downsample(flat, 4), 4), flat)
    for bad in (0, 3, 2.0, True):
        with pytest.raises(ValueError):
            superres.downsample(x, bad)


def test_the_unet_sees_the_low_resolution_image_and_its_noise_level():
    model = randomised(UNet(UNetConfig(**SR, cond_augment=True)))
    x, t = torch.randn(3, 1, 8, 8, generator=gen(0)), torch.tensor([5, 50, 500])
    z, level = torch.randn(3, 1, 4, 4, generator=gen(1)), torch.tensor([0, 0, 0])
    out = model(x, t, low_res=z, aug_level=level)
    assert out.shape == x.shape
    assert (model(x, t, low_res=z + 0.5, aug_level=level) - out).abs().max() > 1e-3   # conditioning matters
    assert (model(x, t, low_res=z, aug_level=level + 300) - out).abs().max() > 1e-3   # so does its level
    # a full-resolution conditioning image is used as it is; a 4x4 one is upsampled bilinearly
    torch.testing.assert_close(model(x, t, low_res=superres.upsample(z, 8), aug_level=level), out)
    with pytest.raises(ValueError, match="pass low_res"):
        model(x, t, aug_level=level)
    with pytest.raises(ValueError, match="aug_level"):
        model(x, t, low_res=z)
    with pytest.raises(ValueError, match="low_res of shape"):
        model(x, t, low_res=torch.zeros(3, 2, 4, 4), aug_level=level)
    plain = UNet(UNetConfig(**{**SR, "cond_channels": 0}))
    with pytest.raises(ValueError, match="not a super-resolution model"):
        plain(x, t, low_res=z)
    with pytest.raises(ValueError, match="cond_augment"):
        UNetConfig(**{**SR, "cond_channels": 0}, cond_augment=True)


def test_augment_is_the_forward_process_and_a_negative_level_keeps_z():
    d = GaussianDiffusion.from_name("linear", 100)
    z, noise = torch.randn(4, 1, 4, 4, generator=gen(2)), torch.randn(4, 1, 4, 4, generator=gen(3))
    level = torch.tensor([-1, 0, 30, 99])
    out = superres.augment(z, level, d, noise=noise)
    assert torch.equal(out[0], z[0])
    torch.testing.assert_close(out[1:], d.q_sample(z[1:], level[1:], noise[1:]))
    torch.testing.assert_close(superres.augment(z, level, d, generator=gen(4)),
                               superres.augment(z, level, d, generator=gen(4)))


def test_superres_losses_is_the_diffusion_loss_with_the_downsampled_image():
    d = GaussianDiffusion.from_name("linear", 100)
    model = randomised(UNet(UNetConfig(**SR, cond_augment=True)))
    x0 = torch.rand(4, 1, 8, 8, generator=gen(5)) * 2 - 1
    t, noise = torch.tensor([1, 10, 50, 99]), torch.randn(4, 1, 8, 8, generator=gen(6))
    level, aug_noise = torch.tensor([0, 3, 7, 19]), torch.randn(4, 1, 4, 4, generator=gen(7))
    got = superres.superres_losses(d, model, x0, t, factor=2, max_aug_level=20, noise=noise, aug_level=level,
                                   aug_noise=aug_noise)
    z = d.q_sample(superres.downsample(x0, 2), level, aug_noise)
    want = d.training_losses(model, x0, t, noise, model_kwargs={"low_res": z, "aug_level": level})
    torch.testing.assert_close(got["loss"], want["loss"])
    with pytest.raises(ValueError, match="generator"):
        superres.superres_losses(d, model, x0, t, factor=2, max_aug_level=20, noise=noise)
    with pytest.raises(ValueError, match="cond_augment"):
        superres.superres_losses(d, UNet(UNetConfig(**SR)), x0, t, factor=2, max_aug_level=20, noise=noise,
                                 generator=gen(0))


def test_train_config_refuses_inconsistent_superres_settings(tmp_path):
    from ddpm_lib.train import train

    images = load_digits_dataset("train").images[:64]
    cfg = TrainConfig(steps=1, batch_size=8, log_every=1, checkpoint_every=0)
    with pytest.raises(ValueError, match="superres_factor"):
        train({"kind": "unet", **SR}, DiffusionConfig(T=50), cfg, images, out_dir=tmp_path / "a", progress=False)
    with pytest.raises(ValueError, match="cond_augment"):
        train({"kind": "unet", **SR}, DiffusionConfig(T=50), cfg.replace(superres_factor=2, max_aug_level=5), images,
              out_dir=tmp_path / "b", progress=False)
    with pytest.raises(ValueError, match="super-resolution model"):
        train({"kind": "unet", **{**SR, "cond_channels": 0}}, DiffusionConfig(T=50), cfg.replace(superres_factor=2),
              images, out_dir=tmp_path / "c", progress=False)
    with pytest.raises(ValueError, match="superres_factor"):
        TrainConfig(superres_factor=1)


@pytest.mark.filterwarnings("ignore:the chain ends at alpha_bar_T:UserWarning")
def test_a_small_superres_model_beats_bilinear_upsampling_on_held_out_digits(tmp_path):
    """A real training (train(), the CLI's loop) of a 4x4 -> 8x8 digits model with noise
    conditioning augmentation, judged on held-out digits. Measured (600 steps, 1 thread, about
    30 s; linear T = 200): one sample's MSE to the true 8x8 image 0.17, the mean of four samples
    (a posterior-mean estimate) 0.10, bilinear upsampling of the 4x4 input 0.21; downsampled
    again, the samples are 0.023 from their input, where another digit's 4x4 image is 0.25."""
    from ddpm_lib.checkpoint import load_model
    from ddpm_lib.train import train

    images = load_digits_dataset("train").images
    dcfg = DiffusionConfig(T=200)  # alpha_bar_T = 0.13: the sampler warns; the low-res input carries the signal
    cfg = TrainConfig(steps=600, batch_size=64, lr=2e-3, warmup_steps=50, lr_schedule="cosine", ema_decay=0.99,
                      log_every=100, checkpoint_every=0, sample_every=600, num_samples=16, sample_steps=10,
                      superres_factor=2, max_aug_level=40)
    train({"kind": "unet", **SR, "cond_augment": True}, dcfg, cfg, images, out_dir=tmp_path, progress=False)
    assert (tmp_path / "samples" / "step_0000600.png").is_file()
    model, diffusion = load_model(tmp_path / "checkpoint")
    test = load_digits_dataset("test").images[:128]
    z = superres.downsample(test, 2)

    def mse(a, b):
        return float((a - b).square().mean())

    with torch.no_grad():
        draws = [superres.superres_sample(model, diffusion, z, aug_level=0, steps=20, generator=gen(11 + k))
                 for k in range(4)]
    bilinear = mse(superres.upsample(z, 8), test)
    print(f"one sample {mse(draws[0], test):.3f}, mean of 4 {mse(sum(draws) / 4, test):.3f}, bilinear {bilinear:.3f}")
    assert all(torch.isfinite(d).all() for d in draws)
    assert mse(draws[0], test) < bilinear
    assert mse(sum(draws) / 4, test) < 0.7 * bilinear
    # the samples are consistent with their input: downsampled, they give back (nearly) z
    assert mse(superres.downsample(draws[0], 2), z) < 0.25 * mse(superres.downsample(test.roll(1, 0), 2), z)
    with torch.no_grad():  # the same generator reproduces them
        again = superres.superres_sample(model, diffusion, z, aug_level=0, steps=20, generator=gen(11))
    assert torch.equal(again, draws[0])


def test_data_downsample_gives_the_block_means_of_the_digits():
    from ddpm_lib.presets import DataConfig, load_data

    full, labels = load_data(DataConfig(name="digits"))
    small, small_labels = load_data(DataConfig(name="digits", downsample=2))
    assert DataConfig(name="digits", downsample=2).image_shape() == (1, 4, 4) == tuple(small.shape[1:])
    torch.testing.assert_close(small, superres.downsample(full, 2))
    assert torch.equal(labels, small_labels)
    shapes = DataConfig(name="shapes", n=8, image_size=32, downsample=4)
    assert shapes.image_shape() == (3, 8, 8) == tuple(load_data(shapes)[0].shape[1:])
    for bad in ({"downsample": 3}, {"downsample": 0}, {"name": "swiss_roll", "downsample": 2}):
        with pytest.raises(ValueError, match="downsample"):
            DataConfig(**{"name": "digits", **bad})


@pytest.fixture(scope="module")
def cascade_runs(tmp_path_factory):
    """Dry-run trainings (3 steps, tiny models) of the shipped cascade configs."""
    from ddpm_lib.cli import main

    root = tmp_path_factory.mktemp("cascade")
    for name in ("digits4", "digits_sr"):
        assert main(["train", "--config", name, "--dry-run", "--out", str(root / name),
                     "--set", "train.sample_every=3", "train.num_samples=4", "train.sample_steps=2"]) == 0
    return root


def test_the_cli_samples_and_evaluates_a_cascade(cascade_runs, tmp_path, capsys):
    import json

    import numpy as np

    from ddpm_lib.cli import main

    base, sr = str(cascade_runs / "digits4"), str(cascade_runs / "digits_sr")
    assert (cascade_runs / "digits_sr" / "samples" / "step_0000003.png").is_file()
    out = tmp_path / "cascade.png"
    assert main(["sample", "--checkpoint", sr, "--cascade", base, "--aug-level", "50", "--n", "4",
                 "--sampler", "ddim", "--steps", "3", "--out", str(out)]) == 0
    assert np.load(tmp_path / "cascade.npz")["samples"].shape == (4, 1, 8, 8)
    report = tmp_path / "eval.json"
    assert main(["eval", "--checkpoint", sr, "--cascade", base, "--n", "16", "--sampler", "ddim", "--steps", "3",
                 "--metrics", "fd", "--json", str(report)]) == 0
    record = json.loads(report.read_text())
    assert record["cascade"] == base and "frechet_distance" in record["metrics"]
    capsys.readouterr()
    # each of these is one clear error, no traceback
    for argv, message in (
        (["sample", "--checkpoint", sr, "--n", "2", "--steps", "2", "--out", str(tmp_path / "a.png")], "--cascade"),
        (["sample", "--checkpoint", base, "--cascade", base, "--n", "2", "--out", str(tmp_path / "b.png")],
         "not a super-resolution model"),
        (["sample", "--checkpoint", sr, "--cascade", sr, "--n", "2", "--out", str(tmp_path / "c.png")], "first stage"),
        (["sample", "--checkpoint", sr, "--cascade", "digits", "--n", "2", "--out", str(tmp_path / "e.png")],
         "cannot refine"),
        (["sample", "--checkpoint", base, "--aug-level", "3", "--n", "2", "--out", str(tmp_path / "d.png")],
         "--aug-level"),
        (["eval", "--checkpoint", sr, "--cascade", base, "--metrics", "bpd", "--n", "2"], "bpd"),
    ):
        assert main(argv) != 0, argv
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (argv, err)
