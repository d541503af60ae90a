"""Runs ``ddpm_lib.train.train`` in a separate process, for the kill -9 and DDP tests.

Usage: ``python tests/_ddp_worker.py SPEC_JSON`` (or under ``torch.distributed.run``), where the
spec holds ``out_dir``, ``model``, ``diffusion`` and ``train`` configs, ``n`` (number of two-moons
points, with labels) and ``sleep`` (seconds per fetched example, to slow a run down so that a
test can kill it mid-way; it does not change any number).
"""

from __future__ import annotations

import json
import sys
import time

import torch


class LabelledPoints(torch.utils.data.Dataset):
    """A (x, label) dataset fetched item by item, optionally slowly."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, sleep: float):
        self.x, self.y, self.sleep = x, y, sleep

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        if self.sleep:
            time.sleep(self.sleep)
        return self.x[i], int(self.y[i])


def make_data(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    from ddpm_lib.data import two_moons

    x, y = two_moons(n, generator=0, return_labels=True)
    return x.clamp(-1, 1), y


def main(spec: dict) -> None:
    torch.set_num_threads(1)  # bit-exact comparisons between processes
    from ddpm_lib.train import train

    x, y = make_data(spec["n"])
    data = LabelledPoints(x, y, spec.get("sleep", 0.0)) if spec.get("dataset") else (x, y)
    train(spec["model"], spec["diffusion"], spec["train"], data, out_dir=spec["out_dir"], progress=False)


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
