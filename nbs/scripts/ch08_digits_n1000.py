"""The n = 1000 digits table of chapter 8 ("What the measurements say"), reproduced.

Too slow for the chapter's own budget (about half an hour on 2 CPU cores), so the chapter
records its numbers and re-runs the decisive comparisons at n = 300. Every row samples the
shipped ``digits`` model from the SAME x_T and scores the samples by the Frechet distance in
the ``digits_features`` space against the test set, as ``ddpm eval`` does. Run from the repo:

    OMP_NUM_THREADS=1 python nbs/scripts/ch08_digits_n1000.py
"""

from __future__ import annotations

import time

import torch

from ddpm_lib import pretrained
from ddpm_lib.book import generator
from ddpm_lib.metrics import extract_features, frechet_distance
from ddpm_lib.presets import load_data
from ddpm_lib.samplers import ddim_sample, ddpm_sample

N = 1000
ROWS = [  # (sampler, spacing, steps, eta or variance)
    *[("ddim", "trailing", s, 0.0) for s in (10, 20, 50, 100)],
    *[("ddpm", "trailing", s, "fixed_small") for s in (10, 20, 50, 100)],
    *[("ddim", "trailing", s, 0.5) for s in (20, 50, 100)],
    ("ddpm", "leading", 20, "fixed_small"), ("ddpm", "leading", 100, "fixed_small"),
    ("ddim", "leading", 100, 0.0),
]


def main() -> None:
    torch.set_num_threads(1)
    model, diffusion = pretrained.load("digits")
    fc = pretrained.load("digits_features")
    data = pretrained.run_config("digits").data
    train, _ = load_data(data, "train")
    test, _ = load_data(data, "test")
    f_test = extract_features(fc.features, test)
    g = torch.Generator().manual_seed(0)
    refs = [frechet_distance(extract_features(fc.features, train[torch.randperm(len(train), generator=g)[:N]]), f_test)
            for _ in range(5)]
    print("real vs real (5 sets of", N, "training images):", [round(r, 3) for r in refs])
    x_T = torch.randn(N, 1, 8, 8, generator=generator(100))
    for sampler, spacing, steps, option in ROWS:
        start = time.perf_counter()
        if sampler == "ddim":
            x = ddim_sample(model, diffusion, x_T.shape, steps=steps, spacing=spacing, eta=option, x_T=x_T,
                            generator=generator(7))
        else:
            x = ddpm_sample(model, diffusion, x_T.shape, steps=steps, spacing=spacing, variance=option, x_T=x_T,
                            generator=generator(7))
        fd = frechet_distance(extract_features(fc.features, x), f_test)
        print(f"{sampler} {spacing:>8} {steps:4d} steps {option!s:>11}: FD {fd:.3f} "
              f"({time.perf_counter() - start:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
