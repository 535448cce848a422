"""Tests for :mod:`diffusers_conceptexpress.image_io` (input loading, validation, resizing); mask_to_original
is tested in test_masks.py."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffusers_conceptexpress.image_io import (
    MIN_IMAGE_SIZE,
    RESIZE_POLICIES,
    ImageInputError,
    ResizeRecord,
    compute_model_size,
    load_and_prepare_image,
    load_image,
    prepare_image,
)

W, H = 80, 64  # a small, non-square, valid image size (width, height)


def _pattern_rgb(width: int = W, height: int = H) -> np.ndarray:
    """Deterministic (H, W, 3) uint8 image with distinct values per pixel position."""
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([x * 3 % 256, y * 4 % 256, (x + y) % 256], axis=-1).astype(np.uint8)


def _assert_rgb(img: Image.Image, size: tuple[int, int] = (W, H)) -> np.ndarray:
    assert isinstance(img, Image.Image)
    assert img.mode == "RGB"
    assert img.size == size
    return np.asarray(img)


# ----------------------------------------------------------------------------------------------------
# Paths
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("as_str", [True, False], ids=["str", "pathlib"])
def test_load_from_path(tmp_path: Path, as_str: bool) -> None:
    expected = _pattern_rgb()
    path = tmp_path / "img.png"
    Image.fromarray(expected).save(path)
    out = _assert_rgb(load_image(str(path) if as_str else path))
    np.testing.assert_array_equal(out, expected)


def test_missing_file_raises_file_not_found(tmp_path: Path) -> None:
    path = tmp_path / "does_not_exist.png"
    with pytest.raises(FileNotFoundError) as info:
        load_image(path)
    message = str(info.value)
    assert str(path) in message
    assert "check" in message.lower()


def test_text_file_raises_image_input_error(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("this is not an image\n")
    with pytest.raises(ImageInputError) as info:
        load_image(str(path))
    assert str(path) in str(info.value)
    assert "not a readable image" in str(info.value)
    assert info.value.__cause__ is not None  # the PIL error is chained


def test_directory_raises_image_input_error(tmp_path: Path) -> None:
    with pytest.raises(ImageInputError, match="directory"):
        load_image(tmp_path)


def test_truncated_file_raises_image_input_error(tmp_path: Path) -> None:
    path = tmp_path / "truncated.png"
    Image.fromarray(_pattern_rgb()).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageInputError, match=re.escape("truncated.png")):
        load_image(path)


def test_image_input_error_is_value_error() -> None:
    assert issubclass(ImageInputError, ValueError)


# ----------------------------------------------------------------------------------------------------
# PIL modes
# ----------------------------------------------------------------------------------------------------


def test_pil_rgb_is_returned_as_copy() -> None:
    src = Image.fromarray(_pattern_rgb())
    out = load_image(src)
    np.testing.assert_array_equal(_assert_rgb(out), _pattern_rgb())
    assert out is not src


def test_pil_rgba_transparent_pixel_becomes_white() -> None:
    rgba = np.zeros((H, W, 4), dtype=np.uint8)
    rgba[..., 0] = 200  # opaque red-ish everywhere ...
    rgba[..., 3] = 255
    rgba[0, 0] = (10, 20, 30, 0)  # ... except one fully transparent pixel
    rgba[1, 1] = (0, 0, 0, 128)  # and one half-transparent black pixel
    src = Image.fromarray(rgba)
    assert src.mode == "RGBA"
    out = _assert_rgb(load_image(src))
    assert tuple(out[0, 0]) == (255, 255, 255)
    assert tuple(out[2, 2]) == (200, 0, 0)
    assert all(abs(int(v) - 127) <= 1 for v in out[1, 1])
    assert src.mode == "RGBA"  # the input is not modified


def test_pil_la_transparent_pixel_becomes_white() -> None:
    la = Image.new("LA", (W, H), (50, 255))
    la.putpixel((3, 4), (0, 0))
    out = _assert_rgb(load_image(la))
    assert tuple(out[4, 3]) == (255, 255, 255)
    assert tuple(out[0, 0]) == (50, 50, 50)


def test_pil_l() -> None:
    gray = _pattern_rgb()[..., 0]
    out = _assert_rgb(load_image(Image.fromarray(gray)))
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], gray)


def test_pil_p_without_transparency() -> None:
    rgb = Image.new("RGB", (W, H), (0, 128, 255))
    pal = rgb.quantize(colors=4)
    assert pal.mode == "P"
    out = _assert_rgb(load_image(pal))
    assert tuple(out[10, 10]) == tuple(np.asarray(pal.convert("RGB"))[10, 10])
    assert abs(int(out[10, 10, 1]) - 128) <= 2


def test_pil_p_with_transparency_becomes_white() -> None:
    pal = Image.new("P", (W, H), 1)
    pal.putpalette([0, 0, 0] + [255, 0, 0] + [0] * 3 * 254)
    pal.putpixel((5, 6), 0)
    pal.info["transparency"] = 0  # palette index 0 (black) is transparent
    out = _assert_rgb(load_image(pal))
    assert tuple(out[6, 5]) == (255, 255, 255)
    assert tuple(out[0, 0]) == (255, 0, 0)


def test_pil_p_with_transparency_from_png_file(tmp_path: Path) -> None:
    pal = Image.new("P", (W, H), 1)
    pal.putpalette([0, 0, 0] + [0, 0, 255] + [0] * 3 * 254)
    pal.putpixel((0, 0), 0)
    path = tmp_path / "pal.png"
    pal.save(path, transparency=0)
    out = _assert_rgb(load_image(path))
    assert tuple(out[0, 0]) == (255, 255, 255)
    assert tuple(out[1, 1]) == (0, 0, 255)


def test_pil_cmyk() -> None:
    cmyk = Image.new("CMYK", (W, H), (0, 0, 0, 0))  # no ink -> white
    cmyk.putpixel((1, 2), (0, 255, 255, 0))  # magenta + yellow -> red
    out = _assert_rgb(load_image(cmyk))
    assert tuple(out[0, 0]) == (255, 255, 255)
    assert tuple(out[2, 1]) == (255, 0, 0)


def test_pil_i16_is_scaled_not_clipped() -> None:
    values = np.zeros((H, W), dtype=np.uint16)
    values[0, 0] = 65535
    values[0, 1] = 32768
    values[0, 2] = 257
    img = Image.fromarray(values)
    assert img.mode == "I;16"
    out = _assert_rgb(load_image(img))
    assert tuple(out[0, 0]) == (255, 255, 255)
    assert out[0, 1, 0] == 128
    assert out[0, 2, 0] == 1  # clipping would give 255 here
    assert out[5, 5, 0] == 0


@pytest.mark.parametrize(
    ("dtype", "mode", "top", "other", "expected"),
    [(np.int32, "I", 1000, 500, 128), (np.float32, "F", 4000.0, 1000.0, 64)],
)
def test_pil_wide_modes_are_scaled_by_their_max(dtype, mode, top, other, expected) -> None:
    values = np.zeros((H, W), dtype=dtype)
    values[0, 0] = top
    values[0, 1] = other
    img = Image.fromarray(values)
    assert img.mode == mode
    out = _assert_rgb(load_image(img))
    assert out[0, 0, 0] == 255
    assert abs(int(out[0, 1, 0]) - expected) <= 1


def test_pil_i32_small_values_kept() -> None:
    values = np.full((H, W), 100, dtype=np.int32)
    out = _assert_rgb(load_image(Image.fromarray(values)))
    assert (out == 100).all()


def test_pil_mode_1() -> None:
    img = Image.new("1", (W, H), 0)
    img.putpixel((7, 8), 1)
    out = _assert_rgb(load_image(img))
    assert tuple(out[8, 7]) == (255, 255, 255)
    assert tuple(out[0, 0]) == (0, 0, 0)


@pytest.mark.parametrize("mode", ["YCbCr", "RGBX", "RGBa", "PA", "HSV"])
def test_other_pil_modes_convert_to_rgb(mode: str) -> None:
    img = Image.fromarray(_pattern_rgb()).convert(mode)
    _assert_rgb(load_image(img))


# ----------------------------------------------------------------------------------------------------
# EXIF orientation and multi-frame files
# ----------------------------------------------------------------------------------------------------


def _save_jpeg_with_orientation_6(path: Path) -> None:
    arr = np.zeros((70, 100, 3), dtype=np.uint8)  # width 100, height 70
    arr[:20, :20] = (255, 0, 0)  # red block in the top-left corner of the stored pixels
    img = Image.fromarray(arr)
    exif = img.getexif()
    exif[0x0112] = 6  # Orientation: rotate 90° clockwise to display
    img.save(path, exif=exif, quality=95)


def test_exif_orientation_from_file(tmp_path: Path) -> None:
    path = tmp_path / "rotated.jpg"
    _save_jpeg_with_orientation_6(path)
    with Image.open(path) as raw:
        assert raw.size == (100, 70)
    out = _assert_rgb(load_image(path), size=(70, 100))  # transposed
    # Rotating 90° clockwise moves the top-left corner to the top-right corner.
    assert out[5, 65, 0] > 200 and out[5, 65, 1] < 60
    assert out[5, 5, 0] < 60


def test_exif_orientation_from_pil_object(tmp_path: Path) -> None:
    path = tmp_path / "rotated.jpg"
    _save_jpeg_with_orientation_6(path)
    with Image.open(path) as raw:
        out = load_image(raw)
        assert raw.size == (100, 70)  # the caller's image is not modified
    _assert_rgb(out, size=(70, 100))


def _save_two_frame(path: Path, **kwargs: object) -> None:
    first = Image.new("RGB", (W, H), (255, 0, 0))
    second = Image.new("RGB", (W, H), (0, 0, 255))
    first.save(path, save_all=True, append_images=[second], **kwargs)


@pytest.mark.parametrize("suffix", [".gif", ".tiff"])
def test_multi_frame_file_uses_first_frame(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"anim{suffix}"
    _save_two_frame(path)
    with Image.open(path) as check:
        assert check.n_frames == 2
    out = _assert_rgb(load_image(path))
    r, g, b = (int(v) for v in out[10, 10])
    assert r > 200 and g < 50 and b < 50


def test_multi_frame_pil_object_uses_first_frame_and_restores_position(tmp_path: Path) -> None:
    path = tmp_path / "anim.gif"
    _save_two_frame(path)
    with Image.open(path) as anim:
        anim.seek(1)
        out = _assert_rgb(load_image(anim))
        assert anim.tell() == 1
    r, _, b = (int(v) for v in out[10, 10])
    assert r > 200 and b < 50


# ----------------------------------------------------------------------------------------------------
# numpy
# ----------------------------------------------------------------------------------------------------


def test_numpy_uint8_rgb() -> None:
    arr = _pattern_rgb()
    np.testing.assert_array_equal(_assert_rgb(load_image(arr)), arr)


def test_numpy_float_rgb() -> None:
    arr = _pattern_rgb()
    out = _assert_rgb(load_image(arr.astype(np.float32) / 255.0))
    np.testing.assert_array_equal(out, arr)


def test_numpy_float_within_tolerance_is_clipped() -> None:
    arr = np.full((H, W, 3), 1.0005, dtype=np.float64)
    arr[0, 0] = -0.0005
    out = _assert_rgb(load_image(arr))
    assert tuple(out[1, 1]) == (255, 255, 255)
    assert tuple(out[0, 0]) == (0, 0, 0)


@pytest.mark.parametrize("shape", [(H, W), (H, W, 1)])
def test_numpy_grayscale(shape: tuple[int, ...]) -> None:
    arr = np.full(shape, 77, dtype=np.uint8)
    out = _assert_rgb(load_image(arr))
    assert (out == 77).all()


def test_numpy_bool_is_treated_as_grayscale() -> None:
    arr = np.zeros((H, W), dtype=bool)
    arr[3, 4] = True
    out = _assert_rgb(load_image(arr))
    assert tuple(out[3, 4]) == (255, 255, 255)
    assert tuple(out[0, 0]) == (0, 0, 0)


def test_numpy_rgba_is_composited_on_white() -> None:
    arr = np.zeros((H, W, 4), dtype=np.uint8)
    arr[..., 2] = 255
    arr[..., 3] = 255
    arr[0, 0, 3] = 0
    out = _assert_rgb(load_image(arr))
    assert tuple(out[0, 0]) == (255, 255, 255)
    assert tuple(out[1, 1]) == (0, 0, 255)


def test_numpy_input_not_modified() -> None:
    arr = np.random.default_rng(0).random((H, W, 4))
    before = arr.copy()
    load_image(arr)
    np.testing.assert_array_equal(arr, before)


def test_numpy_int64_in_range_is_accepted() -> None:
    arr = _pattern_rgb().astype(np.int64)
    np.testing.assert_array_equal(_assert_rgb(load_image(arr)), arr)


@pytest.mark.parametrize("low, high", [(-1.0, 1.0), (0.0, 255.0), (0.0, 1.01)])
def test_numpy_float_out_of_range(low: float, high: float) -> None:
    arr = np.full((H, W, 3), 0.5, dtype=np.float32)
    arr[0, 0, 0] = low
    arr[0, 1, 0] = high
    with pytest.raises(ImageInputError) as info:
        load_image(arr)
    message = str(info.value)
    assert f"{low:.4g}" in message and f"{high:.4g}" in message
    assert "[0, 1]" in message
    assert "(x + 1) / 2" in message


def test_numpy_float_nan_rejected() -> None:
    arr = np.full((H, W, 3), 0.5, dtype=np.float32)
    arr[0, 0, 0] = np.nan
    with pytest.raises(ImageInputError, match="NaN"):
        load_image(arr)


def test_numpy_int_out_of_range_rejected() -> None:
    arr = np.full((H, W), 300, dtype=np.int32)
    with pytest.raises(ImageInputError, match="300"):
        load_image(arr)


@pytest.mark.parametrize("shape", [(H, W, 2), (H, W, 5), (H * W,), (1, H, W, 3)])
def test_numpy_bad_shapes(shape: tuple[int, ...]) -> None:
    with pytest.raises(ImageInputError) as info:
        load_image(np.zeros(shape, dtype=np.uint8))
    message = str(info.value)
    assert str(shape) in message
    assert "(H, W, 3)" in message


def test_numpy_channels_first_gets_hint() -> None:
    with pytest.raises(ImageInputError, match=re.escape("transpose(1, 2, 0)")):
        load_image(np.zeros((3, H, W), dtype=np.uint8))


# ----------------------------------------------------------------------------------------------------
# torch
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("batched", [False, True], ids=["CHW", "1CHW"])
def test_torch_float(batched: bool) -> None:
    expected = _pattern_rgb()
    tensor = torch.from_numpy(expected).permute(2, 0, 1).float() / 255.0
    if batched:
        tensor = tensor.unsqueeze(0)
    tensor.requires_grad_(True)
    np.testing.assert_array_equal(_assert_rgb(load_image(tensor)), expected)


@pytest.mark.parametrize("batched", [False, True], ids=["CHW", "1CHW"])
def test_torch_uint8(batched: bool) -> None:
    expected = _pattern_rgb()
    tensor = torch.from_numpy(expected).permute(2, 0, 1)
    if batched:
        tensor = tensor.unsqueeze(0)
    np.testing.assert_array_equal(_assert_rgb(load_image(tensor)), expected)


def test_torch_single_channel_and_rgba() -> None:
    gray = torch.full((1, H, W), 0.5, dtype=torch.float16)
    out = _assert_rgb(load_image(gray))
    assert (out == 128).all()
    rgba = torch.zeros((4, H, W))
    rgba[3] = 1.0
    rgba[3, 0, 0] = 0.0
    out = _assert_rgb(load_image(rgba))
    assert tuple(out[0, 0]) == (255, 255, 255)
    assert tuple(out[1, 1]) == (0, 0, 0)


def test_torch_batch_of_two_rejected() -> None:
    with pytest.raises(ImageInputError, match="one image at a time"):
        load_image(torch.zeros(2, 3, H, W))


@pytest.mark.parametrize("shape", [(H, W), (2, H, W), (H, W, 3), (1, 1, 3, H, W)])
def test_torch_bad_shapes(shape: tuple[int, ...]) -> None:
    with pytest.raises(ImageInputError) as info:
        load_image(torch.zeros(shape))
    assert str(shape) in str(info.value)
    assert "(C, H, W)" in str(info.value)


def test_torch_float_out_of_range() -> None:
    tensor = torch.full((3, H, W), -1.0)
    with pytest.raises(ImageInputError, match=re.escape("(x + 1) / 2")):
        load_image(tensor)


# ----------------------------------------------------------------------------------------------------
# Type and size validation
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value, type_name", [(3.5, "float"), ([[0, 1]], "list"), (None, "NoneType"), (b"img.png", "bytes")]
)
def test_wrong_type_raises_type_error(value: object, type_name: str) -> None:
    with pytest.raises(TypeError) as info:
        load_image(value)  # type: ignore[arg-type]
    message = str(info.value)
    assert type_name in message
    assert "PIL.Image.Image" in message and "numpy.ndarray" in message and "torch.Tensor" in message


@pytest.mark.parametrize("size", [(63, 100), (100, 63)])
def test_too_small_image_rejected(size: tuple[int, int]) -> None:
    with pytest.raises(ImageInputError) as info:
        load_image(Image.new("RGB", size))
    assert "63" in str(info.value)
    assert str(MIN_IMAGE_SIZE) in str(info.value)


def test_too_small_file_rejected(tmp_path: Path) -> None:
    path = tmp_path / "small.png"
    Image.new("RGB", (63, 100)).save(path)
    with pytest.raises(ImageInputError, match="63"):
        load_image(path)


def test_minimum_size_accepted() -> None:
    _assert_rgb(load_image(Image.new("RGB", (64, 64))), size=(64, 64))


# ----------------------------------------------------------------------------------------------------
# Resizing
# ----------------------------------------------------------------------------------------------------


def test_resize_policies_constant() -> None:
    assert RESIZE_POLICIES == ("squash", "keep_aspect")


@pytest.mark.parametrize("original", [(1000, 500), (500, 1000), (512, 512), (64, 64)])
def test_squash_ignores_aspect(original: tuple[int, int]) -> None:
    assert compute_model_size(original, 512, 8, "squash") == (512, 512)


def test_keep_aspect_landscape_2_to_1_multiple_64() -> None:
    width, height = compute_model_size((1000, 500), 512, 64, "keep_aspect")
    assert width % 64 == 0 and height % 64 == 0
    assert width == 2 * height
    assert 0.75 * 512**2 <= width * height <= 1.25 * 512**2
    assert (width, height) == (768, 384)


def test_keep_aspect_portrait_is_transposed() -> None:
    assert compute_model_size((500, 1000), 512, 64, "keep_aspect") == (384, 768)


def test_keep_aspect_square_gives_resolution() -> None:
    assert compute_model_size((300, 300), 512, 8, "keep_aspect") == (512, 512)


def test_keep_aspect_4_3_multiple_8() -> None:
    width, height = compute_model_size((640, 480), 512, 8, "keep_aspect")
    assert width % 8 == 0 and height % 8 == 0
    assert width / height == pytest.approx(4 / 3, rel=0.02)
    assert width * height == pytest.approx(512**2, rel=0.05)


def test_keep_aspect_extreme_ratio_at_least_multiple() -> None:
    width, height = compute_model_size((10000, 64), 512, 64, "keep_aspect")
    assert height == 64 and width % 64 == 0 and width > height


@pytest.mark.parametrize("resolution, multiple", [(500, 8), (0, 8), (-512, 8), (512, 0), (100, 64)])
def test_invalid_resolution_rejected(resolution: int, multiple: int) -> None:
    with pytest.raises(ValueError, match="multiple"):
        compute_model_size((100, 100), resolution, multiple, "squash")


def test_unknown_policy_lists_policies() -> None:
    with pytest.raises(ValueError) as info:
        compute_model_size((100, 100), 512, 8, "crop")
    assert "crop" in str(info.value)
    for name in RESIZE_POLICIES:
        assert name in str(info.value)


# ----------------------------------------------------------------------------------------------------
# prepare_image
# ----------------------------------------------------------------------------------------------------


def test_prepare_image_squash() -> None:
    pixels, record = prepare_image(_pattern_rgb(), 128)
    assert pixels.shape == (1, 3, 128, 128)
    assert pixels.dtype == torch.float32
    assert pixels.min() >= -1.0 and pixels.max() <= 1.0
    assert record == ResizeRecord(original_size=(W, H), model_size=(128, 128), policy="squash")


def test_prepare_image_keep_aspect() -> None:
    pixels, record = prepare_image(Image.new("RGB", (1000, 500)), 512, multiple=64, policy="keep_aspect")
    assert record.original_size == (1000, 500)
    assert record.model_size == (768, 384)
    assert record.policy == "keep_aspect"
    assert pixels.shape == (1, 3, 384, 768)


def test_prepare_image_value_mapping() -> None:
    white, _ = prepare_image(Image.new("RGB", (64, 64), (255, 255, 255)), 64)
    black, _ = prepare_image(Image.new("RGB", (64, 64), (0, 0, 0)), 64)
    assert torch.equal(white, torch.ones(1, 3, 64, 64))
    assert torch.equal(black, -torch.ones(1, 3, 64, 64))
    red, _ = prepare_image(Image.new("RGB", (80, 80), (255, 0, 0)), 64)
    assert torch.allclose(red[0, 0], torch.ones(64, 64)) and torch.allclose(red[0, 1], -torch.ones(64, 64))


def test_prepare_image_without_resize_is_exact() -> None:
    arr = _pattern_rgb(64, 64)
    pixels, _ = prepare_image(arr, 64)
    expected = torch.from_numpy(arr).permute(2, 0, 1).float() / 127.5 - 1.0
    torch.testing.assert_close(pixels[0], expected)


def test_prepare_image_checks_arguments_before_loading(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="policy"):
        prepare_image(tmp_path / "missing.png", 512, policy="nope")
    with pytest.raises(ValueError, match="policy"):
        load_and_prepare_image(tmp_path / "missing.png", 512, policy="nope")


def test_load_and_prepare_image_gives_the_loaded_image_and_the_same_model_input(tmp_path: Path) -> None:
    path = tmp_path / "pattern.png"
    Image.fromarray(_pattern_rgb()).save(path)
    rgb, pixels, record = load_and_prepare_image(path, 32, policy="keep_aspect")
    np.testing.assert_array_equal(_assert_rgb(rgb), np.asarray(load_image(path)))
    expected_pixels, expected_record = prepare_image(path, 32, policy="keep_aspect")
    assert torch.equal(pixels, expected_pixels) and record == expected_record
