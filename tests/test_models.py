"""ddpm_lib.models: time embedding, U-Net presets, configs, MLP, classifiers."""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ddpm_lib.models import (
    PRESETS, FeatureClassifier, FeatureClassifierConfig, MLPConfig, MLPDenoiser, NoisyClassifier,
    NoisyClassifierConfig, UNet, UNetConfig, build_model, count_parameters, ddpm_cifar10, digits8,
    digits8_cond, model_from_config, timestep_embedding,
)
from ddpm_lib.models.blocks import AttentionBlock, ResBlock, group_count

# Measured with `count_parameters(UNet(ddpm_cifar10()))`, torch 2.13; the same count as the
# PyTorch ports of the official TF DDPM code. The paper (Ho et al. 2020, App. B) says 35.7M.
DDPM_CIFAR10_PARAMS = 35_746_307


def randomise(model: torch.nn.Module, seed: int = 0, std: float = 0.1) -> torch.nn.Module:
    """Overwrite every parameter with N(0, std^2): zero-initialised layers would hide inputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def inputs(cfg: UNetConfig, batch: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg.in_channels, cfg.image_size, cfg.image_size, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    y = torch.randint(0, cfg.num_classes, (batch,), generator=g) if cfg.num_classes else None
    return x, t, y


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These tensors are tiny: a second intra-op thread only adds synchronisation, and on a busy
    2-core runner its spinning made one test 30x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def cifar_unet():
    torch.manual_seed(0)
    return UNet(ddpm_cifar10()).eval()


# -- time embedding ------------------------------------------------------------------------------

def test_timestep_embedding_at_zero_and_formula():
    emb = timestep_embedding(torch.tensor([0, 1, 500]), 128)
    assert emb.shape == (3, 128) and emb.dtype == torch.float32
    assert torch.equal(emb[0, :64], torch.zeros(64)) and torch.equal(emb[0, 64:], torch.ones(64))
    k = torch.arange(64, dtype=torch.float64)
    omega = 10000.0 ** (-k / 64)  # Vaswani et al. sec. 3.5: periods from 2 pi to 10000 * 2 pi
    want = torch.cat([torch.sin(500 * omega), torch.cos(500 * omega)]).float()
    torch.testing.assert_close(emb[2], want, atol=2e-4, rtol=0)
    assert torch.equal(timestep_embedding(torch.tensor([3]), 7)[0, -1], torch.tensor(0.0))  # odd dim: zero pad


def test_timestep_embedding_distinct_for_distinct_t():
    emb = timestep_embedding(torch.arange(1000), 64)
    d = torch.cdist(emb, emb) + torch.eye(1000) * 1e9
    assert d.min() > 0.05  # adjacent timesteps stay apart (the fast channels)


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 100_000), st.sampled_from([16, 32, 128]))
def test_timestep_embedding_norm(t, dim):
    # each (sin, cos) pair has unit norm, so |emb| = sqrt(dim / 2) for every t
    emb = timestep_embedding(torch.tensor([t]), dim)
    assert abs(emb.norm().item() - math.sqrt(dim / 2)) < 1e-3


# -- U-Net presets ------------------------------------------------------------------------------

def test_ddpm_cifar10_parameter_count(cifar_unet):
    n = count_parameters(cifar_unet)
    assert abs(n - 35.7e6) <= 0.1e6, n  # DDPM paper, App. B
    assert n == DDPM_CIFAR10_PARAMS


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_shapes_and_zero_output_at_init(name, cifar_unet):
    cfg = PRESETS[name]()
    model = cifar_unet if name == "ddpm_cifar10" else UNet(cfg).eval()
    x, t, y = inputs(cfg, batch=1 if cfg.image_size > 16 else 2)
    with torch.no_grad():
        out = model(x, t, y=y)
    channels = cfg.in_channels * (2 if cfg.learn_sigma else 1)
    assert out.shape == (x.shape[0], channels, cfg.image_size, cfg.image_size)
    assert torch.equal(out, torch.zeros_like(out))  # zero-initialised output conv (ADM)
    assert model_from_config(json.loads(json.dumps(cfg.to_dict()))).config == cfg


def test_every_residual_branch_starts_zero():
    model = UNet(digits8())
    res = [m for m in model.modules() if isinstance(m, ResBlock)]
    attn = [m for m in model.modules() if isinstance(m, AttentionBlock)]
    # 2 per level down, 2 in the middle, 3 per level up; attention at 4x4 (2 down, 3 up) and in the middle
    assert len(res) == 2 * 2 + 2 + 3 * 2 and len(attn) == 2 + 1 + 3
    for block in res:
        assert torch.count_nonzero(block.out_layers[-1].weight) == 0
        assert isinstance(block.emb_proj[-1], torch.nn.Linear)  # time enters every block
    for block in attn:
        assert torch.count_nonzero(block.proj_out.weight) == 0


def test_rescale_skip_divides_residual_sum_by_sqrt2():
    x, emb = torch.randn(2, 8, 4, 4), torch.randn(2, 16)
    plain = ResBlock(8, 16)(x, emb)
    scaled = ResBlock(8, 16, rescale_skip=True)(x, emb)
    torch.testing.assert_close(plain, x)  # zero-initialised branch: identity at init
    torch.testing.assert_close(scaled, x / math.sqrt(2))


def test_attention_matches_explicit_softmax():
    torch.manual_seed(0)
    block = randomise(AttentionBlock(16, num_heads=4), seed=1)
    x = torch.randn(2, 16, 3, 3)
    B, C, L, heads = 2, 16, 9, 4
    q, k, v = block.qkv(block.norm(x).reshape(B, C, L)).chunk(3, dim=1)
    outs = []
    for h in range(heads):  # head h uses channels h*4 .. h*4+3 of q, k and v
        sl = slice(4 * h, 4 * h + 4)
        w = torch.softmax(q[:, sl].transpose(1, 2) @ k[:, sl] / 2.0, dim=-1)  # [B, L, L], sqrt(4) = 2
        outs.append(v[:, sl] @ w.transpose(1, 2))
    want = x + block.proj_out(torch.cat(outs, dim=1)).reshape(B, C, 3, 3)
    torch.testing.assert_close(block(x), want, atol=1e-5, rtol=1e-5)


def test_small_widths_get_fewer_groups():
    # 32 groups where the width allows >= 4 channels per group (DDPM), fewer below, 1 for tiny widths
    assert [group_count(c) for c in (256, 128, 96, 64, 48, 16, 8, 3)] == [32, 32, 24, 16, 12, 4, 2, 1]
    cfg = UNetConfig(in_channels=1, image_size=8, model_channels=8, channel_mult=(1, 3), attention_resolutions=(4,),
                     num_res_blocks=1)
    out = UNet(cfg)(torch.randn(2, 1, 8, 8), torch.tensor([0, 1]))
    assert out.shape == (2, 1, 8, 8)


@pytest.mark.parametrize("overrides", [
    dict(resblock_updown=True, use_scale_shift_norm=True, rescale_skip=True),
    dict(conv_resample=False, num_head_channels=8, attention_resolutions=(8, 4)),
    dict(out_channels=3, learn_sigma=True, dropout=0.2),
])
def test_variants_shapes_and_use_time(overrides):
    cfg = digits8(model_channels=16, **overrides)
    model = randomise(UNet(cfg)).eval()
    x, _, _ = inputs(cfg)
    out0, out1 = model(x, torch.tensor([0, 0])), model(x, torch.tensor([999, 999]))
    assert out0.shape == (2, cfg.output_channels, 8, 8)
    assert (out0 - out1).abs().max() > 1e-3  # the timestep reaches the output


def test_conditional_model_uses_labels_and_null_label():
    cfg = digits8_cond(model_channels=16)
    model = randomise(UNet(cfg)).eval()
    assert model.null_label == 10 and model.label_embed.num_embeddings == 11
    x, t = torch.randn(1, 1, 8, 8).expand(3, -1, -1, -1), torch.tensor([10, 10, 10])
    out = model(x, t, y=torch.tensor([3, 7, 10]))  # 10 = null label: the unconditional prediction
    assert (out[0] - out[1]).abs().max() > 1e-3 and (out[0] - out[2]).abs().max() > 1e-3
    with pytest.raises(ValueError, match="pass y"):
        model(x, t)
    with pytest.raises(ValueError, match=r"\[0, 10\]"):
        model(x, t, y=torch.tensor([0, 1, 11]))
    with pytest.raises(ValueError, match="unconditional"):
        UNet(digits8(model_channels=16))(x, t, y=torch.tensor([0, 1, 2]))


def test_wrong_input_shapes_are_named():
    model = UNet(digits8(model_channels=16))
    with pytest.raises(ValueError, match=r"\[B, 1, 8, 8\]"):
        model(torch.randn(2, 3, 8, 8), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"\[B, 1, 8, 8\]"):
        model(torch.randn(2, 1, 16, 16), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="t of shape"):
        model(torch.randn(2, 1, 8, 8), torch.tensor([0, 1, 2]))
    assert model(torch.randn(2, 1, 8, 8), torch.tensor(5)).shape == (2, 1, 8, 8)  # scalar t broadcasts


# -- configs -------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad, field", [
    (dict(channel_mult=()), "channel_mult"),
    (dict(attention_resolutions=(16,)), "attention_resolutions"),  # 8x8 net reaches 8 and 4 only
    (dict(image_size=7), "image_size"),  # 8x8 -> 4x4 needs an even size
    (dict(num_heads=3), "num_heads"),
    (dict(num_head_channels=5), "num_head_channels"),
    (dict(dropout=1.5), "dropout"),
    (dict(model_channels="32"), "model_channels"),
    (dict(num_classes=0), "num_classes"),
])
def test_bad_unet_configs_name_the_field(bad, field):
    with pytest.raises(ValueError, match=field):
        digits8(**bad)


def test_unknown_keys_and_kinds_are_refused():
    d = digits8().to_dict()
    with pytest.raises(ValueError, match="unknown key.*'chanel_mult'"):
        UNetConfig.from_dict({**d, "chanel_mult": [1, 2]})
    with pytest.raises(ValueError, match="kind"):
        MLPConfig.from_dict(d)
    with pytest.raises(ValueError, match="unknown model kind"):
        build_model("transformer", {})
    with pytest.raises(ValueError, match="'kind' field"):
        model_from_config({"hidden_dim": 64})


@pytest.mark.parametrize("config", [
    digits8_cond(model_channels=16, use_scale_shift_norm=True, resblock_updown=True),
    MLPConfig(hidden_dim=32, num_layers=2, num_classes=3, learn_sigma=True),
    NoisyClassifierConfig(model_channels=16),
    FeatureClassifierConfig(channels=(8, 16)),
], ids=lambda c: c.kind)
def test_json_round_trip_rebuilds_identical_model(config):
    model = randomise(model_from_config(config), seed=3).eval()
    text = json.dumps(model.config.to_dict())
    rebuilt = model_from_config(json.loads(text)).eval()
    assert rebuilt.config == config and type(rebuilt) is type(model)
    sd, sd2 = model.state_dict(), rebuilt.state_dict()
    assert {k: v.shape for k, v in sd.items()} == {k: v.shape for k, v in sd2.items()}
    rebuilt.load_state_dict(sd)
    g = torch.Generator().manual_seed(0)
    if config.kind == "mlp":
        args = (torch.randn(4, 2, generator=g), torch.tensor([0, 5, 50, 500]))
        kwargs = {"y": torch.tensor([0, 1, 2, 3])}
    else:
        x, t, y = inputs(config if config.kind != "feature_classifier" else digits8(), batch=4)
        args = (x,) if config.kind == "feature_classifier" else (x, t)
        kwargs = {"y": y} if getattr(config, "num_classes", None) and config.kind == "unet" else {}
    torch.testing.assert_close(model(*args, **kwargs), rebuilt(*args, **kwargs), rtol=0, atol=0)


# -- MLP and classifiers ------------------------------------------------------------------------

def test_mlp_shapes_labels_and_zero_init():
    model = MLPDenoiser(MLPConfig(num_classes=2))
    x, t = torch.randn(5, 2), torch.arange(5)
    assert torch.equal(model(x, t, y=torch.full((5,), 2)), torch.zeros(5, 2))
    randomise(model)
    assert (model(x, t, y=torch.zeros(5, dtype=torch.long)) - model(x, t, y=torch.ones(5, dtype=torch.long))).abs().max() > 1e-3
    with pytest.raises(ValueError, match=r"\[B, 2\]"):
        model(torch.randn(5, 3), t, y=torch.zeros(5, dtype=torch.long))
    assert MLPDenoiser(MLPConfig(learn_sigma=True))(x, t).shape == (5, 4)


def test_classifiers():
    noisy = randomise(NoisyClassifier(NoisyClassifierConfig(model_channels=16))).eval()
    x = torch.randn(3, 1, 8, 8)
    logits = noisy(x, torch.tensor([0, 0, 0]))
    assert logits.shape == (3, 10)
    assert (logits - noisy(x, torch.tensor([900, 900, 900]))).abs().max() > 1e-3  # sees the noise level
    feat = FeatureClassifier(FeatureClassifierConfig(in_channels=3, image_size=32, num_classes=15, feature_dim=64))
    assert feat.features(torch.randn(2, 3, 32, 32)).shape == (2, 64)
    assert feat(torch.randn(2, 3, 32, 32)).shape == (2, 15)
    with pytest.raises(ValueError, match=r"\[B, 3, 32, 32\]"):
        feat(torch.randn(2, 1, 32, 32))
    assert count_parameters(feat) == sum(p.numel() for p in feat.parameters())
    feat.head.requires_grad_(False)
    assert count_parameters(feat, trainable_only=True) == count_parameters(feat) - 64 * 15 - 15


# -- a little real optimisation -----------------------------------------------------------------

@pytest.mark.parametrize("kind", ["unet", "mlp"])
def test_training_steps_reduce_mse_on_fixed_batch(kind):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    if kind == "unet":
        model = UNet(digits8(model_channels=16))
        x0 = torch.rand(16, 1, 8, 8, generator=g) * 2 - 1
    else:
        model = MLPDenoiser(MLPConfig(hidden_dim=64, num_layers=2))
        x0 = torch.rand(64, 2, generator=g) * 2 - 1
    alpha_bar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000), 0)
    t = torch.randint(0, 1000, (x0.shape[0],), generator=g)
    eps = torch.randn(x0.shape, generator=g)
    ab = alpha_bar[t].view(-1, *[1] * (x0.ndim - 1))
    x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * eps  # q(x_t | x_0), DDPM eq. 4
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(20):
        loss = torch.nn.functional.mse_loss(model(x_t, t), eps)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0], losses[::5]


# -- how the time embedding enters a residual block ---------------------------------------------

def _block_with_embedding(scale_shift: bool, *, scale=None, shift=None, seed=0) -> ResBlock:
    """A ResBlock (8 -> 8 channels, 2 GroupNorm groups) with random weights (the same for both
    forms but the embedding projection), whose embedding projection outputs the constant
    vector(s) given: its weight is zeroed and its bias holds ``shift`` (additive) or
    ``(scale, shift)`` (AdaGN), whatever the embedding."""
    shared = randomise(ResBlock(8, 16, norm_groups=2), seed=seed).state_dict()
    block = ResBlock(8, 16, use_scale_shift_norm=scale_shift, norm_groups=2).eval()
    block.load_state_dict({k: v for k, v in shared.items() if not k.startswith("emb_proj")}, strict=False)
    proj = block.emb_proj[-1]
    with torch.no_grad():
        proj.weight.zero_()
        proj.bias.copy_(torch.cat([scale, shift]) if scale_shift else shift)
    return block


def _capture(module: torch.nn.Module, pre: bool = False) -> list:
    """Record a submodule's input (``pre``) or output on each call."""
    seen = []
    if pre:
        module.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
    else:
        module.register_forward_hook(lambda m, args, out: seen.append(out.detach().clone()))
    return seen


def test_adagn_scales_and_shifts_the_normalised_features():
    """ADM's AdaGN (Dhariwal & Nichol 2021, sec. 3): GN(h) * (1 + s) + b enters the output layers."""
    g = torch.Generator().manual_seed(1)
    s, b = torch.randn(8, generator=g), torch.randn(8, generator=g)
    block = _block_with_embedding(True, scale=s, shift=b)
    normed, fed = _capture(block.out_norm), _capture(block.out_layers, pre=True)
    block(torch.randn(2, 8, 4, 4, generator=g), torch.randn(2, 16, generator=g))
    torch.testing.assert_close(fed[0], normed[0] * (1 + s[:, None, None]) + b[:, None, None])


def test_additive_embedding_enters_before_the_norm():
    """DDPM's block: GN(h + e), so the embedding goes through the normalisation."""
    g = torch.Generator().manual_seed(2)
    e = torch.randn(8, generator=g)
    block = _block_with_embedding(False, shift=e)
    conv_out, norm_in = _capture(block.in_conv), _capture(block.out_norm, pre=True)
    block(torch.randn(2, 8, 4, 4, generator=g), torch.randn(2, 16, generator=g))
    torch.testing.assert_close(norm_in[0], conv_out[0] + e[:, None, None])


def test_adagn_and_additive_injection_differ():
    """The same shift b, same other weights: AdaGN with s = 0 is GN(h) + b, the DDPM block GN(h + b).
    GroupNorm removes each group's mean of b in the additive form, so a shift that is constant
    within each group changes nothing there, but shifts AdaGN's output; a scale s != 0 then
    changes AdaGN's output again."""
    g = torch.Generator().manual_seed(3)
    x, emb = torch.randn(2, 8, 4, 4, generator=g), torch.randn(2, 16, generator=g)
    per_group = torch.tensor([0.7] * 4 + [-1.3] * 4)  # norm_groups=2: channels 0-3 and 4-7
    zero, s = torch.zeros(8), torch.randn(8, generator=g)
    out = {
        "add, e = 0": _block_with_embedding(False, shift=zero)(x, emb),
        "add, e = b": _block_with_embedding(False, shift=per_group)(x, emb),
        "adagn, s = 0, b = 0": _block_with_embedding(True, scale=zero, shift=zero)(x, emb),
        "adagn, s = 0, b": _block_with_embedding(True, scale=zero, shift=per_group)(x, emb),
        "adagn, s, b": _block_with_embedding(True, scale=s, shift=per_group)(x, emb),
    }
    torch.testing.assert_close(out["add, e = 0"], out["adagn, s = 0, b = 0"])  # no embedding: the forms agree
    torch.testing.assert_close(out["add, e = b"], out["add, e = 0"])  # GN(h + b) = GN(h): a per-group b cancels
    assert (out["adagn, s = 0, b"] - out["adagn, s = 0, b = 0"]).abs().max() > 1e-2  # GN(h) + b keeps it
    assert (out["adagn, s = 0, b"] - out["add, e = b"]).abs().max() > 1e-2
    assert (out["adagn, s, b"] - out["adagn, s = 0, b"]).abs().max() > 1e-2  # the scale acts too
    # and with a shift that varies inside a group, the additive block keeps only that variation
    varying = torch.randn(8, generator=g)
    centred = varying - varying.view(2, 4).mean(1).repeat_interleave(4)
    torch.testing.assert_close(_block_with_embedding(False, shift=varying)(x, emb),
                               _block_with_embedding(False, shift=centred)(x, emb))
