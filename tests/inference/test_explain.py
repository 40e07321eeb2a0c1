"""inference.explain: occlusion sensitivity through any forward, its bounds, the overlay."""
import argparse
import io

import pytest
import torch
from PIL import Image

from inference.explain import MAX_GRID, cell_edges, occlusion, render_overlay
from inference.settings import HandlerSettings, SettingsError, add_arguments, from_args

SIZE, GRID = 32, 4  # cells of 8 pixels
HOT = (2, 1)        # the one cell the synthetic model looks at


def region_model(x: torch.Tensor) -> torch.Tensor:
    """Logits of 3 classes; class 0 grows with the brightness of cell HOT, the others are constant."""
    r, c = HOT
    brightness = x[:, :, r * 8:(r + 1) * 8, c * 8:(c + 1) * 8].float().mean(dim=(1, 2, 3)) / 255
    return torch.stack([10 * brightness, torch.full_like(brightness, 4.0), torch.full_like(brightness, 3.0)], 1)


def images_with_hot_cell(n=2, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 60, (n, 3, SIZE, SIZE), generator=g, dtype=torch.uint8)
    r, c = HOT
    x[:, :, r * 8:(r + 1) * 8, c * 8:(c + 1) * 8] = 250
    return x


class Counting:
    """A forward that records the size of every call."""

    def __init__(self, fn, *, softmax=False):
        self.fn, self.softmax, self.sizes, self.inputs = fn, softmax, [], []

    def __call__(self, x):
        self.sizes.append(len(x))
        self.inputs.append(x.clone())
        out = self.fn(x)
        return out.softmax(-1) if self.softmax else out


def test_the_cell_the_model_looks_at_gets_the_largest_attribution():
    images = images_with_hot_cell()
    result = occlusion(region_model, images, grid=GRID)
    assert result.maps.shape == (2, GRID, GRID) and result.maps.dtype == torch.float32
    assert result.indices.tolist() == [0, 0]
    base = region_model(images).softmax(-1)[:, 0]
    assert result.probabilities == pytest.approx(base.tolist(), abs=1e-6)
    for m in result.maps:
        assert divmod(int(m.argmax()), GRID) == HOT
        assert m[HOT] > 0.5                                   # hiding the cell loses the class
        others = torch.cat([m.flatten()[:HOT[0] * GRID + HOT[1]], m.flatten()[HOT[0] * GRID + HOT[1] + 1:]])
        assert others.abs().max() < 1e-6                      # the rest does not matter to this model


def test_probabilities_output_gives_the_same_map_as_logits():
    images = images_with_hot_cell(seed=3)
    from_logits = occlusion(region_model, images, grid=GRID)
    from_probs = occlusion(Counting(region_model, softmax=True), images, grid=GRID, output="probabilities")
    assert torch.allclose(from_logits.maps, from_probs.maps, atol=1e-6)
    assert from_probs.indices.tolist() == from_logits.indices.tolist()


@pytest.mark.parametrize("n,grid,max_views", [(3, 5, 7), (1, 7, 64), (2, 3, 1), (5, 2, 4)])
def test_forwards_are_batched_and_never_larger_than_max_views(n, grid, max_views):
    forward = Counting(region_model)
    occlusion(forward, images_with_hot_cell(n), grid=grid, max_views=max_views)
    assert max(forward.sizes) <= max_views
    assert sum(forward.sizes) == n + n * grid * grid           # the plain views, then every occluded view once
    expected_calls = -(-n // max_views) + -(-(n * grid * grid) // max_views)
    assert len(forward.sizes) == expected_calls


@pytest.mark.parametrize("fill", ["mean", "grey"])
def test_an_occluded_cell_holds_the_fill_and_nothing_else_changes(fill):
    images = images_with_hot_cell(1, seed=5)
    forward = Counting(region_model)
    occlusion(forward, images, grid=GRID, fill=fill, max_views=GRID * GRID)
    views = forward.inputs[1]                                  # all 16 occluded views of the image
    expected = images[0].float().mean(dim=(1, 2)).round().to(torch.uint8) if fill == "mean" else \
        torch.full((3,), 128, dtype=torch.uint8)
    for k, view in enumerate(views):
        r, c = divmod(k, GRID)
        cell = view[:, r * 8:(r + 1) * 8, c * 8:(c + 1) * 8]
        assert (cell == expected[:, None, None]).all()
        outside = view.clone()
        outside[:, r * 8:(r + 1) * 8, c * 8:(c + 1) * 8] = images[0, :, r * 8:(r + 1) * 8, c * 8:(c + 1) * 8]
        assert torch.equal(outside, images[0])


def test_cell_edges_cover_the_side_without_gaps():
    for size, grid in ((24, 7), (224, 16), (5, 5), (10, 1)):
        edges = cell_edges(size, grid)
        assert edges[0] == 0 and edges[-1] == size and len(edges) == grid + 1
        assert all(b > a for a, b in zip(edges, edges[1:]))


@pytest.mark.parametrize("kwargs,match", [
    ({"grid": 0}, "grid must be an integer from 1"), ({"grid": MAX_GRID + 1}, "grid must be an integer from 1"),
    ({"grid": True}, "grid must be"), ({"fill": "blur"}, "fill must be one of"), ({"output": "topk"}, "output"),
    ({"max_views": 0}, "max_views"),
])
def test_bad_arguments_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        occlusion(region_model, images_with_hot_cell(1), **kwargs)


def test_a_grid_finer_than_the_image_and_a_topk_graph_are_refused():
    with pytest.raises(ValueError, match="from 1 to 8"):
        occlusion(region_model, torch.zeros((1, 3, 8, 8), dtype=torch.uint8), grid=9)
    with pytest.raises(ValueError, match="top-k"):
        occlusion(lambda x: (x.float().mean(), torch.zeros(len(x))), images_with_hot_cell(1))


def test_overlay_is_a_png_of_the_image_size_hot_where_the_attribution_is():
    image = torch.full((3, 24, 40), 100, dtype=torch.uint8)
    attribution = torch.zeros(4, 4)
    attribution[0, 3] = 0.7
    attribution[2, 0] = -0.5                                   # negative: not painted
    png = render_overlay(image, attribution)
    out = Image.open(io.BytesIO(png))
    assert out.format == "PNG" and out.size == (40, 24) and out.mode == "RGB"
    pixels = torch.tensor(list(out.getdata())).view(24, 40, 3)
    assert pixels[2, 37].tolist() != [100, 100, 100] and pixels[2, 37, 0] > pixels[2, 37, 2]  # red-ish
    assert pixels[15, 2].tolist() == [100, 100, 100] and pixels[22, 20].tolist() == [100, 100, 100]
    blank = Image.open(io.BytesIO(render_overlay(image, torch.zeros(4, 4))))
    assert list(blank.getdata()) == [(100, 100, 100)] * (24 * 40)


def test_settings_define_the_explanation_options_once():
    p = argparse.ArgumentParser()
    add_arguments(p, HandlerSettings)
    args = p.parse_args(["--explain-grid", "9", "--explain-fill", "grey", "--explain-overlay"])
    s = from_args(args, HandlerSettings, input_size=24)
    assert (s.explain_grid, s.explain_fill, s.explain_overlay) == (9, "grey", True)
    assert HandlerSettings(input_size=24).to_config()["explain_grid"] == 7
    with pytest.raises(SettingsError, match=r"handler\.explain_grid must be <= 16"):
        HandlerSettings.from_config({"input_size": 24, "explain_grid": 17})
    with pytest.raises(SystemExit):
        p.parse_args(["--explain-fill", "blur"])
