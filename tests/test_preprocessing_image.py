"""Image preprocessing parity with transformers' Molmo2ImageProcessor, RGB conversion, tiling, bad files."""

import io

import numpy as np
import pytest
from PIL import Image

from molmo2_jax.preprocessing import ImageConfig, ImageLoadError, load_image, preprocess_image
from molmo2_jax.preprocessing.image import select_tiling

ONE_STEP = 2 / 255 + 1e-6  # one uint8 step after normalisation to [-1, 1]


@pytest.fixture(scope="module")
def ref():
    from transformers import Molmo2ImageProcessor

    return Molmo2ImageProcessor()


def _random_image(h, w, seed=0):
    rs = np.random.RandomState(seed)
    # smooth gradients plus noise: exercises interpolation, not only noise
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 / max(w - 1, 1), yy * 255 / max(h - 1, 1), (xx + yy) % 256], -1)
    return np.clip(base + rs.randint(-40, 40, (h, w, 3)), 0, 255).astype(np.uint8)


def assert_matches_reference(ref_out, ours, step=ONE_STEP):
    assert ours.pixel_values.dtype == np.float32
    assert ours.pixel_values.shape == ref_out["pixel_values"].shape
    assert np.abs(ours.pixel_values - ref_out["pixel_values"]).max() <= step
    np.testing.assert_array_equal(ours.pooling_idx, ref_out["image_token_pooling"])
    assert list(ours.grid) == ref_out["image_grids"][0].tolist()
    assert ours.num_crops == ref_out["image_num_crops"][0]


@pytest.mark.parametrize(
    "h,w,max_crops",
    [
        (378, 378, 8),  # square, exact crop size
        (300, 900, 8),  # wide
        (900, 300, 8),  # tall
        (60, 90, 8),  # tiny (< 112 px: negative tiling arithmetic)
        (7, 13, 8),  # tinier than a patch
        (1500, 2600, 8),  # very large
        (700, 1400, 24),  # released eval setting
    ],
)
def test_image_matches_reference(ref, h, w, max_crops):
    img = _random_image(h, w)
    ref_out = ref(images=[img], max_crops=max_crops, return_tensors="np")
    ours = preprocess_image(img, ImageConfig(max_crops=max_crops))
    assert_matches_reference(ref_out, ours)


def test_per_channel_statistics_match_reference(ref):
    img = _random_image(200, 260, seed=7)
    mean, std = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
    ref_out = ref(images=[img], image_mean=mean, image_std=std, return_tensors="np")
    ours = preprocess_image(img, ImageConfig(image_mean=tuple(mean), image_std=tuple(std)))
    assert_matches_reference(ref_out, ours, step=1 / (min(std) * 255) + 1e-6)


@pytest.mark.parametrize("hw", [(480, 640), (1066, 1600), (3000, 3000), (1000, 100), (100, 200), (0, 0)])
def test_select_tiling_matches_reference(hw):
    from transformers.models.molmo2.image_processing_molmo2 import select_tiling as ref_select_tiling

    h, w = hw[0] - 112, hw[1] - 112
    assert select_tiling(h, w, 266, 8) == tuple(ref_select_tiling(h, w, 266, 8))


def _pil_variants():
    rgb = _random_image(50, 70, seed=3)
    gray = Image.fromarray(rgb[..., 0], mode="L")
    rgba = Image.fromarray(np.concatenate([rgb, rgb[..., :1]], -1), mode="RGBA")
    palette = Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    palette.info["transparency"] = 3
    return {"L": gray, "RGBA": rgba, "P+transparency": palette, "LA": rgba.convert("LA")}


@pytest.mark.parametrize("mode", list(_pil_variants()))
def test_rgb_conversion_matches_reference(ref, mode):
    img = _pil_variants()[mode]
    ref_out = ref(images=[img], return_tensors="np")
    assert_matches_reference(ref_out, preprocess_image(load_image(img)))


def test_array_inputs_match_reference(ref):
    rgb = _random_image(40, 30, seed=4)
    rgba = np.concatenate([rgb, rgb[..., 1:2]], -1)
    assert_matches_reference(ref(images=[rgba], return_tensors="np"), preprocess_image(load_image(rgba)))
    # a 2-D greyscale array (the reference rejects it) is the grey image on all three channels
    np.testing.assert_array_equal(load_image(rgb[..., 0]), np.repeat(rgb[..., :1], 3, axis=-1))


def _sixteen_bit_grey(h, w, seed):
    """uint16 values mostly in 0..400, a band across the whole range: saturation edges in every crop."""
    rs = np.random.RandomState(seed)
    grey = rs.randint(0, 400, (h, w)).astype(np.uint16)
    grey[: h // 8] = rs.randint(0, 65536, (h // 8, w))
    return grey


def _sixteen_bit_inputs(h, w):
    grey = _sixteen_bit_grey(h, w, seed=h)
    rgb = np.stack([grey, grey[::-1], np.minimum(grey, 300)], -1)
    alpha = np.full((h, w, 1), 65535, np.uint16)
    alpha[h // 2 : h // 2 + 8] = np.random.RandomState(w).randint(0, 65536, (8, w, 1))
    alpha[-3:] = 0  # fully transparent rows: white, which the reference's uint16 cast wraps to black
    return {
        "array HW1": grey[..., None],
        "array HW3": rgb,
        "array HW4": np.concatenate([rgb, alpha], -1),
        "PIL I;16": Image.fromarray(grey),
        "PIL I": Image.fromarray(grey.astype(np.int32) - 100),  # negatives too
    }


@pytest.mark.parametrize("hw", [(120, 160), (378, 378), (700, 500)])  # upscaled, unresized global view, tiled
@pytest.mark.parametrize("kind", ["array HW1", "array HW3", "array HW4", "PIL I;16", "PIL I"])
def test_sixteen_bit_matches_reference(ref, hw, kind):
    # The reference saturates 16-bit input (PIL modes when converted to RGB, arrays after resizing);
    # scaling to 8 bits would be far off these values.
    img = _sixteen_bit_inputs(*hw)[kind]
    ref_out = ref(images=[img], return_tensors="np")
    inside = (ref_out["pixel_values"] > -1) & (ref_out["pixel_values"] < 1)
    assert inside.mean() > 0.2  # not a blank image: grey levels and saturation edges both present
    assert_matches_reference(ref_out, preprocess_image(load_image(img)))


def test_sixteen_bit_png_file(ref, tmp_path):
    grey = _sixteen_bit_grey(90, 130, seed=1)
    path = tmp_path / "deep.png"
    Image.fromarray(grey).save(path)
    with Image.open(path) as img:
        assert img.mode == "I;16"
        ref_out = ref(images=[img], return_tensors="np")
    assert_matches_reference(ref_out, preprocess_image(load_image(path)))


def test_unsupported_array_dtype_is_named():
    with pytest.raises(ImageLoadError) as err:
        load_image(np.zeros((4, 4, 3), np.uint32), name="images[2]")
    assert str(err.value) == "images[2]: expected a uint8 or uint16 array, got dtype uint32"


def test_png_path_and_bytes(ref, tmp_path):
    img = _random_image(120, 90, seed=5)
    path = tmp_path / "a.png"
    Image.fromarray(img).save(path)
    np.testing.assert_array_equal(load_image(path), img)
    np.testing.assert_array_equal(load_image(path.read_bytes()), img)


def _png_bytes():
    buf = io.BytesIO()
    Image.fromarray(_random_image(64, 64)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize(
    "make,expected",
    [
        (lambda p: p, "image file not found: {p}"),
        (lambda p: (p.write_bytes(_png_bytes()[:300]), p)[1], "cannot read image {p}"),  # truncated
        (lambda p: (p.write_bytes(b"definitely not an image"), p)[1], "cannot read image {p}: not a recognised"),
        (lambda p: (p.write_bytes(b""), p)[1], "cannot read image {p}"),
    ],
    ids=["missing", "truncated", "garbage", "empty"],
)
def test_bad_image_files(tmp_path, make, expected):
    path = make(tmp_path / "bad.png")
    with pytest.raises(ImageLoadError) as err:
        load_image(path)
    msg = str(err.value)
    assert expected.format(p=path) in msg and "\n" not in msg


def test_bad_arrays():
    with pytest.raises(ImageLoadError, match="images\\[2\\].*dtype float64"):
        load_image(np.zeros((4, 4, 3)), name="images[2]")
    with pytest.raises(ImageLoadError, match="shape"):
        load_image(np.zeros((4, 4, 2), np.uint8))
