"""ddpm_lib and Hugging Face diffusers agree: the same chain, the same grid, the same samples.

A tiny random diffusers ``UNet2DModel`` (float64, CPU, seeded) is sampled twice from the same x_T:
by diffusers' own scheduler loop (``set_timesteps`` then ``step``) and by ``ddpm_lib.samplers``
through :class:`ddpm_lib.interop.DiffusersUNet`; the images must agree to 1e-6.

diffusers keeps its betas and alpha_bar in float32; ddpm_lib's chains are float64. To compare the
ALGORITHMS and not the storage, each diffusers scheduler gets ddpm_lib's float64 tables written
over its own (``_use_float64_tables``); that the tables themselves agree to float32 rounding is
tested separately (``test_chain_matches_diffusers_tables``).
"""

from __future__ import annotations

import warnings

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from ddpm_lib import interop  # noqa: E402
from ddpm_lib.diffusion import GaussianDiffusion  # noqa: E402
from ddpm_lib.samplers import ddim_sample, ddpm_sample  # noqa: E402
from ddpm_lib.schedules import cosine_betas, linear_betas, rescale_zero_terminal_snr, sampling_timesteps  # noqa: E402

T = 100
SHAPE = (2, 1, 8, 8)
# beta_end 0.2 at T = 100 (the 1000-step schedule's per-step range scaled by 10) ends the chain at
# alpha_bar_T ~ 3e-5, close enough to pure noise that no sampler warns about the terminal SNR.
LINEAR = {"num_train_timesteps": T, "beta_schedule": "linear", "beta_start": 1e-3, "beta_end": 0.2}


pytestmark = pytest.mark.usefixtures("single_thread")  # conftest: one intra-op thread, restored after


def tiny_unet(out_channels: int = 1, num_class_embeds: int | None = None, seed: int = 0):
    """The smallest UNet2DModel with both block kinds (plain and attention): 8x8x1, 8 and 16 channels."""
    torch.manual_seed(seed)
    unet = diffusers.UNet2DModel(
        sample_size=8, in_channels=1, out_channels=out_channels, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4, attention_head_dim=8, num_class_embeds=num_class_embeds,
    )
    return unet.to(torch.float64).eval()


@pytest.fixture(scope="module")
def unet():
    return tiny_unet()


def x_T(seed: int = 1) -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _use_float64_tables(scheduler, diffusion: GaussianDiffusion):
    # diffusers' step reads betas / alphas / alphas_cumprod; float64 copies make it compute in float64
    scheduler.betas = diffusion.betas.clone()
    scheduler.alphas = diffusion.alphas.clone()
    scheduler.alphas_cumprod = diffusion.alphas_cumprod.clone()
    return scheduler


@torch.no_grad()
def diffusers_loop(unet, scheduler, x, *, steps=None, generator=None, **step_kwargs):
    """diffusers' sampling loop, as its pipelines write it; returns (x0, the timesteps visited)."""
    if steps is not None:
        scheduler.set_timesteps(steps)
    visited = []
    for t in scheduler.timesteps:
        out = unet(x, t).sample
        x = scheduler.step(out, t, x, generator=generator, **step_kwargs).prev_sample
        visited.append(int(t))
    return x, visited


# --- (a) DDIM ----------------------------------------------------------------------------------


@pytest.mark.parametrize("spacing,offset,steps", [("leading", 0, 10), ("trailing", 0, 10), ("trailing", 0, 4),
                                                  ("leading", 1, 10)])
def test_ddim_matches_diffusers(unet, spacing, offset, steps):
    # diffusers' DDIMScheduler.step jumps from t to t - T // N, which is the previous timestep of its
    # grid for "leading" spacing always, and for "trailing" only when N divides T (here 10 and 4 of
    # 100); "linspace" would step off its own grid, so it is not compared (see ddpm_lib.interop).
    sched = diffusers.DDIMScheduler(**LINEAR, clip_sample=False, set_alpha_to_one=True, timestep_spacing=spacing,
                                    steps_offset=offset)
    diffusion = interop.diffusion_from_scheduler(sched)
    _use_float64_tables(sched, diffusion)
    start = x_T()
    ref, visited = diffusers_loop(unet, sched, start.clone(), steps=steps, eta=0.0)

    opts = interop.sampler_options_from_scheduler(sched, steps=steps, sampler="ddim")
    grid = opts.get("timesteps") or sampling_timesteps(T, steps, spacing=spacing)
    assert visited == grid[::-1], "diffusers visits another grid than ddpm_lib's"
    if offset == 0:
        assert opts == {"prediction": "eps", "spacing": spacing, "steps": steps, "clip_denoised": False}
    out = ddim_sample(interop.DiffusersUNet(unet, scheduler=sched), diffusion, SHAPE, x_T=start, eta=0.0, **opts)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("prediction", ["x0", "v"])
def test_ddim_matches_diffusers_other_predictions(unet, prediction):
    name = interop.PREDICTION_TO_DIFFUSERS[prediction]
    sched = diffusers.DDIMScheduler(**LINEAR, clip_sample=False, timestep_spacing="trailing", prediction_type=name)
    diffusion = interop.diffusion_from_scheduler(sched)
    _use_float64_tables(sched, diffusion)
    start = x_T(2)
    ref, _ = diffusers_loop(unet, sched, start.clone(), steps=5, eta=0.0)
    model = interop.DiffusersUNet(unet, scheduler=sched)
    assert model.prediction == prediction
    out = ddim_sample(model, diffusion, SHAPE, steps=5, spacing="trailing", x_T=start)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    # the prediction matters: read as eps, the same network gives other images
    assert not torch.allclose(ddim_sample(model, diffusion, SHAPE, steps=5, x_T=start, prediction="eps"), ref,
                              atol=1e-3)


def test_ddim_with_clipping_matches_diffusers(unet):
    # clip_sample clamps x0_hat; diffusers keeps the unclipped eps unless use_clipped_model_output,
    # ddpm_lib re-derives eps from the clipped x0 (pitfall 3): the two agree only with that flag on
    sched = diffusers.DDIMScheduler(**LINEAR, clip_sample=True, timestep_spacing="trailing")
    diffusion = interop.diffusion_from_scheduler(sched)
    _use_float64_tables(sched, diffusion)
    start = 3 * x_T(3)
    ref, _ = diffusers_loop(unet, sched, start.clone(), steps=5, eta=0.0, use_clipped_model_output=True)
    opts = interop.sampler_options_from_scheduler(sched, steps=5, sampler="ddim")
    assert opts["clip_denoised"] is True
    out = ddim_sample(interop.DiffusersUNet(unet), diffusion, SHAPE, x_T=start, **opts)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)


# --- (b) DDPM ----------------------------------------------------------------------------------


@pytest.mark.parametrize("variance,steps", [("fixed_small", None), ("fixed_large", None), ("fixed_small", 10)])
def test_ddpm_matches_diffusers_with_the_same_noise(unet, variance, steps):
    # Both draw each step's noise with torch.randn(x.shape, generator, dtype=float64) AFTER the
    # model call, once per step except the last (t = 0), from t = T - 1 down: the same numbers in
    # the same order from one seed. With steps=10 both respace the chain to the trailing grid
    # (diffusers' DDPMScheduler steps to the next visited timestep, beta = 1 - abar_t / abar_prev).
    sched = diffusers.DDPMScheduler(**LINEAR, clip_sample=False, variance_type=variance, timestep_spacing="trailing")
    diffusion = interop.diffusion_from_scheduler(sched)
    _use_float64_tables(sched, diffusion)
    start = x_T(4)
    ref, visited = diffusers_loop(unet, sched, start.clone(), steps=steps, generator=torch.Generator().manual_seed(7))
    assert visited == sampling_timesteps(T, steps, spacing="trailing")[::-1]

    opts = interop.sampler_options_from_scheduler(sched, steps=steps, sampler="ddpm")
    assert opts["variance"] == variance
    model = interop.DiffusersUNet(unet, scheduler=sched)
    out = ddpm_sample(model, diffusion, SHAPE, x_T=start, generator=torch.Generator().manual_seed(7), **opts)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    # the noise matters: another seed gives other images
    other = ddpm_sample(model, diffusion, SHAPE, x_T=start, generator=torch.Generator().manual_seed(8), **opts)
    assert (other - ref).abs().max() > 1e-2


def test_ddpm_learned_range_v_prediction_matches_diffusers():
    # a 2C-channel network: v prediction first, the variance interpolation v_var in [-1, 1] last
    # (Nichol & Dhariwal 2021, Eq. (15)); diffusers splits it the same way for learned_range
    net = tiny_unet(out_channels=2, seed=1)
    sched = diffusers.DDPMScheduler(**LINEAR, clip_sample=False, variance_type="learned_range",
                                    prediction_type="v_prediction", timestep_spacing="leading")
    diffusion = interop.diffusion_from_scheduler(sched)
    _use_float64_tables(sched, diffusion)
    start = x_T(5)
    ref, _ = diffusers_loop(net, sched, start.clone(), steps=20, generator=torch.Generator().manual_seed(3))
    model = interop.DiffusersUNet(net, scheduler=sched)
    assert (model.prediction, model.variance) == ("v", "learned_range")
    out = ddpm_sample(model, diffusion, SHAPE, x_T=start, generator=torch.Generator().manual_seed(3),
                      **interop.sampler_options_from_scheduler(sched, steps=20))
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)


# --- (c) the chain and the config ----------------------------------------------------------------


@pytest.mark.parametrize("schedule", ["linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid"])
@pytest.mark.parametrize("zero_snr", [False, True])
def test_chain_matches_diffusers_tables(schedule, zero_snr):
    sched = diffusers.DDPMScheduler(num_train_timesteps=T, beta_schedule=schedule, rescale_betas_zero_snr=zero_snr,
                                    beta_start=0.00085, beta_end=0.012)
    diffusion = interop.diffusion_from_scheduler(sched)
    assert diffusion.betas.dtype == torch.float64 and diffusion.T == T
    # diffusers rounds to float32: alpha_bar agrees to float32 rounding accumulated over T products
    torch.testing.assert_close(diffusion.alphas_cumprod, sched.alphas_cumprod.double(), rtol=1e-5, atol=1e-6)
    if not zero_snr:  # the zero-SNR rescale of float32 betas loses digits at the small first betas
        torch.testing.assert_close(diffusion.betas, sched.betas.double(), rtol=1e-6, atol=0.0)
    # the config dict (no scheduler object) gives the same chain
    assert torch.equal(interop.diffusion_from_scheduler(dict(sched.config)).betas, diffusion.betas)


def test_named_schedules_equal_ddpm_lib_ones():
    cos = interop.diffusers_betas({"num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2"})
    torch.testing.assert_close(cos, cosine_betas(1000), rtol=1e-12, atol=1e-15)
    assert torch.equal(interop.diffusers_betas({"num_train_timesteps": 1000}), linear_betas(1000))
    scaled = interop.diffusers_betas({"num_train_timesteps": 50, "beta_schedule": "scaled_linear",
                                      "beta_start": 0.00085, "beta_end": 0.012})
    expected = torch.linspace(0.00085**0.5, 0.012**0.5, 50, dtype=torch.float64) ** 2
    torch.testing.assert_close(scaled, expected, rtol=1e-14, atol=0.0)
    assert scaled[0].item() == pytest.approx(0.00085, rel=1e-14) and scaled[-1].item() == pytest.approx(0.012)


@pytest.mark.parametrize("name", ["linear", "cosine", "trained", "zero_snr_cosine", "zero_snr_linear"])
def test_config_round_trip(name):
    betas = {
        "linear": lambda: linear_betas(T, 1e-3, 0.2),
        "cosine": lambda: cosine_betas(T),
        "trained": lambda: torch.linspace(1e-3, 0.1, T, dtype=torch.float64) ** 1.5,
        "zero_snr_cosine": lambda: rescale_zero_terminal_snr(cosine_betas(T)),
        "zero_snr_linear": lambda: rescale_zero_terminal_snr(linear_betas(T, 1e-3, 0.2)),
    }[name]()
    diffusion = GaussianDiffusion(betas)
    cfg = interop.scheduler_config_from_diffusion(diffusion, prediction="v", spacing="leading")
    expected_schedule = {"linear": "linear", "cosine": "squaredcos_cap_v2", "zero_snr_cosine": "squaredcos_cap_v2"}
    if name in expected_schedule:
        assert cfg["beta_schedule"] == expected_schedule[name] and cfg["trained_betas"] is None
    else:
        assert len(cfg["trained_betas"]) == T
    if name == "linear":
        assert (cfg["beta_start"], cfg["beta_end"]) == (1e-3, 0.2)
    assert cfg["rescale_betas_zero_snr"] is (name == "zero_snr_cosine")
    assert (cfg["prediction_type"], cfg["timestep_spacing"]) == ("v_prediction", "leading")
    # ddpm_lib -> config -> ddpm_lib: the same float64 chain
    back = interop.diffusion_from_scheduler(cfg)
    torch.testing.assert_close(back.betas, diffusion.betas, rtol=1e-12, atol=0.0)
    # ... and diffusers builds it too (to its float32 storage), with the sampler settings
    sched = diffusers.DDIMScheduler.from_config(cfg)
    torch.testing.assert_close(sched.alphas_cumprod.double(), diffusion.alphas_cumprod, rtol=1e-5, atol=1e-6)
    opts = interop.sampler_options_from_scheduler(sched)
    assert opts == {"prediction": "v", "spacing": "leading", "clip_denoised": False}
    assert interop.scheduler_from_diffusion(diffusion).config["num_train_timesteps"] == T


def test_config_round_trip_ddpm_scheduler_variance():
    diffusion = GaussianDiffusion(cosine_betas(T))
    cfg = interop.scheduler_config_from_diffusion(diffusion, variance="fixed_large", scheduler="DDPMScheduler")
    sched = diffusers.DDPMScheduler.from_config(cfg)
    assert sched.config.variance_type == "fixed_large"
    assert interop.sampler_options_from_scheduler(sched)["variance"] == "fixed_large"
    with pytest.raises(ValueError, match="DDIMScheduler has no variance_type"):
        interop.scheduler_config_from_diffusion(diffusion, variance="fixed_large")


def test_config_refusals():
    diffusion = GaussianDiffusion(cosine_betas(T))
    with pytest.raises(ValueError, match="respaced"):
        interop.scheduler_config_from_diffusion(diffusion.respace([0, 50, 99]))
    with pytest.raises(ValueError, match="not diffusers' 'linear'"):
        interop.scheduler_config_from_diffusion(diffusion, schedule="linear")
    assert interop.scheduler_config_from_diffusion(diffusion, schedule="trained_betas")["trained_betas"] is not None
    with pytest.raises(ValueError, match="unsupported beta_schedule 'laplace'"):
        interop.diffusion_from_scheduler({"beta_schedule": "laplace"})
    with pytest.raises(ValueError, match="trained_betas has 3 values"):
        interop.diffusion_from_scheduler({"num_train_timesteps": 4, "trained_betas": [0.1, 0.2, 0.3]})
    with pytest.raises(TypeError, match="scheduler or its config"):
        interop.diffusion_from_scheduler(42)


def test_sampler_options_refuse_what_ddpm_lib_cannot_do():
    base = {"num_train_timesteps": T, "clip_sample": False}
    with pytest.raises(ValueError) as err:
        interop.sampler_options_from_scheduler({**base, "thresholding": True, "clip_sample": True,
                                                "clip_sample_range": 2.0, "set_alpha_to_one": False})
    # one error naming all three
    assert all(s in str(err.value) for s in ("thresholding", "clip_sample_range 2.0", "set_alpha_to_one=False"))
    with pytest.warns(UserWarning, match="thresholding"):
        opts = interop.sampler_options_from_scheduler({**base, "thresholding": True}, strict=False)
    assert opts["clip_denoised"] is False
    for bad in ({"prediction_type": "flow"}, {"timestep_spacing": "karras"}, {"variance_type": "learned"},
                {"variance_type": "fixed_large_log"}):
        with pytest.raises(ValueError, match="cannot reproduce"):
            interop.sampler_options_from_scheduler({**base, **bad}, strict=False)
    with pytest.raises(ValueError, match="pass steps="):
        interop.sampler_options_from_scheduler({**base, "steps_offset": 1})
    # steps_offset moves only the leading grid, as in diffusers' set_timesteps
    assert interop.sampler_options_from_scheduler({**base, "steps_offset": 1, "timestep_spacing": "trailing"},
                                                  steps=5)["spacing"] == "trailing"
    assert interop.sampler_options_from_scheduler({**base, "variance_type": "fixed_small_log"})["variance"] == \
        "fixed_small"
    assert "variance" not in interop.sampler_options_from_scheduler({**base, "variance_type": "fixed_large"},
                                                                    sampler="ddim")
    assert interop.sampler_options_from_scheduler(base, sampler="ddpm")["variance"] == "fixed_small"
    # diffusers' defaults: leading spacing and clip_sample on
    assert interop.sampler_options_from_scheduler({}) == {"prediction": "eps", "spacing": "leading",
                                                          "clip_denoised": True}


# --- the wrapper ----------------------------------------------------------------------------------


def test_wrapper_calls_the_unet_and_carries_its_parameterisation():
    net = tiny_unet(num_class_embeds=11)
    x, t, y = x_T(6), torch.tensor([3, 97]), torch.tensor([2, 10])
    model = interop.DiffusersUNet(net, prediction="x0", null_label=10)
    assert (model.prediction, model.variance) == ("x0", "fixed_small")
    assert (model.num_classes, model.null_label, model.in_channels, model.image_size) == (10, 10, 1, 8)
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, y), net(x, t, class_labels=y).sample, rtol=0, atol=0)
        # the labels reach the network
        assert not torch.allclose(model(x, t, y), model(x, t, torch.tensor([3, 10])))
    assert interop.DiffusersUNet(net).num_classes == 11 and interop.DiffusersUNet(net).null_label is None
    with pytest.raises(ValueError, match="null_label 11"):
        interop.DiffusersUNet(net, null_label=11)
    with pytest.raises(ValueError, match="learned_range needs out_channels"):
        interop.DiffusersUNet(tiny_unet(), variance="learned_range")
    with pytest.raises(ValueError, match="unknown prediction"):
        interop.DiffusersUNet(tiny_unet(), prediction="epsilon")


def test_wrapper_from_pretrained_reads_the_pipeline_scheduler(tmp_path, unet):
    unet.save_pretrained(tmp_path / "unet")
    sched = diffusers.DDPMScheduler(**LINEAR, prediction_type="v_prediction", variance_type="fixed_large")
    sched.save_pretrained(tmp_path / "scheduler")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # diffusers' own deprecation notes, if any
        model = interop.DiffusersUNet.from_pretrained(str(tmp_path), subfolder="unet", torch_dtype=torch.float64)
    assert (model.prediction, model.variance) == ("v", "fixed_large")
    x, t = x_T(7), torch.tensor([0, 50])
    with torch.no_grad():
        torch.testing.assert_close(model(x, t), unet(x, t).sample, rtol=1e-12, atol=1e-12)
