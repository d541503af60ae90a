"""Guidance wrappers against exact identities of the Gaussian-mixture oracle: Bayes on scores
(classifier guidance with the exact noisy classifier is the exact conditional model), the
classifier-free combination, and loss guidance against an independent autograd of Tweedie's
posterior mean."""

from __future__ import annotations

import pytest
import torch

from ddpm_lib.guidance import classifier_free, classifier_guidance, loss_guidance
from ddpm_lib.models import MLPConfig, MLPDenoiser
from ddpm_lib.samplers import ddim_sample, ddpm_sample, dpm_solver_pp_sample

pytestmark = pytest.mark.usefixtures("single_thread")

NULL = 3  # the reserved "no label" class of the 3-component mixture (pitfall 8)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def noisy_points(mixture, diffusion, t, seed=0):
    """x_t ~ q(x_t) at the given original timesteps (one per row), float64."""
    x0 = mixture.sample(len(t), generator=gen(seed))
    return diffusion.q_sample(x0, t, torch.randn(x0.shape, generator=gen(seed + 1), dtype=torch.float64))


def conditional_model(mixture, diffusion, calls=None):
    """A class-conditional eps-model with a null label, as a CFG-trained network would be: label
    NULL gives the unconditional mixture eps, label k the eps of component k."""
    exact = mixture.eps_model(diffusion)

    def model(x, t, y):
        if calls is not None:
            calls.append(x.shape[0])
        uncond = exact(x, t)
        cond = exact(x, t, y=y.clamp(max=NULL - 1))
        return torch.where((y == NULL)[:, None], uncond, cond)

    return model


TIMESTEPS = torch.tensor([0, 1, 5, 20, 50, 100, 200, 350, 500, 650, 800, 999] * 2)


def test_bayes_on_scores_classifier_guidance_is_exact_conditional(mixture, diffusion):
    """eps(x_t) - sqrt(1 - abar) grad log p(y | x_t) = eps(x_t | y) exactly (Dhariwal & Nichol
    2021, eq. 14 with s = 1), for every label at every noise level, to float64 precision."""
    x = noisy_points(mixture, diffusion, TIMESTEPS)
    guided = classifier_guidance(mixture.eps_model(diffusion), mixture.classifier(diffusion), diffusion, 1.0)
    worst = 0.0
    for k in range(3):
        y = torch.full((len(x),), k)
        with torch.no_grad():  # the gradient is taken even under no_grad, as inside the samplers
            eps = guided(x, TIMESTEPS, y=y)
        exact = mixture.eps_model(diffusion)(x, TIMESTEPS, y=y)
        worst = max(worst, (eps - exact).abs().max().item())
    assert worst < 1e-10, worst


def test_classifier_guidance_scale_zero_and_formula(mixture, diffusion):
    x = noisy_points(mixture, diffusion, TIMESTEPS, seed=2)
    y = torch.arange(len(x)) % 3
    model, clf = mixture.eps_model(diffusion), mixture.classifier(diffusion)
    assert torch.equal(classifier_guidance(model, clf, diffusion, 0.0)(x, TIMESTEPS, y=y), model(x, TIMESTEPS))
    # scale s: eps + s (eps_y - eps), since sqrt(1 - abar) grad log p(y|x) = eps - eps_y (Bayes)
    s = 3.0
    expected = model(x, TIMESTEPS) + s * (model(x, TIMESTEPS, y=y) - model(x, TIMESTEPS))
    assert torch.allclose(classifier_guidance(model, clf, diffusion, s)(x, TIMESTEPS, y=y), expected, atol=1e-9)


def test_classifier_free_w0_is_conditional_and_w_formula(mixture, diffusion):
    x = noisy_points(mixture, diffusion, TIMESTEPS, seed=4)
    y = torch.arange(len(x)) % 3
    exact = mixture.eps_model(diffusion)
    calls = []
    cfg0 = classifier_free(conditional_model(mixture, diffusion, calls), 0.0, NULL)
    out = cfg0(x, TIMESTEPS, y=y)
    assert calls == [2 * len(x)]  # one forward pass on the concatenated batch
    assert torch.allclose(out, exact(x, TIMESTEPS, y=y), rtol=0, atol=1e-15)
    for w in (0.5, 3.0):
        cfg = classifier_free(conditional_model(mixture, diffusion), w, NULL)
        expected = (1 + w) * exact(x, TIMESTEPS, y=y) - w * exact(x, TIMESTEPS)
        assert torch.allclose(cfg(x, TIMESTEPS, y=y), expected, rtol=0, atol=1e-12)
    # an int label broadcasts over the batch
    assert torch.allclose(cfg0(x, TIMESTEPS, y=1), exact(x, TIMESTEPS, y=torch.ones(len(x), dtype=torch.long)), atol=1e-15)


def small_mlp(num_classes):
    """A ddpm_lib MLP with a random (not zero-initialised) output layer, float64."""
    torch.manual_seed(0)
    model = MLPDenoiser(MLPConfig(hidden_dim=16, num_layers=1, time_embed_dim=16, num_classes=num_classes))
    torch.nn.init.normal_(model.output.weight)
    return model.double().eval()


def test_classifier_free_defaults_to_the_models_null_label(mixture, diffusion):
    """``classifier_free(model, w)`` reads the model's reserved null label (ddpm_lib models:
    ``num_classes``); it is one clear error when the model has none."""
    x = noisy_points(mixture, diffusion, TIMESTEPS, seed=5)
    y = torch.arange(len(x)) % 3
    model = conditional_model(mixture, diffusion)
    model.null_label = NULL
    assert torch.equal(classifier_free(model, 2.0)(x, TIMESTEPS, y=y), classifier_free(model, 2.0, NULL)(x, TIMESTEPS, y=y))
    mlp = small_mlp(3)
    with torch.no_grad():
        default, explicit = (classifier_free(mlp, 2.0, *n)(x, TIMESTEPS, y=y) for n in ((), (3,)))
        other = classifier_free(mlp, 2.0, 0)(x, TIMESTEPS, y=y)
    assert mlp.null_label == 3 and torch.equal(default, explicit) and not torch.allclose(default, other)
    for no_null in (conditional_model(mixture, diffusion), small_mlp(None)):  # a plain function, an unconditional model
        with pytest.raises(ValueError, match="cannot determine the null label.*pass null_label="):
            classifier_free(no_null, 1.0)
    with pytest.raises(ValueError, match="null_label must be a non-negative integer"):
        classifier_free(model, 1.0, -1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_classifier_free_samples_on_cuda(mixture, diffusion):
    """On CUDA, a guidance wrapper (a plain function) sampled WITHOUT x_T and with a CPU generator:
    x_T is drawn on the CPU and moved to the diffusion's device, and the samples are right."""
    cuda = diffusion.to("cuda")
    y = torch.tensor([0, 1, 2], device="cuda").repeat(100)
    cfg = classifier_free(conditional_model(mixture, cuda), 0.0, NULL)
    for sample in (ddim_sample(cfg, cuda, (300, 2), steps=50, y=y, generator=gen(12)),
                   dpm_solver_pp_sample(cfg, cuda, (300, 2), steps=20, y=y, generator=gen(13))):
        assert sample.device.type == "cuda"
        labels = mixture.component_log_prob(sample.cpu()).argmax(1)
        assert (labels == y.cpu()).double().mean() > 0.99
    mlp = small_mlp(3).float().cuda()  # a ddpm_lib model: the null label comes from the model
    with torch.no_grad():
        out = ddpm_sample(classifier_free(mlp, 1.0), cuda, (8, 2), steps=10, y=y[:8], generator=gen(14))
    assert out.device.type == "cuda" and torch.isfinite(out).all()


def test_learned_variance_channels_are_kept(mixture, diffusion):
    x = noisy_points(mixture, diffusion, TIMESTEPS, seed=6)
    y = torch.arange(len(x)) % 3
    base = conditional_model(mixture, diffusion)

    def learned(x, t, y=None):  # eps channels, then variance channels that depend on the label
        eps = base(x, t, y if y is not None else torch.full((len(x),), NULL))
        v = torch.zeros_like(x) if y is None else y[:, None].to(x.dtype).expand_as(x)
        return torch.cat([eps, v], 1)

    out = classifier_free(learned, 2.0, NULL)(x, TIMESTEPS, y=y)
    assert out.shape == (len(x), 4)
    assert torch.equal(out[:, 2:], y[:, None].double().expand(-1, 2))  # the conditional half's variance
    guided = classifier_guidance(learned, mixture.classifier(diffusion), diffusion, 1.0)(x, TIMESTEPS, y=y)
    assert guided.shape == (len(x), 4) and torch.equal(guided[:, 2:], torch.zeros(len(x), 2, dtype=x.dtype))


def test_loss_guidance_formula_and_sign(mixture, diffusion):
    """eps + sqrt(1 - abar) s grad_x L(E[x0 | x_t]), with E[x0 | x_t] from the oracle's Tweedie
    posterior mean differentiated independently; and guided samples have lower loss."""
    x = noisy_points(mixture, diffusion, TIMESTEPS, seed=8)
    target = torch.tensor([0.9, -0.5], dtype=torch.float64)

    def loss_fn(x0):
        return ((x0 - target) ** 2).sum(1)

    model, s = mixture.eps_model(diffusion), 0.7
    with torch.no_grad():
        guided = loss_guidance(model, diffusion, loss_fn, s)(x, TIMESTEPS)
    xr = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(loss_fn(mixture.posterior_mean(xr, TIMESTEPS, diffusion)).sum(), xr)
    sqrt_one_minus = (1 - diffusion.alphas_cumprod[TIMESTEPS]).sqrt()[:, None]
    assert torch.allclose(guided, model(x, TIMESTEPS) + sqrt_one_minus * s * grad, atol=1e-9)

    x_T = torch.randn(2000, 2, generator=gen(10), dtype=torch.float64)
    plain = ddim_sample(model, diffusion, (2000, 2), steps=50, x_T=x_T)
    steered = ddim_sample(loss_guidance(model, diffusion, loss_fn, 0.5), diffusion, (2000, 2), steps=50, x_T=x_T)
    assert loss_fn(steered).mean() < 0.7 * loss_fn(plain).mean()


def test_guided_samplers_draw_the_requested_component(mixture, diffusion):
    """Every sampler works with every guidance: exact classifier guidance (s = 1) and
    classifier-free guidance (w = 0) in DPM-Solver++ / DDIM put ~all samples in component y."""
    y = torch.tensor([0, 1, 2]).repeat(300)
    clf = classifier_guidance(mixture.eps_model(diffusion), mixture.classifier(diffusion), diffusion, 1.0)
    cfg = classifier_free(conditional_model(mixture, diffusion), 0.0, NULL)
    for sample in (
        dpm_solver_pp_sample(clf, diffusion, (900, 2), steps=20, y=y, generator=gen(11)),
        ddim_sample(cfg, diffusion, (900, 2), steps=50, y=y, generator=gen(12)),
    ):
        assert sample.dtype == torch.get_default_dtype()
        labels = mixture.component_log_prob(sample).argmax(1)
        assert (labels == y).double().mean() > 0.995


def test_missing_labels_raise(mixture, diffusion):
    x = noisy_points(mixture, diffusion, TIMESTEPS)
    with pytest.raises(ValueError, match="labels"):
        classifier_free(conditional_model(mixture, diffusion), 1.0, NULL)(x, TIMESTEPS)
    with pytest.raises(ValueError, match="labels"):
        classifier_guidance(mixture.eps_model(diffusion), mixture.classifier(diffusion), diffusion, 1.0)(x, TIMESTEPS)


def test_guidance_scale_and_w_conventions_agree(mixture, diffusion):
    from ddpm_lib.guidance import scale_from_w, w_from_scale

    assert scale_from_w(0.0) == 1.0 and w_from_scale(7.5) == 6.5
    for w in (-1.0, 0.0, 0.5, 3.0):
        assert w_from_scale(scale_from_w(w)) == w
    # the diffusers-style combination with s = scale_from_w(w) is classifier_free with w
    model = conditional_model(mixture, diffusion)
    t = TIMESTEPS[:6]
    x, y = noisy_points(mixture, diffusion, t), torch.arange(6) % 2
    w = 2.0
    s = scale_from_w(w)
    uncond = model(x, t, torch.full_like(y, NULL))
    ref = uncond + s * (model(x, t, y) - uncond)
    torch.testing.assert_close(classifier_free(model, w, null_label=NULL)(x, t, y), ref, rtol=1e-6, atol=1e-6)
