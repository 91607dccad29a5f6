"""The prepare stage: checks in the order of docs/ARCHITECTURE.md ("Error classes"), every mode to
RGB, the model's size."""

from __future__ import annotations

import hashlib
import io
import time
import zlib

import pytest
from PIL import Image, UnidentifiedImageError, features

from recap.errors import ErrorClass as E
from recap.records import ImageSpec
from tests.support import http_server as srv
from workers.load_result import Failed
from workers.prepare import (
    CLIP_MEAN_RGB,
    READ_FORMATS,
    WEB_FORMATS,
    ImageLimits,
    PreparedImage,
    missing_codecs,
    prepare_image,
)

LIMITS = ImageLimits(min_side=8, max_aspect=10.0, max_pixels=100_000_000)
PAD = ImageSpec(336, "pad")
CROP = ImageSpec(336, "crop")
KEEP = ImageSpec(None)


def encode(im: Image.Image, fmt: str, **kwargs) -> bytes:
    out = io.BytesIO()
    im.save(out, fmt, **kwargs)
    return out.getvalue()


def ok(result) -> PreparedImage:
    assert isinstance(result, PreparedImage), result
    assert result.image.mode == "RGB"
    return result


def failed(result) -> E:
    assert isinstance(result, Failed), result
    assert result.failure.message and "\n" not in result.failure.message
    return result.failure.error_class


def close(a, b, tol=12) -> bool:
    return all(abs(x - y) <= tol for x, y in zip(a, b, strict=True))


# ---------------------------------------------------------------------------- formats, modes


@pytest.mark.parametrize(
    "fmt, mode",
    [
        ("JPEG", ""),
        ("JPEG", "L"),
        ("JPEG", "CMYK"),
        ("PNG", ""),
        ("PNG", "RGBA"),
        ("PNG", "LA"),
        ("PNG", "P"),
        ("PNG", "PT"),
        ("PNG", "L"),
        ("PNG", "1"),
        ("PNG", "I;16"),
        ("WEBP", ""),
        ("WEBP", "RGBA"),
        ("GIF", ""),
        ("BMP", ""),
        ("BMP", "L"),
    ],
)
@pytest.mark.parametrize("spec", [PAD, CROP, KEEP], ids=["pad", "crop", "keep"])
def test_every_mode_becomes_rgb_of_the_right_size(fmt, mode, spec):
    data = srv.render_image(120, 80, fmt, seed=11, mode=mode)
    result = ok(prepare_image(data, spec, LIMITS))
    assert (result.width, result.height) == (120, 80)
    assert result.image.size == ((336, 336) if spec.size else (120, 80))
    assert result.sha256 == hashlib.sha256(data).hexdigest()


def test_alpha_is_composited_on_white():
    clear = Image.new("RGBA", (64, 64), (255, 0, 0, 0))
    result = ok(prepare_image(encode(clear, "PNG"), CROP, LIMITS))
    assert result.image.getpixel((168, 168)) == (255, 255, 255)


def test_palette_transparency_is_composited_on_white():
    im = Image.new("P", (64, 64), 1)
    im.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    result = ok(prepare_image(encode(im, "PNG", transparency=1), CROP, LIMITS))
    assert result.image.getpixel((10, 10)) == (255, 255, 255)


def test_sixteen_bit_grey_is_scaled_not_clipped():
    raw = (40000).to_bytes(2, "little") * (64 * 64)
    im = Image.frombytes("I;16", (64, 64), raw)
    result = ok(prepare_image(encode(im, "PNG"), CROP, LIMITS))
    r, g, b = result.image.getpixel((100, 100))
    assert r == g == b and 150 <= r <= 160  # 40000 / 257 ~ 155, not 255


def test_cmyk_colours_survive():
    im = Image.new("RGB", (64, 64), (200, 30, 30)).convert("CMYK")
    result = ok(prepare_image(encode(im, "JPEG", quality=95), CROP, LIMITS))
    assert close(result.image.getpixel((168, 168)), (200, 30, 30), tol=25)


def test_animated_gif_uses_the_first_frame():
    result = ok(prepare_image(srv._anim_gif(), CROP, LIMITS))
    assert close(result.image.getpixel((168, 168)), (255, 0, 0))


def test_exif_orientation_is_applied_and_reported():
    data = srv.render_image(80, 40, "JPEG", seed=3, exif_rotate=True)
    result = ok(prepare_image(data, KEEP, LIMITS))
    assert (result.width, result.height) == (40, 80)
    assert result.image.size == (40, 80)


def web_image(fmt: str) -> bytes:
    """A small image encoded as `fmt` by the installed Pillow (MPO: two frames, as a camera's)."""
    im = Image.open(io.BytesIO(srv.render_image(96, 64, "PNG", seed=5))).convert("RGB")
    if fmt == "MPO":
        return encode(im, "MPO", save_all=True, append_images=[im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)])
    return encode(im, fmt)


@pytest.mark.parametrize("fmt", WEB_FORMATS)
def test_every_web_format_decodes_with_the_installed_pillow(fmt):
    if fmt == "AVIF" and not features.check("avif"):
        # A Pillow without libavif reads no AVIF, and says so where the worker starts.
        assert "avif" in missing_codecs() and "AVIF" not in READ_FORMATS
        return
    data = web_image(fmt)
    assert Image.open(io.BytesIO(data)).format == fmt  # the test made what it names
    result = ok(prepare_image(data, PAD, LIMITS))
    assert (result.width, result.height) == (96, 64)
    assert result.image.size == (336, 336)


def test_no_listed_format_lost_its_opener():
    """Dependency drift fails here, loudly: every format we name has an opener in this Pillow,
    except MPO where the JPEG opener reads it (Pillow 13) and AVIF where libavif is absent."""
    Image.init()
    assert set(READ_FORMATS) <= set(Image.OPEN)
    lost = set(WEB_FORMATS) - set(READ_FORMATS)
    assert lost <= {"MPO", "AVIF"}, lost
    assert ("AVIF" in READ_FORMATS) == features.check("avif")
    if "MPO" in lost:
        mpo = Image.open(io.BytesIO(web_image("MPO")), formats=READ_FORMATS)
        assert mpo.format == "MPO"
    with pytest.raises(UnidentifiedImageError):  # not KeyError: every name is known
        Image.open(io.BytesIO(b"not an image"), formats=READ_FORMATS)


# ---------------------------------------------------------------------------- geometry


def test_pad_is_llava_expand2square_with_the_clip_mean():
    red = Image.new("RGB", (200, 100), (255, 0, 0))
    result = ok(prepare_image(encode(red, "PNG"), ImageSpec(100, "pad"), LIMITS))
    image = result.image
    assert image.size == (100, 100)
    assert image.getpixel((50, 5)) == CLIP_MEAN_RGB  # top band: padding
    assert image.getpixel((50, 95)) == CLIP_MEAN_RGB  # bottom band
    assert close(image.getpixel((50, 50)), (255, 0, 0), tol=2)  # the picture, centred
    assert close(image.getpixel((2, 50)), (255, 0, 0), tol=2)  # full width


def test_crop_keeps_the_centre():
    im = Image.new("RGB", (300, 100))
    for i, colour in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255)]):
        im.paste(colour, (100 * i, 0, 100 * (i + 1), 100))
    result = ok(prepare_image(encode(im, "PNG"), ImageSpec(64, "crop"), LIMITS))
    for xy in [(2, 2), (61, 61), (32, 32)]:
        assert close(result.image.getpixel(xy), (0, 255, 0), tol=30), xy


def test_keep_caps_the_longer_side_at_1024():
    data = encode(Image.new("RGB", (2048, 1000), (9, 9, 9)), "JPEG")
    result = ok(prepare_image(data, KEEP, LIMITS))
    assert result.image.size == (1024, 500)
    assert (result.width, result.height) == (2048, 1000)


def cpu_seconds(fn, repeat: int = 3) -> float:
    start = time.process_time()
    for _ in range(repeat):
        fn()
    return (time.process_time() - start) / repeat


def test_large_jpeg_is_decoded_small_and_fast():
    smooth = Image.merge("RGB", [Image.linear_gradient("L").resize((3000, 2000))] * 3)
    data = encode(smooth, "JPEG", quality=90)
    result = ok(prepare_image(data, PAD, LIMITS))
    assert (result.width, result.height) == (3000, 2000)
    assert result.image.size == (336, 336)
    # Draft mode decodes at 1/8 scale: far cheaper than merely decoding at full size.
    ours = cpu_seconds(lambda: prepare_image(data, PAD, LIMITS))
    full = cpu_seconds(lambda: Image.open(io.BytesIO(data)).load())
    assert ours < 0.5 * full, (ours, full)


def test_a_square_image_at_the_target_size_is_kept():
    data = srv.render_image(336, 336, "PNG", seed=8)
    assert ok(prepare_image(data, PAD, LIMITS)).image.size == (336, 336)


# ---------------------------------------------------------------------------- failures


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"<!doctype html><html><body>nope</body></html>",
        srv._SVG,
        b"just some text, not an image at all",
        b'{"error": "not found"}',
        bytes(range(256)) * 4,
    ],
    ids=["empty", "html", "svg", "text", "json", "binary"],
)
def test_not_an_image(data):
    assert failed(prepare_image(data, PAD, LIMITS)) is E.NOT_IMAGE


@pytest.mark.parametrize(
    "data, hint",
    [
        (b"<!doctype html><html><body>nope</body></html>", "looks like HTML"),
        (b'{"error": "not found"}', "looks like JSON"),
        (srv._SVG, "looks like SVG, a vector format"),
        (b"<?xml version='1.0'?><feed/>", "looks like XML"),
        (b"just some text, not an image at all", "35 bytes starting 6a75737420736f6d"),
    ],
    ids=["html", "json", "svg", "xml", "text"],
)
def test_not_an_image_says_what_it_looks_like(data, hint):
    result = prepare_image(data, PAD, LIMITS)
    assert failed(result) is E.NOT_IMAGE
    assert result.failure.message == f"not an image we read ({hint})"


def test_hash_checked_first_and_case_insensitively():
    data = srv.render_image(64, 48, "JPEG", seed=1)
    digest = hashlib.sha256(data).hexdigest()
    assert ok(prepare_image(data, PAD, LIMITS, expected_sha256=digest.upper()))
    assert failed(prepare_image(data, PAD, LIMITS, expected_sha256="0" * 64)) is E.HASH_MISMATCH
    # hash_mismatch comes before not_image
    assert failed(prepare_image(b"<html>", PAD, LIMITS, "0" * 64)) is E.HASH_MISMATCH


def test_decompression_bomb_is_too_many_pixels_without_decoding():
    start = time.monotonic()
    assert failed(prepare_image(srv._bomb_png(), PAD, LIMITS)) is E.TOO_MANY_PIXELS
    assert time.monotonic() - start < 1.0


def test_declared_pixels_over_the_limit():
    data = srv.render_image(200, 200, "PNG", seed=2)
    limits = ImageLimits(min_side=8, max_aspect=10, max_pixels=10_000)
    assert failed(prepare_image(data, PAD, limits)) is E.TOO_MANY_PIXELS


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_a_bomb_under_pillows_own_limit_is_caught_by_ours():
    # 12000 x 12000 = 144 MP: over our 100 MP, between Pillow's warning and error limits.
    header = srv._png_chunk(b"IHDR", (12000).to_bytes(4, "big") * 2 + bytes([1, 0, 0, 0, 0]))
    # Real (if dull) image data: decoding it would allocate 144 MP. It must not be decoded.
    body = srv._png_chunk(b"IDAT", zlib.compress(b"\0" * (1 + 12000 // 8) * 12000))
    data = b"\x89PNG\r\n\x1a\n" + header + body + srv._png_chunk(b"IEND", b"")
    start = time.monotonic()
    assert failed(prepare_image(data, PAD, LIMITS)) is E.TOO_MANY_PIXELS
    assert time.monotonic() - start < 0.5


def test_too_small_and_bad_aspect():
    tiny = srv.render_image(4, 4, "PNG", seed=1)
    wide = srv.render_image(1000, 10, "PNG", seed=2)
    assert failed(prepare_image(tiny, PAD, LIMITS)) is E.TOO_SMALL
    assert failed(prepare_image(wide, PAD, LIMITS)) is E.BAD_ASPECT
    # too_small wins over bad_aspect
    assert failed(prepare_image(wide, PAD, ImageLimits(min_side=32))) is E.TOO_SMALL


def test_truncated_and_corrupt_images_are_decode_errors():
    data = srv.render_image(200, 150, "JPEG", seed=4)
    assert failed(prepare_image(data[: len(data) // 2], PAD, LIMITS)) is E.DECODE_ERROR
    assert failed(prepare_image(srv._corrupt_png(), PAD, LIMITS)) is E.DECODE_ERROR


def test_limits_from_settings():
    from recap.settings import Settings

    limits = ImageLimits.from_settings(Settings(min_side=5, max_aspect=3.0, max_pixels=99))
    assert limits == ImageLimits(5, 3.0, 99)


def test_max_pixels_can_be_raised_past_pillows_own_cap():
    """RECAP_MAX_PIXELS decides, not Pillow's fixed ~179 MP bomb guard: a 196 MP header
    under a 300 MP limit passes the size checks (its missing pixel data then fails)."""
    header = srv._png_chunk(b"IHDR", (14000).to_bytes(4, "big") * 2 + bytes([1, 0, 0, 0, 0]))
    data = b"\x89PNG\r\n\x1a\n" + header + srv._png_chunk(b"IEND", b"")
    assert failed(prepare_image(data, PAD, ImageLimits(max_pixels=300_000_000))) is E.DECODE_ERROR
    assert failed(prepare_image(data, PAD, LIMITS)) is E.TOO_MANY_PIXELS
