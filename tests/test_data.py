"""ddpm_lib.data: ranges, determinism, splits, drawn shapes, loaders, image files."""

from __future__ import annotations

import json
import math
import pickle
import sys

import numpy as np
import pytest
import torch

from ddpm_lib.data import (
    COLOURS, DIGITS_NUM_LEVELS, SHAPES, ImageFolderDataset, ShapesDataset, center_crop_square, check_range,
    checkerboard, digits_split_indices, draw_shape, eight_gaussians, infinite_loader, load_digits_dataset,
    load_torchvision, resize_image, swiss_roll, to_model_range, two_moons,
)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: see tests/test_models.py
    yield
    torch.set_num_threads(n)


# -- 2-D toys ------------------------------------------------------------------------------------

@pytest.mark.parametrize("fn", [swiss_roll, two_moons, checkerboard])
def test_toys_shape_and_determinism(fn):
    a = fn(500, generator=7)
    assert a.shape == (500, 2) and a.dtype == torch.float32
    assert torch.equal(a, fn(500, generator=torch.Generator().manual_seed(7)))  # int seed == generator
    assert not torch.equal(a, fn(500, generator=8))


def test_toy_scales():
    roll = swiss_roll(4000, noise=0.0, generator=0)
    r = roll.norm(dim=1)
    # theta in [1.5 pi, 4.5 pi] and the map divides by 5 pi: radii fill [0.3, 0.9]
    assert r.min() >= 0.3 - 1e-5 and r.max() <= 0.9 + 1e-5 and r.max() > 0.88 and r.min() < 0.33
    moons, label = two_moons(4000, noise=0.0, generator=0, return_labels=True)
    assert moons[:, 0].abs().max() <= 1 + 1e-6 and moons[:, 1].abs().max() <= 0.5 + 1e-6
    assert moons[:, 0].min() < -0.99 and moons[:, 0].max() > 0.99
    assert 0.45 < label.float().mean() < 0.55
    # the upper moon is the unit half circle centred at (0, 0) before the map (x - (0.5, .25)) / 1.5
    upper = moons[label == 0] * 1.5 + torch.tensor([0.5, 0.25])
    torch.testing.assert_close(upper.norm(dim=1), torch.ones(len(upper)), atol=1e-5, rtol=0)
    noisy = swiss_roll(4000, noise=0.1, generator=0)
    assert 0.08 < (noisy - roll).std() < 0.12  # same generator stream: the noise is the difference
    # strong jitter still leaves every point in the model's data range
    assert swiss_roll(20000, noise=0.3, generator=1).abs().max() <= 1


def test_checkerboard_only_black_cells_uniformly():
    x = checkerboard(8000, num_squares=4, generator=0).double()
    assert x.abs().max() <= 1
    cell = torch.floor((x + 1) * 2).long().clamp(max=3)  # cell indices 0..3
    assert ((cell[:, 0] + cell[:, 1]) % 2 == 0).all()
    counts = torch.bincount(cell[:, 0] * 4 + cell[:, 1], minlength=16)[[0, 2, 5, 7, 8, 10, 13, 15]]
    assert (counts - 1000).abs().max() < 150  # 8 black cells, ~1000 each


def test_eight_gaussians_is_an_exact_mixture():
    pytest.importorskip("ddpm_lib.analytic")
    mix = eight_gaussians(radius=0.8, std=0.05)
    assert mix.num_components == 8 and mix.dim == 2
    torch.testing.assert_close(mix.means.norm(dim=1), torch.full((8,), 0.8, dtype=torch.float64))
    x, labels = mix.sample(4000, generator=torch.Generator().manual_seed(0), return_labels=True)
    err = x - mix.means[labels]
    assert abs(err.std().item() - 0.05) < 0.005 and x.abs().max() < 1


# -- digits --------------------------------------------------------------------------------------

def test_digits_split_is_fixed_disjoint_and_stratified():
    train, test = load_digits_dataset("train"), load_digits_dataset("test")
    assert (len(train), len(test)) == (1438, 359)  # 1797 images, round(0.2 * count) per class to test
    everything = load_digits_dataset("all")
    train_idx, test_idx = digits_split_indices(everything.labels)
    assert set(train_idx.tolist()).isdisjoint(test_idx.tolist())
    assert sorted(train_idx.tolist() + test_idx.tolist()) == list(range(1797))
    assert torch.equal(train.images, everything.images[train_idx])
    assert torch.equal(test.labels, everything.labels[test_idx])
    assert torch.equal(load_digits_dataset("test").images, test.images)  # deterministic
    assert not torch.equal(load_digits_dataset("test", seed=1).labels, test.labels) or \
        not torch.equal(load_digits_dataset("test", seed=1).images, test.images)
    per_class = torch.bincount(test.labels, minlength=10)
    assert per_class.min() >= 34 and per_class.max() <= 37  # each class ~ 20 %
    with pytest.raises(ValueError, match="split"):
        load_digits_dataset("valid")


def test_digits_pixels_are_17_levels_in_range():
    ds = load_digits_dataset("train")
    x, y = ds[0]
    assert x.shape == (1, 8, 8) and x.dtype == torch.float32 and isinstance(y.item(), int)
    assert ds.images.shape == (1438, 1, 8, 8) and ds.labels.dtype == torch.long and ds.num_classes == 10
    check_range(ds.images)
    levels = torch.unique(ds.images)
    assert DIGITS_NUM_LEVELS == 17 and len(levels) == 17
    torch.testing.assert_close(levels, torch.arange(17) / 8.0 - 1)  # x / 8 - 1, spacing 1/8


# -- shapes --------------------------------------------------------------------------------------

def test_shapes_deterministic_per_seed_and_index():
    big, small = ShapesDataset(10_000, seed=3), ShapesDataset(5, seed=3)
    x, y = big[4]
    x2, y2 = small[4]
    assert torch.equal(x, x2) and y == y2  # item i depends on (seed, i) only
    assert torch.equal(big[-1][0], big[9999][0])
    assert not torch.equal(ShapesDataset(5, seed=4)[4][0], x)
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    with pytest.raises(IndexError):
        small[5]


def _palette_index(rgb01: torch.Tensor) -> int:
    palette = torch.tensor(list(COLOURS.values()))
    return int((palette - rgb01).norm(dim=1).argmin())


def test_shape_labels_match_the_drawn_pixels():
    """Read shape and colour back from the pixels alone and compare with the label."""
    ds = ShapesDataset(90, seed=0)
    fills = {0: math.pi / 4, 1: 1.0, 2: 0.5}  # area / bounding box of circle, square, triangle
    bg = torch.tensor([0.08, 0.08, 0.10]) * 2 - 1
    for i in range(len(ds)):
        x, label = ds[i]
        check_range(x)
        dist = (x - bg[:, None, None]).norm(dim=0)
        cover = dist / dist.max()  # pixels blend background and colour linearly in the coverage
        width, height = cover.max(0).values.sum(), cover.max(1).values.sum()
        fill = (cover.sum() / (width * height)).item()
        shape = min(fills, key=lambda s: abs(fills[s] - fill))
        assert shape == ds.shape_label(label) and abs(fill - fills[shape]) < 0.12, (i, fill, label)
        colour = _palette_index((x[:, cover > 0.999].mean(1) + 1) / 2)
        assert colour == ds.colour_label(label)
        assert ds.classes[label] == f"{ds.colours[colour]} {SHAPES[shape]}"


def test_shape_areas_and_class_coverage():
    def area(shape):
        img = draw_shape(shape, (1.0, 1.0, 1.0), 16.0, 16.0, 8.0, 32, background=(0.0, 0.0, 0.0), antialias=8)
        return ((img[0] + 1) / 2).sum()  # sum of coverage = area in pixels

    assert abs(area("circle") / area("square") - math.pi / 4) < 0.01
    assert abs(area("triangle") / area("square") - 0.5) < 0.01
    assert abs(area("square") - 256) < 1e-3
    labels = ShapesDataset(400, seed=1).to_tensors().labels
    assert set(labels.tolist()) == set(range(ShapesDataset.num_classes)) and ShapesDataset.num_classes == 15
    from ddpm_lib.models import shapes32_cond

    assert shapes32_cond().num_classes == ShapesDataset.num_classes  # the preset hard-codes 15


# -- boundary checks and loaders ----------------------------------------------------------------

def test_check_range():
    x = torch.linspace(-1, 1, 11)
    assert check_range(x) is x
    with pytest.raises(ValueError, match="127.5"):
        check_range(torch.tensor([0.0, 255.0]))
    with pytest.raises(ValueError, match=r"\[-1.0, 1.0\]"):
        check_range(torch.tensor([-1.2, 0.3]))
    with pytest.raises(ValueError, match="NaN"):
        check_range(torch.tensor([0.0, float("nan")]))


def test_infinite_loader_is_deterministic_and_reshuffles():
    data = torch.arange(12).float()
    a, b = infinite_loader(data, 4, generator=0), infinite_loader(data, 4, generator=torch.Generator().manual_seed(0))
    first = [next(a) for _ in range(6)]
    assert all(torch.equal(u, next(b)) for u in first)
    epoch1, epoch2 = torch.cat(first[:3]), torch.cat(first[3:])
    assert sorted(epoch1.tolist()) == list(range(12)) == sorted(epoch2.tolist())  # each item once per epoch
    assert not torch.equal(epoch1, epoch2)  # reshuffled
    assert not torch.equal(epoch1, next(infinite_loader(data, 12, generator=1)))  # another seed, another order
    # tuples of tensors stay aligned; any map-style dataset is collated
    xs, ys = next(infinite_loader((data, data.long()), 5, generator=0))
    assert xs.shape == (5,) and torch.equal(xs.long(), ys)
    imgs, labels = next(infinite_loader(ShapesDataset(6, image_size=8), 3, generator=0))
    assert imgs.shape == (3, 3, 8, 8) and labels.shape == (3,)
    with pytest.raises(ValueError, match="batch_size"):
        next(infinite_loader(data, 13, generator=0))


# -- image files ---------------------------------------------------------------------------------

def test_pixel_transform_without_torchvision():
    arr = np.array([[0, 255], [51, 204]], dtype=np.uint8)
    x = to_model_range(arr)
    torch.testing.assert_close(x, torch.tensor([[[-1.0, 1.0], [-0.6, 0.6]]]))
    rgb = to_model_range(np.zeros((4, 6, 3), dtype=np.uint8))
    assert rgb.shape == (3, 4, 6)
    assert center_crop_square(torch.arange(24.0).view(1, 4, 6))[0, 0].tolist() == [1, 2, 3, 4]
    small = resize_image(torch.rand(3, 20, 20) * 2 - 1, 5)
    assert small.shape == (3, 5, 5) and small.abs().max() <= 1
    with pytest.raises(ValueError, match="uint8"):
        to_model_range(np.zeros((2, 2), dtype=np.float32))


def test_torchvision_missing_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision", None)  # import torchvision now raises ImportError
    monkeypatch.setitem(sys.modules, "torchvision.datasets", None)
    with pytest.raises(ImportError, match=r"ddpm_lib\[vision\]"):
        load_torchvision("mnist", "/nonexistent")
    with pytest.raises(ValueError, match="unknown torchvision set"):
        load_torchvision("imagenet", "/nonexistent")


def test_image_folder(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    (tmp_path / "cats").mkdir()
    (tmp_path / "dogs").mkdir()
    Image.new("RGB", (12, 8), (255, 0, 0)).save(tmp_path / "cats" / "a.png")
    Image.new("RGB", (6, 6), (0, 0, 255)).save(tmp_path / "dogs" / "b.png")
    grey = np.zeros((10, 10), dtype=np.uint8)
    grey[:, 5:] = 255  # left half black, right half white
    Image.fromarray(grey).save(tmp_path / "dogs" / "c.png")
    (tmp_path / "notes.txt").write_text("not an image")
    ds = ImageFolderDataset(tmp_path, image_size=4)
    assert len(ds) == 3 and ds.classes == ["cats", "dogs"]
    x, label = ds[0]
    assert x.shape == (3, 4, 4) and label == 0
    torch.testing.assert_close(x, torch.tensor([1.0, -1.0, -1.0])[:, None, None].expand(3, 4, 4))
    x, label = ds[2]
    assert label == 1 and x[:, :, 0].max() < -0.9 and x[:, :, -1].min() > 0.9
    assert ImageFolderDataset(tmp_path, 4, channels=1)[1][0].shape == (1, 4, 4)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        ImageFolderDataset(tmp_path / "empty", 4)


def _write_idx(path, array: np.ndarray) -> None:
    """The MNIST idx format: 0x00 0x00, type 0x08 (uint8), rank, big-endian int32 dims, data."""
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def _mnist_files(root, folder: str = "FashionMNIST") -> None:
    """5 train and 3 test images of 28x28 in torchvision's raw MNIST layout, labels 0, 1, 2, ..."""
    raw = root / folder / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", 5), ("t10k", 3)):
        _write_idx(raw / f"{split}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(raw / f"{split}-labels-idx1-ubyte", np.arange(n) % 10)


def _cifar_files(root, monkeypatch) -> dict:
    """CIFAR-10's python batches (2 images each, in the real pickle format; md5 check disabled)."""
    import torchvision.datasets.cifar as cifar

    # the real files' md5 sums are checked; ours are fakes in the same pickle format
    monkeypatch.setattr(cifar, "check_integrity", lambda *args, **kwargs: True)
    base = root / "cifar-10-batches-py"
    base.mkdir()
    rng = np.random.default_rng(0)
    batches = {}
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        # rows are 1024 red, 1024 green, 1024 blue values, each plane row-major 32x32
        batches[name] = {"data": rng.integers(0, 256, (2, 3072), dtype=np.uint8), "labels": [i % 10, (i + 1) % 10]}
        (base / name).write_bytes(pickle.dumps(batches[name]))
    (base / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"class{k}" for k in range(10)]}))
    return batches


@pytest.mark.vision
@pytest.mark.parametrize("name, folder", [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")])
def test_mnist_files(tmp_path, name, folder):
    pytest.importorskip("torchvision")
    _mnist_files(tmp_path, folder)
    ds = load_torchvision(name, tmp_path, train=True, image_size=32)
    assert len(ds) == 5
    x, y = ds[3]
    assert x.shape == (1, 32, 32) and y == 3
    check_range(x)
    assert len(load_torchvision(name, tmp_path, train=False)) == 3


@pytest.mark.vision
def test_cifar10_files(tmp_path, monkeypatch):
    pytest.importorskip("torchvision")
    batches = _cifar_files(tmp_path, monkeypatch)
    ds = load_torchvision("cifar10", tmp_path, train=True)
    assert len(ds) == 10
    x, y = ds[0]
    assert x.shape == (3, 32, 32) and y == 0
    want = torch.from_numpy(batches["data_batch_1"]["data"][0].astype(np.float32)).view(3, 32, 32) / 127.5 - 1
    torch.testing.assert_close(x, want)
    assert len(load_torchvision("cifar10", tmp_path, train=False)) == 2


# -- the data of the run configs (ddpm_lib.presets) --------------------------------------------

def test_eight_gaussians_is_a_cli_toy():
    from ddpm_lib.presets import DataConfig, TOYS, load_data, toy_sampler

    cfg = DataConfig(name="eight_gaussians", n=3000)
    assert "eight_gaussians" in TOYS
    (x,) = load_data(cfg, "train")
    assert x.shape == (3000, 2) and x.dtype == torch.float32 and x.abs().max() <= 1
    assert torch.equal(x, load_data(cfg, "train")[0]) and not torch.equal(x, load_data(cfg, "test")[0])
    # the distance to the nearest of the 8 means is Rayleigh(0.05): mean 0.05 sqrt(pi / 2)
    nearest = torch.cdist(x.double(), eight_gaussians().means).min(dim=1).values
    assert nearest.max() < 0.3 and abs(nearest.mean().item() - 0.05 * math.sqrt(math.pi / 2)) < 0.005
    fresh = toy_sampler(cfg)(10, generator=torch.Generator().manual_seed(1))
    assert fresh.shape == (10, 2)


@pytest.mark.parametrize("bad, field", [
    ({"name": "mnist"}, "root"),
    ({"name": "image_folder", "root": "x", "download": True}, "download"),
    ({"name": "cifar10", "root": "x", "channels": 2}, "channels"),
    ({"name": "imagenet"}, "name"),
])
def test_data_config_errors_name_the_field(bad, field):
    from ddpm_lib.presets import DataConfig

    with pytest.raises(ValueError, match=f"DataConfig.{field}"):
        DataConfig.from_dict(bad)


def test_run_config_checks_the_model_fits_the_data():
    from ddpm_lib.presets import apply_overrides, load_run_config

    run = apply_overrides(load_run_config("digits"), ["data.name=mnist", "data.root=/data", "data.image_size=8"])
    assert run.data.image_shape() == (1, 8, 8)  # MNIST resized to the digits network's input
    with pytest.raises(ValueError, match=r"\[1, 8, 8\] but data 'cifar10' gives \[3, 8, 8\]"):
        apply_overrides(run, ["data.name=cifar10"])
    with pytest.raises(ValueError, match="needs 2-D points"):
        apply_overrides(load_run_config("swissroll"), ["data.name=digits"])
    with pytest.raises(ValueError, match="takes images"):
        apply_overrides(load_run_config("digits"), ["data.name=two_moons"])


@pytest.mark.vision
def test_torchvision_sets_through_the_data_config(tmp_path, monkeypatch):
    pytest.importorskip("torchvision")
    from ddpm_lib.presets import DataConfig, load_data, load_tensors

    _mnist_files(tmp_path)
    ds = load_data(DataConfig(name="fashion_mnist", root=str(tmp_path), image_size=16, channels=3), "train")
    x, y = ds[4]
    assert len(ds) == 5 and x.shape == (3, 16, 16) and y == 4
    torch.testing.assert_close(x[0], x[2])  # grey replicated to RGB
    images, labels = load_tensors(DataConfig(name="fashion_mnist", root=str(tmp_path)), "test")
    assert images.shape == (3, 1, 32, 32) and labels.tolist() == [0, 1, 2]
    with pytest.raises(FileNotFoundError, match="download"):  # nothing under this root
        load_data(DataConfig(name="mnist", root=str(tmp_path / "nothing")), "train")
    _cifar_files(tmp_path, monkeypatch)
    grey = load_data(DataConfig(name="cifar10", root=str(tmp_path), image_size=8, channels=1), "test")
    assert grey[0][0].shape == (1, 8, 8) and len(grey) == 2


@pytest.mark.vision
def test_mnist_trains_through_the_cli(tmp_path, capsys):
    """``ddpm train`` on MNIST files (resized to the digits network's 8x8) for a few steps."""
    pytest.importorskip("torchvision")
    from ddpm_lib.cli import main

    _mnist_files(tmp_path, folder="MNIST")
    out = tmp_path / "run"
    code = main(["train", "--config", "digits", "--dry-run", "--out", str(out), "--set", "data.name=mnist",
                 f"data.root={tmp_path}", "data.image_size=8", "train.batch_size=4"])
    assert code == 0, capsys.readouterr().err
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3] and all(math.isfinite(r["loss"]) for r in records)
    assert (out / "checkpoint" / "config.json").is_file()
