"""The one mask converter (``as_bool_mask``) and its users (user masks to the latent grid, overlays), and
``mask_to_original`` (latent-grid masks back to the image size)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from diffusers_conceptexpress.image_io import ResizeRecord, mask_to_original, prepare_image
from diffusers_conceptexpress.masks import as_bool_mask, masks_to_latent_grid
from diffusers_conceptexpress.visualize import MASK_COLOURS, overlay_masks


def _box() -> np.ndarray:
    m = np.zeros((6, 8), dtype=bool)
    m[1:4, 2:7] = True
    return m


@pytest.mark.parametrize(
    "make",
    [
        lambda m: m,
        lambda m: m[..., None],  # (H, W, 1)
        lambda m: m.astype(np.uint8) * 255,  # read like an 8-bit image
        lambda m: m.astype(np.float32),
        lambda m: m.astype(np.int64),
        lambda m: torch.from_numpy(m),
        lambda m: torch.from_numpy(m).to(torch.bfloat16),
        lambda m: Image.fromarray(m.astype(np.uint8) * 255),  # "L"
        lambda m: Image.fromarray(m),  # "1"
        lambda m: Image.fromarray(m.astype(np.uint8) * 255).convert("RGB"),
    ],
)
def test_every_accepted_input_gives_the_same_bool_array(make):
    out = as_bool_mask(make(_box()))
    assert out.dtype == np.bool_ and out.shape == (6, 8)
    assert np.array_equal(out, _box())


def test_thresholds_sizes_and_errors():
    assert not as_bool_mask(np.full((2, 2), 127, np.uint8)).any()  # uint8: > 127, as for a PIL "L" mask
    assert as_bool_mask(np.full((2, 2), 0.6)).all() and not as_bool_mask(np.full((2, 2), 0.5)).any()
    m = _box()
    assert np.array_equal(as_bool_mask(m, (8, 6)), m)
    with pytest.raises(
        ValueError, match="Mask 3 is 8x6 but the image is 16x12; masks must have the image's size"
    ):
        as_bool_mask(m, (16, 12), name="Mask 3")
    big = as_bool_mask(m, (16, 12), resize=True)  # nearest neighbour
    assert big.shape == (12, 16) and np.array_equal(big[::2, ::2], m)
    with pytest.raises(ValueError, match=r"must be 2-D \(height, width\), got shape \(2, 6, 8\)"):
        as_bool_mask(np.stack([m, m]))
    with pytest.raises(TypeError, match="Mask has type list; use PIL images, numpy arrays or tensors"):
        as_bool_mask(m.tolist())


def test_user_masks_to_latent_grid_name_the_bad_mask():
    m = np.zeros((32, 32), dtype=bool)
    m[:16, :16] = True
    grid = masks_to_latent_grid([m, ~m], (32, 32), (4, 4))
    assert grid.shape == (2, 4, 4) and grid[0, :2, :2].all() and not grid[0, 2:].any()
    assert torch.equal(masks_to_latent_grid(np.stack([m, ~m]), (32, 32), (4, 4)), grid)  # (K, H, W) at once
    with pytest.raises(ValueError, match="Mask 1 is 16x16 but the image is 32x32"):
        masks_to_latent_grid([m, m[:16, :16]], (32, 32), (4, 4))
    with pytest.raises(ValueError, match="Mask 0 is empty"):
        masks_to_latent_grid([np.zeros((32, 32), bool)], (32, 32), (4, 4))
    with pytest.raises(ValueError, match="empty list"):
        masks_to_latent_grid([], (32, 32), (4, 4))


def test_overlay_tints_each_mask_in_its_colour_at_any_mask_size():
    image = Image.new("RGB", (16, 12), (0, 0, 0))
    m = _box()  # 8x6: resized to the image (nearest neighbour)
    out = np.asarray(overlay_masks(image, [m, torch.from_numpy(~m)], alpha=1.0))
    assert out.shape == (12, 16, 3)
    assert (out[2, 6] == MASK_COLOURS[0]).all() and (out[0, 0] == MASK_COLOURS[1]).all()


# ----------------------------------------------------------------------------------------------------
# mask_to_original
# ----------------------------------------------------------------------------------------------------


def test_mask_to_original_block_on_8x8_grid() -> None:
    grid = np.zeros((8, 8), dtype=bool)
    grid[2:6, 2:6] = True  # rows/cols 2..5 -> pixels [25, 75) horizontally, [15, 45) vertically
    record = ResizeRecord(original_size=(100, 60), model_size=(64, 64), policy="squash")
    out = mask_to_original(grid, record)
    assert out.mode == "L"
    assert out.size == (100, 60)
    arr = np.asarray(out)
    expected = np.zeros((60, 100), dtype=np.uint8)
    expected[15:45, 25:75] = 255
    np.testing.assert_array_equal(arr, expected)
    assert set(np.unique(arr).tolist()) == {0, 255}


def test_mask_to_original_torch_non_square_grid() -> None:
    grid = torch.zeros(4, 8, dtype=torch.bool)  # h=4, w=8 (e.g. a 64x32 latent of a 2:1 image)
    grid[:, 4:] = True  # right half
    record = ResizeRecord(original_size=(120, 70), model_size=(64, 32), policy="keep_aspect")
    arr = np.asarray(mask_to_original(grid, record))
    assert arr.shape == (70, 120)
    assert (arr[:, 60:] == 255).all() and (arr[:, :60] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.int64, torch.uint8])
def test_mask_to_original_numeric_01(dtype: torch.dtype) -> None:
    grid = torch.zeros(64, 64, dtype=dtype)
    grid[:32] = 1
    record = ResizeRecord(original_size=(64, 128), model_size=(512, 512), policy="squash")
    arr = np.asarray(mask_to_original(grid, record))
    assert arr.shape == (128, 64)
    assert (arr[:64] == 255).all() and (arr[64:] == 0).all()


def test_mask_to_original_round_trip_through_prepare_image() -> None:
    image = np.zeros((64, 80, 3), dtype=np.uint8)
    _, record = prepare_image(image, 64, policy="squash")
    latent_mask = np.ones((8, 8), dtype=bool)
    out = mask_to_original(latent_mask, record)
    assert out.size == (80, 64)
    assert (np.asarray(out) == 255).all()


def test_mask_to_original_rejects_bad_masks() -> None:
    record = ResizeRecord(original_size=(64, 64), model_size=(64, 64), policy="squash")
    with pytest.raises(ValueError, match="2-D"):
        mask_to_original(np.zeros((1, 8, 8), dtype=bool), record)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        mask_to_original(np.full((8, 8), 2), record)
    with pytest.raises(TypeError, match="list"):
        mask_to_original([[0, 1]], record)  # type: ignore[arg-type]
