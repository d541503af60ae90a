"""ddpm_lib.viz: grids place every image where it belongs, and bad shapes are named."""

import matplotlib

matplotlib.use("Agg")

import pytest
import torch

from ddpm_lib.viz import image_grid, save_figure, show_images, show_points


def test_grid_places_each_image_in_its_cell():
    n, c, h, w = 5, 3, 4, 6
    x = torch.linspace(-1, 1, n)[:, None, None, None].expand(n, c, h, w).clone()
    grid = image_grid(x, nrow=3, padding=1, pad_value=0.25)
    assert grid.shape == (2 * (h + 1) + 1, 3 * (w + 1) + 1, c)
    for i in range(n):
        r, col = divmod(i, 3)
        cell = grid[1 + r * (h + 1): 1 + r * (h + 1) + h, 1 + col * (w + 1): 1 + col * (w + 1) + w]
        torch.testing.assert_close(cell, torch.full((h, w, c), (x[i, 0, 0, 0].item() + 1) / 2))
    # the empty sixth cell and the frame lines are padding
    assert torch.all(grid[1 + (h + 1): 1 + (h + 1) + h, 1 + 2 * (w + 1): 1 + 2 * (w + 1) + w] == 0.25)
    assert torch.all(grid[0] == 0.25) and torch.all(grid[:, -1] == 0.25)


def test_grid_clips_and_defaults_to_square():
    x = torch.tensor([-5.0, 5.0, 0.0, 0.0]).view(4, 1, 1, 1)
    grid = image_grid(x, padding=0)
    assert grid.shape == (2, 2, 1)
    assert grid.flatten().tolist() == [0.0, 1.0, 0.5, 0.5]
    assert image_grid(torch.zeros(3, 8, 8), padding=0).shape == (16, 16, 1)  # [N, H, W] accepted


@pytest.mark.parametrize("bad", [torch.zeros(2, 2, 8, 8), torch.zeros(8, 8), torch.zeros(0, 1, 8, 8)])
def test_bad_image_shapes_are_named(bad):
    with pytest.raises(ValueError, match="shape"):
        image_grid(bad)


def test_figures_draw_and_save(tmp_path):
    ax = show_images(torch.rand(6, 1, 8, 8) * 2 - 1, title="digits")
    assert ax.get_title() == "digits" and len(ax.images) == 1
    ax = show_points(torch.randn(50, 2), labels=torch.arange(50) % 3, lim=3)
    assert ax.get_xlim() == (-3, 3)
    with pytest.raises(ValueError, match=r"\[N, 2\]"):
        show_points(torch.randn(5, 3))
    for x, name in [(torch.randn(40, 2), "points.png"), (torch.rand(4, 3, 8, 8), "images.png")]:
        save_figure(x, tmp_path / "sub" / name)
        assert (tmp_path / "sub" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
