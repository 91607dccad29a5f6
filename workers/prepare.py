"""Prepare stage: image bytes in, an RGB image of the size the model wants, or `Failed`.

Checks run in the precedence of docs/ARCHITECTURE.md ("Error classes"): hash, is it an
image, declared dimensions (read from the header, before any pixel is decoded), then
decoding. The image is decoded as small as the target allows (JPEG DCT scaling via `draft`,
`reduce` for the rest) and resized once, so a 1600 px JPEG costs a few milliseconds, not tens.
With CLIP scoring on (`ImageSpec.clip_side`), a second, small image is kept for CLIP's own
processor: the decoded image with its shorter side brought down to CLIP's input side, resized
as that processor resizes (so its own resize is then a no-op and the scores are those of the
full decode), never the full-size decode itself.
"""

from __future__ import annotations

import hashlib
import io
import math
from dataclasses import dataclass
from importlib import metadata

import PIL
from PIL import Image, UnidentifiedImageError, features

from recap.errors import ErrorClass, Failure
from recap.records import ImageSpec
from workers.load_result import Failed

# Pillow's own decompression-bomb guard (a fixed ~179 MP cap) would overrule
# RECAP_MAX_PIXELS; `check_dimensions` reads the declared size first, before any decoding.
Image.MAX_IMAGE_PIXELS = None

CLIP_MEAN_RGB = (122, 116, 104)  # LLaVA's expand2square fill: the CLIP image mean, 0-255
WHITE = (255, 255, 255)
UNSIZED_MAX_SIDE = 1024  # spec.size None: keep the size, but never more than this side

# Raster formats seen on the web. A closed list also keeps Pillow's rarer decoders
# (and their attack surface) out of reach of untrusted bytes.
WEB_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "MPO", "AVIF")


def _openable(formats: tuple[str, ...]) -> tuple[str, ...]:
    """The `formats` this Pillow has an opener for: `Image.open` raises KeyError for any other
    name, before it tries the rest. Pillow 13 has no MPO opener (its JPEG opener reads MPO
    files and reports them as MPO); AVIF's opener is registered even without libavif."""
    Image.init()  # register every plugin now; Image.open would on its first call anyway
    return tuple(f for f in formats if f in Image.OPEN and (f != "AVIF" or features.check("avif")))


READ_FORMATS = _openable(WEB_FORMATS)
_DRAFTABLE = frozenset({"JPEG", "MPO"})
_ORIENTATION_TAG = 0x0112
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def pillow_build() -> str:
    """Which Pillow is installed: "Pillow-SIMD 12.1.1.post0" or "Pillow 13.0.0".

    Both install the same `PIL` package; Pillow-SIMD resizes several times faster
    (scripts/install-pillow-simd.sh), which is most of the CPU an image costs after decoding.
    """
    try:
        simd = metadata.version("pillow-simd") == PIL.__version__
    except metadata.PackageNotFoundError:
        simd = False
    return f"{'Pillow-SIMD' if simd else 'Pillow'} {PIL.__version__}"


# The codecs behind READ_FORMATS; a Pillow built without one reads fewer web images.
IMAGE_CODECS = ("jpg", "zlib", "webp", "libtiff", "avif")


def missing_codecs() -> list[str]:
    """The IMAGE_CODECS this Pillow lacks (a source build finds only the libraries present)."""
    return [name for name in IMAGE_CODECS if not features.check(name)]


@dataclass(frozen=True)
class ImageLimits:
    min_side: int = 32
    max_aspect: float = 10.0
    max_pixels: int = 100_000_000

    @classmethod
    def from_settings(cls, settings) -> ImageLimits:
        return cls(settings.min_side, settings.max_aspect, settings.max_pixels)


@dataclass(slots=True)
class PreparedImage:
    image: Image.Image  # RGB, sized per the ImageSpec
    sha256: str  # of the original bytes
    width: int  # of the original image, as displayed (EXIF orientation applied)
    height: int
    clip_image: Image.Image | None = None  # CLIP's thumbnail (spec.clip_side), or None


def prepare_image(
    data: bytes, spec: ImageSpec, limits: ImageLimits, expected_sha256: str | None = None
) -> PreparedImage | Failed:
    """Check and convert one image; `Failed` for anything wrong with it, never raises."""
    return prepare_hashed(data, hashlib.sha256(data).hexdigest(), spec, limits, expected_sha256)


def prepare_hashed(
    data: bytes, sha256: str, spec: ImageSpec, limits: ImageLimits, expected_sha256: str | None = None
) -> PreparedImage | Failed:
    """`prepare_image` with the sha256 of `data` already computed (the loader keeps it)."""
    if expected_sha256 and expected_sha256.strip().lower() != sha256:
        return Failed(
            Failure.of(
                ErrorClass.HASH_MISMATCH,
                f"sha256 {sha256} differs from the expected {expected_sha256.strip()}",
            )
        )
    im = _open(data)
    if isinstance(im, Failed):
        return im
    # Pixel count, shorter side and aspect do not depend on orientation: check first.
    failure = _check_dimensions(*im.size, limits)
    if failure is not None:
        return Failed(failure)
    orientation = _orientation(im)
    width, height = im.size if orientation < 5 else im.size[::-1]
    try:
        image, clip_image = _decode(im, spec, orientation)
    except Exception as exc:
        return Failed(Failure.of(ErrorClass.DECODE_ERROR, f"cannot decode the {im.format} image: {exc}"))
    return PreparedImage(image, sha256, width, height, clip_image)


def _check_dimensions(width: int, height: int, limits: ImageLimits) -> Failure | None:
    """`too_many_pixels`, `too_small` or `bad_aspect` from the declared size, in that order."""
    if width * height > limits.max_pixels:
        return Failure.of(
            ErrorClass.TOO_MANY_PIXELS,
            f"{width}x{height} is {width * height:,} pixels, over the "
            f"{limits.max_pixels:,} allowed (RECAP_MAX_PIXELS)",
        )
    short, long = sorted((width, height))
    if short < limits.min_side:
        return Failure.of(
            ErrorClass.TOO_SMALL,
            f"{width}x{height}: shorter side under {limits.min_side} px (RECAP_MIN_SIDE)",
        )
    if long / short > limits.max_aspect:
        return Failure.of(
            ErrorClass.BAD_ASPECT,
            f"{width}x{height}: aspect {long / short:.1f} over {limits.max_aspect:g} (RECAP_MAX_ASPECT)",
        )
    return None


# ---------------------------------------------------------------------------- open


def _open(data: bytes) -> Image.Image | Failed:
    """Open lazily (header only): no pixel is decoded here."""
    if not data:
        return Failed(Failure.of(ErrorClass.NOT_IMAGE, "empty body"))
    try:
        return Image.open(io.BytesIO(data), formats=READ_FORMATS)
    except UnidentifiedImageError:
        return Failed(Failure.of(ErrorClass.NOT_IMAGE, f"not an image we read ({_sniff(data)})"))
    except Exception as exc:
        return Failed(Failure.of(ErrorClass.NOT_IMAGE, f"unreadable image header: {exc}"))


def _sniff(data: bytes) -> str:
    head = data[:256].lstrip().lower()
    if head.startswith((b"<!doctype html", b"<html")) or b"<html" in head:
        return "looks like HTML"
    if b"<svg" in head:
        return "looks like SVG, a vector format"
    if head.startswith(b"<"):
        return "looks like XML"
    if head.startswith((b"{", b"[")):
        return "looks like JSON"
    return f"{len(data)} bytes starting {data[:8].hex()}"


def _orientation(im: Image.Image) -> int:
    """EXIF orientation from the header. Not `im.getexif()`: for a PNG that decodes the
    whole image to look for a late EXIF chunk, before our size checks could refuse it."""
    raw = im.info.get("exif")
    if not raw:
        return 1
    try:
        exif = Image.Exif()
        exif.load(raw)
        value = int(exif.get(_ORIENTATION_TAG, 1))
    except Exception:
        return 1
    return value if value in _TRANSPOSE else 1


# ---------------------------------------------------------------------------- decode


def _decode(im: Image.Image, spec: ImageSpec, orientation: int) -> tuple[Image.Image, Image.Image | None]:
    """The model's image, and CLIP's thumbnail where the spec asks for one."""
    want = _decode_size(im.size, spec)
    if want is not None and im.format in _DRAFTABLE:
        im.draft(im.mode, want)  # libjpeg scales by 1/2, 1/4 or 1/8 while decoding
    im.load()
    # From the decoded pixels, not the box-reduced ones: CLIP's processor on this image
    # makes the same input as on the full decode (JPEG's DCT scaling aside).
    clip = None if spec.clip_side is None else clip_thumbnail(_upright_rgb(im, orientation), spec.clip_side)
    if want is not None:
        im = _reduce(im, want)
    return _fit(_upright_rgb(im, orientation), spec), clip


def _upright_rgb(im: Image.Image, orientation: int) -> Image.Image:
    if orientation != 1:
        im = im.transpose(_TRANSPOSE[orientation])
    return _to_rgb(im)


def clip_thumbnail(im: Image.Image, side: int) -> Image.Image:
    """`im` with its shorter side brought down to `side`, as CLIP's processor resizes
    (transformers' shortest-edge rule, bicubic, no reducing gap); a smaller image as it is."""
    width, height = im.size
    short, long = sorted((width, height))
    if short <= side:
        return im
    long = int(side * long / short)
    size = (side, long) if width <= height else (long, side)
    return im.resize(size, Image.Resampling.BICUBIC)


def _scale(spec: ImageSpec, width: int, height: int) -> float:
    """Factor from this size to what the spec will make of it (<1 shrinks)."""
    if spec.size is None:
        return min(1.0, UNSIZED_MAX_SIDE / max(width, height))
    if spec.mode == "pad":
        return spec.size / max(width, height)
    return spec.size / min(width, height)


def _decode_size(size: tuple[int, int], spec: ImageSpec) -> tuple[int, int] | None:
    """The smallest size worth decoding to (>= what the final resize needs, and with CLIP's
    thumbnail wanted, >= its shorter side), or None."""
    scale = _scale(spec, *size)
    if spec.clip_side is not None:
        scale = max(scale, spec.clip_side / min(size))
    if scale >= 1:
        return None
    return (math.ceil(size[0] * scale), math.ceil(size[1] * scale))


def _reduce(im: Image.Image, want: tuple[int, int]) -> Image.Image:
    """Box-shrink by an integer factor while staying >= 2x the wanted size (cheap, clean)."""
    factor = min(im.size[0] // (2 * want[0]), im.size[1] // (2 * want[1]))
    if factor < 2 or im.mode in ("P", "1"):
        return im
    return im.reduce(factor)


def _to_rgb(im: Image.Image) -> Image.Image:
    """Any mode to RGB: alpha composited on white, 16-bit scaled down, palettes expanded."""
    if im.mode == "RGB":
        return im
    if im.has_transparency_data:
        rgba = im.convert("RGBA")
        out = Image.new("RGB", im.size, WHITE)
        out.paste(rgba, mask=rgba.getchannel("A"))
        return out
    if im.mode.startswith("I;16"):
        return im.convert("I").point(lambda v: v * (1 / 257)).convert("L").convert("RGB")
    if im.mode in ("I", "F"):
        high = im.getextrema()[1]
        if high > 255:
            im = im.point(lambda v: v * (255 / high))
        return im.convert("L").convert("RGB")
    return im.convert("RGB")


def _fit(im: Image.Image, spec: ImageSpec) -> Image.Image:
    """Resize once to the model's input."""
    size = spec.size
    width, height = im.size
    if size is None:
        scale = _scale(spec, width, height)
        if scale >= 1:
            return im
        target = (max(1, round(width * scale)), max(1, round(height * scale)))
        return im.resize(target, Image.Resampling.BICUBIC, reducing_gap=3.0)
    if spec.mode == "pad":
        return _pad_to_square(im, size)
    # crop: shorter side to `size`, then the centre square; done as one resize of the box
    # of the source that becomes that square.
    side = min(width, height)
    left, top = (width - side) / 2, (height - side) / 2
    return im.resize(
        (size, size), Image.Resampling.BICUBIC, box=(left, top, left + side, top + side), reducing_gap=3.0
    )


def _pad_to_square(im: Image.Image, size: int) -> Image.Image:
    """LLaVA's expand2square (centre on a square of the CLIP mean colour), then resize.

    Done in the other order, resize the content and paste it onto a `size` square, which
    gives the same picture (up to a pixel of rounding at the seam) and resizes only the
    content, not the padding: the resize is most of the CPU cost here.
    """
    width, height = im.size
    side = max(width, height)
    content = (max(1, round(width * size / side)), max(1, round(height * size / side)))
    if content != im.size:
        im = im.resize(content, Image.Resampling.BICUBIC, reducing_gap=3.0)
    if content == (size, size):
        return im
    square = Image.new("RGB", (size, size), CLIP_MEAN_RGB)
    square.paste(im, ((size - content[0]) // 2, (size - content[1]) // 2))
    return square
