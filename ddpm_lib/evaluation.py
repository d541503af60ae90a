r"""Load a trained model, sample it, and measure it: the library behind ``ddpm sample`` and ``ddpm eval``.

==================================  ==========================================================
:func:`load_source`                 a ``train --out`` directory, a checkpoint directory or a
                                    pretrained name -> :class:`Loaded` (model, chain, data)
:func:`generate`                    samples of a :class:`Loaded` denoiser with any sampler of
                                    ``ddpm_lib.samplers``, optionally guided
:func:`evaluate`                    ``{metric: {"value", "reference", "note"}}`` of a model
:func:`applicable_metrics`          which of :data:`POINT_METRICS` / :data:`IMAGE_METRICS` apply
:func:`training_metrics`            the metrics ``ddpm train`` logs with each sample grid
==================================  ==========================================================

The metrics, each read beside a reference (its real-vs-real floor at the same n, or its value
on real test data), since every one is a finite-sample estimate (``ddpm_lib.metrics``):

* 2-D data: the sliced Wasserstein distance (Rabin et al. 2011; Bonneel et al. 2015) and the
  energy distance (Szekely & Rizzo 2013) to fresh data from the toy's sampler.
* Images: the Frechet distance (the formula of FID, Heusel et al. 2017) and KID (Binkowski et
  al. 2018, Eq. 3) in the feature space of the project's own pretrained ``FeatureClassifier``
  (not Inception: the images are 8x8 digits and 32x32 shapes), the class accuracy of
  conditional samples, the nearest-training-image memorisation ratio (Yoon et al. 2023), and
  the variational bound on the negative log-likelihood in bits/dim (Ho et al. 2020, Eq. (5)
  and §4.2; ``GaussianDiffusion.nll_bits_per_dim``).
* Classifiers: test accuracy; a noisy classifier's at several t on x_t ~ q(x_t | x_0)
  (Ho et al. 2020, Eq. (4)), the quantity classifier guidance relies on (Dhariwal & Nichol
  2021, §4).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ddpm_lib import pretrained
from ddpm_lib.checkpoint import latest_checkpoint, load_model, read_config
from ddpm_lib.configs import DiffusionConfig
from ddpm_lib.presets import CLASSIFIERS, NOT_DENOISERS, TOYS, DataConfig, load_tensors, toy_sampler
from ddpm_lib.runs import find_run, run_data

__all__ = ["Loaded", "load_source", "run_json", "generate", "evaluate", "applicable_metrics", "training_metrics",
           "FEATURE_CLASSIFIERS", "NUM_LEVELS", "SAMPLERS", "IMAGE_METRICS", "POINT_METRICS", "NOISY_TS"]

#: dataset -> the pretrained FeatureClassifier whose features the image metrics use
FEATURE_CLASSIFIERS = {"digits": "digits_features", "shapes": "shapes_features"}
#: dataset -> pixel levels of the discretised likelihood of bits/dim (Ho et al. 2020, Eq. (13));
#: 8-bit images (the default) have 256, scikit-learn's digits 17 (values 0..16)
NUM_LEVELS = {"digits": 17}
#: sampler name -> default number of steps (ddpm: respaced, Nichol & Dhariwal 2021 §4; DDIM,
#: Song et al. 2021; DPM-Solver++(2M), Lu et al. 2022). ``steps=1000`` runs DDPM's whole chain.
SAMPLERS = {"ddpm": 100, "ddim": 50, "dpm++": 20}
#: the ``eval`` metrics of image models and of 2-D models (see :func:`applicable_metrics`)
IMAGE_METRICS, POINT_METRICS = ("fd", "kid", "acc", "mem", "bpd"), ("sw", "energy")
#: original timesteps (0-based) at which a noisy classifier's accuracy is measured
NOISY_TS = (0, 100, 250, 500, 750)


# --- loading a model: checkpoint directory or pretrained name --------------------------------


@dataclass
class Loaded:
    """A model with what sampling and evaluation need to know about it.

    ``model`` holds the EMA weights in eval mode (a denoiser or a classifier);
    ``diffusion_config`` its chain and parameterisation (``prediction``, ``variance``);
    ``data`` the data it was trained on (None when the run's ``run.json`` is missing);
    ``source`` the path or pretrained name it came from.
    """

    model: nn.Module
    diffusion_config: DiffusionConfig
    data: DataConfig | None
    source: str

    @property
    def kind(self) -> str:
        """The model kind: ``unet``, ``mlp``, ``feature_classifier`` or ``noisy_classifier``."""
        return self.model.config.kind

    @property
    def num_classes(self) -> int | None:
        """The classes of a class-conditional model or a classifier; None if unconditional."""
        return getattr(self.model.config, "num_classes", None)

    @property
    def device(self) -> torch.device:
        """Where the model's weights are: everything it is called on is moved there."""
        return next(self.model.parameters()).device


def run_json(path: Path) -> dict[str, Any] | None:
    """The ``run.json`` that ``ddpm train`` wrote in ``path`` or its parent (a checkpoint
    directory sits inside the run directory), parsed; None if there is none. A damaged one
    raises ``ddpm_lib.runs.RunRecordError`` naming the file (``runs.read_run``)."""
    found = find_run(path)
    return None if found is None else found[1]


def _check_weights(model: nn.Module, where: str) -> None:
    """ValueError naming ``where`` if a weight is NaN or inf: such a model samples only NaN, and
    saying so before sampling beats a failure deep inside a sampler or a metric."""
    bad = [name for name, t in (*model.named_parameters(), *model.named_buffers())
           if t.is_floating_point() and not bool(torch.isfinite(t).all())]  # once per tensor, at load time
    if bad:
        raise ValueError(f"{where}: {len(bad)} weight tensor(s) hold NaN or inf (e.g. {bad[0]}), so the model "
                         f"cannot be sampled or evaluated; use an earlier checkpoint or train again")


def load_source(spec: str, device: str | torch.device = "cpu") -> Loaded:
    """A ``train --out`` directory, a checkpoint directory or a pretrained name -> :class:`Loaded`.

    The model has its EMA weights, is on ``device`` and carries its parameterisation
    (``model.prediction``, ``model.variance``, set by the loaders). Raises FileNotFoundError
    when ``spec`` is neither an existing path nor a pretrained name, ``runs.RunRecordError``
    for a damaged ``run.json`` and ValueError for weights that hold NaN or inf (both name the file).
    """
    if not Path(spec).exists():
        if spec in pretrained.available():
            run = pretrained.run_config(spec)
            out = pretrained.load(spec, device)
            model = out if run.kind in NOT_DENOISERS else out[0]
            _check_weights(model, f"pretrained model {spec!r}")
            return Loaded(model, run.diffusion, run.data, spec)
        raise FileNotFoundError(f"no checkpoint at {spec!r}, and no pretrained model of that name "
                                f"(pretrained: {', '.join(pretrained.available())})")
    ckpt = latest_checkpoint(spec) or Path(spec)
    found = find_run(ckpt)  # a damaged run.json is refused before any loading
    model, _ = load_model(spec, device=device)
    _check_weights(model, str(ckpt / "ema.safetensors"))
    config = read_config(spec)
    data = run_data(*found) if found else None
    return Loaded(model, DiffusionConfig.from_dict(config["diffusion"]), data, str(spec))


# --- sampling --------------------------------------------------------------------------------


def generate(loaded: Loaded, n: int, *, sampler: str = "ddpm", steps: int | None = None, eta: float = 0.0,
             spacing: str = "trailing", seed: int = 0, label: int | None = None, w: float | None = None,
             classifier: nn.Module | None = None, scale: float = 1.0, cascade: Loaded | None = None,
             aug_level: int = 0) -> tuple[Tensor, Tensor | None]:
    """``n`` samples (on the CPU) of a denoiser and their labels (None if unconditional and unguided).

    Args:
        sampler: ``"ddpm"`` (ancestral, Ho et al. 2020, Algorithm 2, respaced to ``steps``),
            ``"ddim"`` (Song et al. 2021, Eq. (12), with ``eta``) or ``"dpm++"``
            (DPM-Solver++(2M), Lu et al. 2022); any of them samples eps-, x0- and
            v-prediction models (the prediction is converted to eps and x0 in one place,
            ``ddpm_lib.predictions``).
        steps: sampling steps; default :data:`SAMPLERS` ``[sampler]``.
        spacing: which original timesteps the ``steps`` visit: ``"trailing"`` (from T - 1
            down), ``"leading"`` or ``"linspace"`` (Lin et al. 2023, arXiv 2305.08891,
            Table 2; ``ddpm_lib.schedules.sampling_timesteps``).
        seed: seeds a generator on the model's device: the same seed gives the same samples.
        label: one class for all samples of a class-conditional model or a guided one;
            default the labels 0, 1, 2, ... cycled.
        w: wraps the model in classifier-free guidance of weight ``w`` (Ho & Salimans 2022,
            Eq. (6)).
        classifier, scale: a noisy classifier and the scale of classifier guidance
            (Dhariwal & Nichol 2021, Algorithm 1).
        cascade, aug_level: a super-resolution model (``cond_channels``) refines the samples of
            ``cascade``, a model of the low-resolution images drawn with the same sampler,
            steps and seed, after noising them to ``aug_level`` (Ho et al. 2022, cascaded
            diffusion; ``ddpm_lib.superres``).

    Raises ValueError for a classifier, for ``w`` on an unconditional model, for a label
    outside the classes, and, with ``loaded.source`` prefixed, for what a sampler refuses (e.g.
    samples that became non-finite).
    """
    from ddpm_lib.guidance import classifier_free, classifier_guidance
    from ddpm_lib.samplers import ddim_sample, ddpm_sample, dpm_solver_pp_sample

    model, dcfg, device = loaded.model, loaded.diffusion_config, loaded.device
    if loaded.kind in NOT_DENOISERS:
        raise ValueError(f"{loaded.source} is a {loaded.kind}, not a denoiser: nothing to sample")
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose from {list(SAMPLERS)}")
    classes = loaded.num_classes or (classifier.config.num_classes if classifier is not None else None)
    if w is not None and loaded.num_classes is None:
        raise ValueError(f"classifier-free guidance needs a class-conditional model; {loaded.source} is unconditional")
    if label is not None and not (classes and 0 <= label < classes):
        raise ValueError(f"--label {label} needs a class-conditional model or a classifier, with 0 <= label < classes")
    cfg = model.config
    model_kwargs = _cascade_input(loaded, n, cascade, aug_level, sampler=sampler, steps=steps, eta=eta,
                                  spacing=spacing, seed=seed)
    shape = (n, cfg.data_dim) if loaded.kind == "mlp" else (n, cfg.in_channels, cfg.image_size, cfg.image_size)
    y = None if classes is None else (torch.full((n,), label) if label is not None else torch.arange(n) % classes)
    guided, diffusion = model, dcfg.build().to(device)
    if w is not None:
        guided = classifier_free(guided, w, null_label=loaded.num_classes)
    if classifier is not None:
        guided = classifier_guidance(guided, classifier, diffusion, scale, pass_y_to_model=loaded.num_classes is not None)
    # The prediction is passed explicitly (not left to model.prediction): a guidance wrapper is
    # a new callable, and the checkpoint's config is the authority on what the network outputs.
    kw = dict(steps=steps or SAMPLERS[sampler], spacing=spacing, prediction=dcfg.prediction,
              generator=torch.Generator(device).manual_seed(seed), y=None if y is None else y.to(device),
              model_kwargs=model_kwargs)
    try:
        if sampler == "ddpm":
            x = ddpm_sample(guided, diffusion, shape, variance=dcfg.variance, **kw)
        elif sampler == "ddim":
            x = ddim_sample(guided, diffusion, shape, eta=eta, **kw)
        else:
            x = dpm_solver_pp_sample(guided, diffusion, shape, **kw)
    except ValueError as e:  # e.g. the samples became non-finite: say which model
        raise ValueError(f"{loaded.source}: {e}") from e
    if loaded.data is not None and loaded.data.encoder is not None:  # a latent model: decode (chapter 13)
        from ddpm_lib.latent import decode_samples

        x = decode_samples(loaded.data, x)
    return x.cpu(), y


def is_superres(loaded: Loaded) -> bool:
    """Whether the denoiser is a super-resolution model (it samples given low-resolution images)."""
    return bool(getattr(getattr(loaded.model, "config", None), "cond_channels", 0))


def _cascade_input(loaded: Loaded, n: int, cascade: Loaded | None, aug_level: int, **sampling) -> dict | None:
    """The ``model_kwargs`` of a cascade's second stage: the first stage's samples, noised."""
    from ddpm_lib.superres import conditioning

    if not is_superres(loaded):
        if cascade is not None:
            raise ValueError(f"{loaded.source} is not a super-resolution model: a cascade needs one as its second stage")
        return None
    if cascade is None:
        raise ValueError(f"{loaded.source} is a super-resolution model: it refines low-resolution images; give the "
                         f"model that draws them (--cascade NAME)")
    if is_superres(cascade):
        raise ValueError(f"{cascade.source}: a cascade's first stage must sample on its own, not be a super-resolution model")
    if not 0 <= aug_level < loaded.diffusion_config.T:
        raise ValueError(f"aug_level must lie in [0, T = {loaded.diffusion_config.T}), got {aug_level}")
    cfg, base = loaded.model.config, cascade.model.config
    channels, side = getattr(base, "in_channels", None), getattr(base, "image_size", None)
    if channels != cfg.cond_channels or not side or side >= cfg.image_size or cfg.image_size % side:
        drawn = f"images [{channels}, {side}, {side}]" if side else "no images"
        raise ValueError(f"{cascade.source} draws {drawn}, which {loaded.source} (cond_channels={cfg.cond_channels}, "
                         f"image_size={cfg.image_size}) cannot refine")
    z, _ = generate(cascade, n, **sampling)
    diffusion = loaded.diffusion_config.build().to(loaded.device)
    g = torch.Generator(loaded.device).manual_seed(sampling["seed"] + 1)
    return conditioning(loaded.model, z.to(loaded.device), aug_level, diffusion, generator=g)


# --- evaluation --------------------------------------------------------------------------------


def _row(value: float, reference: float | None = None, note: str = "") -> dict[str, Any]:
    return {"value": value, "reference": reference, "note": note}


def _feature_classifier_name(data: DataConfig) -> str | None:
    """The pretrained FeatureClassifier for this data, if there is one and it takes its images."""
    name = FEATURE_CLASSIFIERS.get(data.name)
    if name is None:
        return None
    c = pretrained.run_config(name).model
    return name if (c.in_channels, c.image_size, c.image_size) == data.pixels().image_shape() else None


def applicable_metrics(loaded: Loaded) -> tuple[str, ...]:
    """The ``eval`` metrics that apply to a denoiser: sw, energy for 2-D; for images fd and kid
    (a feature classifier exists for the data), acc (also a class-conditional model), mem and
    bpd (the data has a test split)."""
    if loaded.kind == "mlp":
        return POINT_METRICS
    has_fc = loaded.data is not None and _feature_classifier_name(loaded.data) is not None
    has_test = loaded.data is not None and loaded.data.name != "image_folder"
    # bits/dim of a super-resolution model would be conditional on the true low-resolution image,
    # and a latent model's would count latent dimensions, not pixels: neither compares with the others
    latent = loaded.data is not None and loaded.data.encoder is not None
    ok = {"fd": has_fc, "kid": has_fc, "acc": has_fc and loaded.num_classes is not None, "mem": has_test,
          "bpd": has_test and not is_superres(loaded) and not latent}
    return tuple(m for m in IMAGE_METRICS if ok[m])


def _feature_scores(fc, x: Tensor, train_x: Tensor, f_test: Tensor, wanted, g: torch.Generator) -> dict:
    """Frechet distance and KID (those in ``wanted``) of samples ``x`` in the feature space of the
    classifier ``fc``, against the test features ``f_test``, each as ``(value, reference)``: the
    reference is the same metric for ``len(x)`` random training images (real-vs-real)."""
    from ddpm_lib.metrics import extract_features, frechet_distance, kid

    real = train_x[torch.randperm(len(train_x), generator=g)[: len(x)]]
    f_x, f_real = extract_features(fc.features, x), extract_features(fc.features, real)
    out = {}
    if "fd" in wanted:
        out["frechet_distance"] = (frechet_distance(f_x, f_test), frechet_distance(f_real, f_test))
    if "kid" in wanted:
        out["kid"] = (kid(f_x, f_test, generator=g)[0], kid(f_real, f_test, generator=g)[0])
    return out


def _bits_per_dim(loaded: Loaded, test_x: Tensor, test_y: Tensor, nll_batches: int, g: torch.Generator) -> dict:
    """The bound on -log p(x_0) in bits/dim (Ho et al. 2020, Eq. (5), discretised decoder Eq. (13))
    over the first ``nll_batches`` test batches of 64, on the model's device."""
    dcfg, device = loaded.diffusion_config, loaded.device
    # one device for the model, the chain's tables and the images (the CPU generator ``g`` is
    # fine: the noise is drawn on the generator's device and then moved, gaussian.standard_normal)
    diffusion, B, levels = dcfg.build().to(device), 64, NUM_LEVELS.get(loaded.data.name, 256)
    values = []
    for i in range(min(nll_batches, math.ceil(len(test_x) / B))):
        x0, y0 = test_x[i * B:(i + 1) * B].to(device), test_y[i * B:(i + 1) * B].to(device)
        kwargs = {"y": y0} if loaded.num_classes else {}
        with torch.no_grad():
            nll = diffusion.nll_bits_per_dim(loaded.model, x0, num_levels=levels, variance=dcfg.variance,
                                             prediction=dcfg.prediction, model_kwargs=kwargs, generator=g,
                                             batch_t=max(1, 1024 // len(x0)))
        values.append(nll["total_bpd"].cpu())
    vals = torch.cat(values)
    return _row(float(vals.mean()), None, f"test set, {len(vals)} images, {levels} levels")


def _image_metrics(loaded: Loaded, x: Tensor, y: Tensor | None, wanted, *, seed: int, nll_batches: int) -> dict:
    """The image metrics in ``wanted`` (fd, kid, acc, mem, bpd) of samples ``x`` (labels ``y``)."""
    from ddpm_lib.metrics import classifier_accuracy, extract_features, memorization_ratio

    data = loaded.data.pixels()  # a latent model's samples come decoded: compare them with images
    fc_name = _feature_classifier_name(data)
    if fc_name is None and {"fd", "kid", "acc"} & wanted:
        raise ValueError(f"no feature classifier for the data {data.name!r} at {list(data.image_shape())} "
                         f"(they exist for {sorted(FEATURE_CLASSIFIERS)}), so no fd, kid or acc")
    train_x, _ = load_tensors(data, "train")
    test_x, test_y = load_tensors(data, "test")
    g = torch.Generator().manual_seed(seed)
    x = x.clamp(-1, 1)
    out: dict[str, Any] = {}
    # The feature classifiers stay on the CPU: they are small, and the float64 feature
    # statistics then come out the same whichever device sampled.
    if {"fd", "kid"} & wanted:
        fc = pretrained.load(fc_name)
        scores = _feature_scores(fc, x, train_x, extract_features(fc.features, test_x), wanted, g)
        notes = {"frechet_distance": f"{fc_name} features, vs test set; ref: n train images",
                 "kid": "vs test set; ref: n train images"}
        out.update({k: _row(*v, notes[k]) for k, v in scores.items()})
    if "acc" in wanted and y is not None:
        fc = pretrained.load(fc_name)
        out["class_accuracy"] = _row(classifier_accuracy(fc, x, y), classifier_accuracy(fc, test_x, test_y),
                                     "of the asked-for labels; ref: test set")
    if "mem" in wanted:
        ratio = memorization_ratio(x, train_x)
        ref = memorization_ratio(test_x, train_x)
        out["memorization_median_ratio"] = _row(ratio["median"], ref["median"], "NN d1/d2 vs train; ref: test set")
        out["memorized_fraction"] = _row(ratio["fraction_memorized"], ref["fraction_memorized"], "d1/d2 < 1/3")
    if "bpd" in wanted and nll_batches > 0:
        out["bits_per_dim"] = _bits_per_dim(loaded, test_x, test_y, nll_batches, g)
    return out


@torch.no_grad()
def _autoencoder_metrics(loaded: Loaded) -> dict:
    """An autoencoder on the test set: reconstruction error through the encoder's mean, KL per
    latent dimension, and the latent scale factor of the training set (``ddpm_lib.latent``)."""
    from ddpm_lib.latent import autoencoder_losses, latent_scale

    ae, device = loaded.model, loaded.device
    test_x = load_tensors(loaded.data, "test")[0]
    terms = [autoencoder_losses(ae, x.to(device), None) for x in test_x.split(256)]
    rec, kl = [t["recon"].cpu() for t in terms], [t["kl"].cpu() for t in terms]
    n = len(test_x)
    scale = latent_scale(ae, load_tensors(loaded.data, "train")[0])
    return {"reconstruction_mse": _row(float(torch.cat(rec).mean()), None, f"{n} test images, through the mean"),
            "kl_per_latent_dim": _row(float(torch.cat(kl).mean()), None, "KL(q(z|x) || N(0, I)), test set"),
            "latent_scale": _row(scale, None, "1 / std of the training set's latent means")}


def evaluate(loaded: Loaded, *, n: int = 1000, sampler: str = "ddpm", steps: int | None = None, eta: float = 0.0,
             spacing: str = "trailing", seed: int = 0, metrics: set[str] | None = None, nll_batches: int = 1,
             w: float | None = None, cascade: Loaded | None = None, aug_level: int = 0) -> dict:
    """Measure a model: ``{metric: {"value", "reference", "note"}}``.

    ``reference`` is the real-vs-real value at the same n (2-D metrics, Frechet distance, KID) or
    the value on real test data (accuracy, memorisation). ``metrics`` picks among sw, energy
    (2-D), fd, kid, acc, mem, bpd (images; :func:`applicable_metrics`) and acc (classifiers);
    default all that apply; those that do not apply are skipped (``ddpm eval`` refuses them).
    A denoiser is sampled by :func:`generate` (``n``, ``sampler``, ``steps``, ``eta``,
    ``spacing``, ``seed``, ``w``; a super-resolution model with ``cascade`` and ``aug_level``);
    ``nll_batches`` test batches of 64 give bits/dim.
    """
    from ddpm_lib.metrics import classifier_accuracy, compare_to_data

    if loaded.data is None:
        raise ValueError(f"{loaded.source}: no run.json beside the checkpoint, so its data is unknown")
    g = torch.Generator().manual_seed(seed)
    if loaded.kind in CLASSIFIERS:
        from ddpm_lib.classifier_training import noisy_accuracy

        test_x, test_y = load_tensors(loaded.data, "test")
        if loaded.kind == "feature_classifier":
            acc = classifier_accuracy(loaded.model, test_x, test_y, device=loaded.device)
            return {"test_accuracy": _row(acc, None, f"{len(test_y)} test images")}
        diffusion = loaded.diffusion_config.build().to(loaded.device)
        return {f"test_accuracy_t{t}": _row(noisy_accuracy(loaded.model, diffusion, test_x, test_y, t, generator=g),
                                            None, "on x_t ~ q(x_t | x_0)") for t in NOISY_TS}
    if loaded.kind == "autoencoder":
        return _autoencoder_metrics(loaded)
    wanted = set(metrics or applicable_metrics(loaded)) & set(applicable_metrics(loaded))
    if not wanted:
        raise ValueError(f"{loaded.source}: none of the metrics {sorted(metrics or IMAGE_METRICS)} applies to a "
                         f"{loaded.kind} on {loaded.data.name!r} data")
    x, y = generate(loaded, n, sampler=sampler, steps=steps, eta=eta, spacing=spacing, seed=seed, w=w,
                    cascade=cascade, aug_level=aug_level)
    if loaded.kind != "mlp":
        return _image_metrics(loaded, x, y, wanted, seed=seed, nll_batches=nll_batches)
    out = {}
    for key, metric, name in (("sw", "sliced_wasserstein", "sliced_wasserstein"), ("energy", "energy", "energy_distance")):
        if key in wanted:
            r = compare_to_data(x, toy_sampler(loaded.data), metric=metric, generator=g)
            out[name] = _row(r["metric"], r["floor"], f"vs fresh data; ref: real-vs-real floor (std {r['floor_std']:.2g})")
    return out


def training_metrics(data: DataConfig):
    """The ``sample_metrics`` ``ddpm train`` logs with each sample grid (``ddpm_lib.train``), or None.

    2-D toys: the sliced Wasserstein distance to FRESH data and its real-vs-real floor at the
    same n (3 fresh sets each). Digits and shapes: the Frechet distance and KID in the pretrained
    feature classifier's space against the test set, each beside its reference (n training
    images against the test set), and the class accuracy of conditional samples. Cheap: the
    grid's samples (``num_samples``) and one pass of a small classifier.
    """
    from ddpm_lib.metrics import classifier_accuracy, extract_features
    from ddpm_lib.train import points_metrics

    if data.name in TOYS:
        return points_metrics(toy_sampler(data), repeats=3)
    fc_name = _feature_classifier_name(data)
    if fc_name is None:
        return None
    fc = pretrained.load(fc_name)
    train_x, _ = load_tensors(data.pixels(), "train")  # a latent model's grids arrive decoded
    test_x, _ = load_tensors(data.pixels(), "test")
    f_test = extract_features(fc.features, test_x)

    def images(x: Tensor, y: Tensor | None) -> dict[str, float]:
        x = x.clamp(-1, 1)  # also maps NaN to NaN: then the feature statistics refuse it
        if not torch.isfinite(x).all():
            return {"frechet_distance": None}
        scores = _feature_scores(fc, x, train_x, f_test, {"fd", "kid"}, torch.Generator().manual_seed(0))
        out = {}
        for name, (value, reference) in scores.items():
            out[name], out[f"{name}_floor"] = value, reference
        if y is not None:
            out["class_accuracy"] = classifier_accuracy(fc, x, y)
        return out

    return images
