"""Sample grids (diffusers' make_image_grid + nearest-neighbour upscaling + labels) and matplotlib plots."""

import numpy as np
import pytest
from diffusers.utils import make_image_grid
from PIL import Image

from conditioner.errors import CondvecError
from train.plot import curves_plot, loss_plot
from unet_patch.grid import image_grid, labelled_grid, upscale


def _images(n, size=(4, 3), seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)) for _ in range(n)]


def test_upscale_is_nearest_neighbour_blocks():
    [image] = _images(1)
    big = np.asarray(upscale(image, 3))
    assert big.shape == (9, 12, 3)
    assert np.array_equal(big, np.asarray(image).repeat(3, axis=0).repeat(3, axis=1))
    assert upscale(image, 1) is image
    with pytest.raises(CondvecError, match="integer >= 1"):
        upscale(image, 0)


def test_labelled_grid_places_the_upscaled_images_exactly_as_make_image_grid():
    rows = [_images(3, seed=1), _images(3, seed=2)]
    grid = labelled_grid(rows, ["red circle, a long label that wraps", "b"], ["seed 0", "seed 1", "seed 2"],
                         title="step 10", upscale=2)
    expected = make_image_grid([upscale(im, 2) for row in rows for im in row], rows=2, cols=3)
    body = grid.crop((grid.width - expected.width, grid.height - expected.height, grid.width, grid.height))
    assert np.array_equal(np.asarray(body), np.asarray(expected))
    margin = np.asarray(grid)[: grid.height - expected.height]
    assert (margin < 128).any(), "labels are drawn in the margin"
    with pytest.raises(CondvecError, match="1 row labels for 2 rows"):
        labelled_grid(rows, ["a"], [])


def test_ragged_rows_and_image_grid_fill_empty_cells_white():
    a, b, c = _images(3)
    grid = labelled_grid([[a, b], [c]], ["x", "y"], ["0", "1"])
    last = np.asarray(grid.crop((grid.width - 4, grid.height - 3, grid.width, grid.height)))
    assert (last == 255).all()
    square = image_grid([a, b, c], upscale_by=2)
    assert square.size == (16, 12)
    assert np.array_equal(np.asarray(square.crop((0, 6, 8, 12))), np.asarray(upscale(c, 2)))
    assert (np.asarray(square.crop((8, 6, 16, 12))) == 255).all()


def test_plots_are_matplotlib_pngs_of_the_requested_size(tmp_path):
    loss_plot(list(range(50)), [1.0 / (1 + s) for s in range(50)], str(tmp_path / "loss.png"))
    curves_plot({"single": ([20, 40], [0.1, 0.5]), "layers": ([20, 40], [0.2, None])}, str(tmp_path / "c.png"),
                title="fidelity", y_range=(0, 1), width=600, height=300)
    loss_plot([1], [0.5], str(tmp_path / "early.png"))  # one point: a placeholder, not an error
    for name, size in (("loss.png", (720, 360)), ("c.png", (600, 300)), ("early.png", (720, 360))):
        with Image.open(tmp_path / name) as image:
            assert image.size == size and image.info.get("Software", "").startswith("Matplotlib"), name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.png", "early.png", "loss.png"]
