"""What the confusion-matrix figure and the prediction grid show, pixel by pixel, not just that they exist."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tl_lightning.callbacks.confusion_figure import confusion_figure
from tl_lightning.callbacks.prediction_grid import RED, prediction_grid

CM = torch.tensor([[8, 2, 0], [1, 3, 6], [0, 0, 5]])  # rows true, columns predicted
NAMES = ["apple", "banana", "cherry"]


def _render(fig) -> np.ndarray:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].astype(int)


def test_confusion_figure_colours_rows_by_rate_and_writes_the_counts():
    fig = confusion_figure(CM, NAMES)
    (ax,) = [a for a in fig.axes if a.get_xlabel() == "predicted"]
    # independent row normalisation: each count over its row's total
    rates = np.array([[c / sum(row) for c in row] for row in CM.tolist()])
    np.testing.assert_allclose(np.asarray(ax.images[0].get_array()), rates, rtol=1e-6)
    texts = {
        (round(t.get_position()[1]), round(t.get_position()[0])): t.get_text() for t in ax.texts
    }
    # cell (true i, predicted j) is drawn at x=j, y=i; zeros are left blank
    assert texts == {(i, j): str(v) for (i, j), v in np.ndenumerate(CM.numpy()) if v}
    assert [t.get_text() for t in ax.get_xticklabels()] == NAMES
    assert [t.get_text() for t in ax.get_yticklabels()] == NAMES
    assert ax.get_ylabel() == "true"
    assert ax.get_title() == f"accuracy {16 / 25:.3f}"

    # the pixels: a cell's blue gets darker as its rate grows (row 1: 0.1 < 0.3 < 0.6)
    pixels = _render(fig)
    height = pixels.shape[0]

    def cell(i, j):  # a point inside the cell, off its number
        x, y = ax.transData.transform((j - 0.35, i - 0.35))
        return pixels[int(height - y), int(x)]

    brightness = [cell(1, j).sum() for j in range(3)]
    assert brightness[0] > brightness[1] > brightness[2]
    assert tuple(cell(2, 0)) == (247, 251, 255)  # rate 0: the lightest of matplotlib's Blues
    assert cell(2, 2)[2] > cell(2, 2)[0]  # rate 1: blue, not grey


def test_prediction_grid_places_each_image_and_frames_only_the_mistakes():
    colours = [(1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0), (1.0, 1.0, 0.0), (0.0, 1.0, 1.0)]
    images = torch.tensor(colours).view(5, 3, 1, 1).expand(5, 3, 8, 8).contiguous()
    true = ["a", "b", "c", "d", "e"]
    pred = ["a", "x", "c", "d", "y"]  # tiles 1 and 4 are wrong
    tile = 112  # the default: wide enough that no caption runs into the next cell
    grid = prediction_grid(images, true, pred, [0.9] * 5, tile=tile)
    # layout, worked by hand: 5 tiles -> 3 columns x 2 rows; a cell is tile + 2*4 border wide and
    # tile + 2*4 border + 28 caption high
    cell_w, cell_h = tile + 8, tile + 8 + 28
    assert grid.shape == (3, 2 * cell_h, 3 * cell_w)
    rgb = (grid * 255).round().to(torch.int).permute(1, 2, 0)
    for i, colour in enumerate(colours):
        x0, y0 = (i % 3) * cell_w, (i // 3) * cell_h
        centre = rgb[y0 + 4 + tile // 2, x0 + 4 + tile // 2]
        assert tuple(centre.tolist()) == tuple(round(255 * c) for c in colour), i
        frame = tuple(rgb[y0 + 1, x0 + 1].tolist())
        caption = rgb[y0 + tile + 8 : y0 + cell_h, x0 : x0 + cell_w].reshape(-1, 3)
        # the text is anti-aliased: count clearly green and clearly red pixels
        r, g, b = caption[:, 0], caption[:, 1], caption[:, 2]
        greens = int(((g > r + 60) & (g > b + 60)).sum())
        reds = int(((r > g + 60) & (r > b + 60)).sum())
        if true[i] == pred[i]:
            assert frame == (255, 255, 255), i
            assert greens > 10 and reds == 0, (i, greens, reds)
        else:
            assert frame == RED, i
            assert reds > 10 and greens == 0, (i, greens, reds)
    # the sixth cell is empty: white
    assert (rgb[cell_h:, 2 * cell_w :] == 255).all()


@pytest.mark.parametrize("n", [1, 2, 10])
def test_prediction_grid_is_a_near_square_of_n_tiles(n):
    grid = prediction_grid(torch.rand(n, 3, 4, 4), ["t"] * n, ["t"] * n, tile=8)
    cols = int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    assert grid.shape == (3, rows * (8 + 8 + 28), cols * (8 + 8))
