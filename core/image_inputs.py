"""Decoding and validating input images (init_image, mask_image, control[i].image), before any pixel is decoded.

Order of checks, cheapest first, so a hostile input costs little: where the image may come from (a URI only when
allowed), its encoded size (a base64 string's length says it before decoding it), its format (magic bytes, never a
file name: PNG, JPEG, WebP), its header's width and height (PIL's Image.open reads only the header), and only then
the pixels (a truncated file fails here). Every failure is a GenerationError of kind validation naming the
request's field (e.g. "init_image", "control.0.image") and saying the limit.

No Ray; PIL is imported on first use. The limits are core.image_fields.ImageInputLimits.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import io
import re
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Sequence

import numpy as np

from core.image_fields import ImageInputLimits
from core.schemas import ErrorKind, GenerationError

if TYPE_CHECKING:
    from PIL import Image as PILImage

FORMATS = ("png", "jpeg", "webp")
PIL_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}
# Formats worth naming when refused (a client sending a GIF should hear "gif", not "unknown bytes").
OTHER_MAGIC = ((b"GIF87a", "gif"), (b"GIF89a", "gif"), (b"BM", "bmp"), (b"II*\x00", "tiff"), (b"MM\x00*", "tiff"),
               (b"\x00\x00\x01\x00", "ico"), (b"8BPS", "psd"))
URI_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
DATA_URL_RE = re.compile(r"^data:(?P<media>[\w/+.-]*)(?P<params>(;[\w=.-]+)*?)(?P<b64>;base64)?,", re.IGNORECASE)
OUTPUT_MULTIPLE = 8  # latent downsampling of SD/SDXL VAEs


@dataclass(frozen=True)
class UriPolicy:
    """Which URIs an image field may name. HTTP: the configured prefixes (none by default); batch jobs: all."""

    prefixes: tuple[str, ...] = ()
    allow_all: bool = False
    config_field: str = "image_inputs.uri_allowlist.prefixes"  # named in the refusal, so operators know the knob

    def check(self, uri: str, field: str) -> None:
        if self.allow_all:
            return
        if not self.prefixes:
            raise invalid(field, f"{field}: image URIs are not accepted here (no allowlist configured: set "
                                 f"{self.config_field} in the serving config); send the image as base64 instead")
        if any(seg in ("..", ".") for seg in uri.split("://", 1)[1].split("/")):
            raise invalid(field, f"{field}: URI must not contain '.' or '..' path segments")
        if not any(uri.startswith(p) for p in self.prefixes):
            raise invalid(field, f"{field}: URI {uri[:200]!r} is not under an allowed prefix "
                                 f"({', '.join(self.prefixes)})")


NO_URIS = UriPolicy()
ANY_URI = UriPolicy(allow_all=True)


@dataclass(frozen=True)
class DecodedImage:
    """One validated, decoded input image."""

    field: str  # the request field it came from, e.g. "init_image" or "control.0.image"
    image: "PILImage.Image"  # mode RGB, L or RGBA (as asked), pixels loaded
    format: str  # png | jpeg | webp (what its bytes are, whatever its name said)
    sha256: str  # of the encoded bytes: the cache key of what is computed from it (encoded latents, control maps)
    num_bytes: int

    @property
    def width(self) -> int:
        return self.image.width

    @property
    def height(self) -> int:
        return self.image.height

    @property
    def size(self) -> tuple[int, int]:
        return self.image.size

    def array(self) -> np.ndarray:
        """HxWx3 (RGB), HxWx4 (RGBA) or HxW (L) uint8."""
        return np.asarray(self.image)


def invalid(field: str, message: str) -> GenerationError:
    return GenerationError(message, ErrorKind.VALIDATION, field)


def _mib(n: int) -> str:
    return f"{n / (1024 * 1024):.1f} MiB" if n >= 1024 * 1024 else f"{n} bytes"


def classify_source(source: str | bytes | bytearray | memoryview) -> Literal["bytes", "data_url", "uri", "base64"]:
    """How a source carries its image. Base64's alphabet has no ':', so a scheme:// prefix is never base64."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return "bytes"
    if source[:5].lower() == "data:":
        return "data_url"
    return "uri" if URI_RE.match(source) else "base64"


def _decode_base64(text: str, field: str, limits: ImageInputLimits) -> bytes:
    text = "".join(text.split())  # clients wrap base64 at 76 columns (MIME) or add a trailing newline
    # 4 characters carry 3 bytes: refuse before decoding anything.
    if len(text) // 4 * 3 > limits.max_bytes + 2:
        raise invalid(field, f"{field}: image is about {_mib(len(text) // 4 * 3)}, more than the limit "
                             f"{_mib(limits.max_bytes)}")
    text += "=" * (-len(text) % 4)  # some encoders drop the padding
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        try:  # URL-safe alphabet (-_ for +/), used by some JS clients
            return base64.b64decode(text, altchars=b"-_", validate=True)
        except (binascii.Error, ValueError):
            hint = "; a file path needs a URI such as file:///path/to/image.png" if text[:1] in "/." else ""
            raise invalid(field, f"{field}: not valid base64 (expected a base64 string, a data: URL or an allowed "
                                 f"URI{hint})") from None


def _read_uri(uri: str, field: str, limits: ImageInputLimits, uris: UriPolicy) -> bytes:
    uris.check(uri, field)
    import fsspec

    try:
        with fsspec.open(uri, "rb") as fh:
            data = fh.read(limits.max_bytes + 1)  # one byte over the limit is enough to refuse
    except FileNotFoundError:
        raise invalid(field, f"{field}: no such file {uri[:200]!r}") from None
    except Exception as err:  # noqa: BLE001 - any backend failure (auth, network, unknown protocol) is the caller's
        raise invalid(field, f"{field}: cannot read {uri[:200]!r}: {type(err).__name__}: {str(err)[:200]}") from None
    if len(data) > limits.max_bytes:
        raise invalid(field, f"{field}: image at {uri[:200]!r} is more than the limit {_mib(limits.max_bytes)}")
    return data


def load_bytes(source: str | bytes | bytearray | memoryview, field: str, limits: ImageInputLimits,
               uris: UriPolicy = NO_URIS) -> bytes:
    """The encoded bytes of `source`, within limits.max_bytes. Raises GenerationError(validation, field)."""
    kind = classify_source(source)
    if kind == "bytes":
        data = bytes(source)
    elif kind == "uri":
        data = _read_uri(source, field, limits, uris)
    elif kind == "data_url":
        m = DATA_URL_RE.match(source)
        if m is None or not m.group("b64"):
            raise invalid(field, f"{field}: a data: URL must be 'data:image/<png|jpeg|webp>;base64,<data>'")
        data = _decode_base64(source[m.end():], field, limits)
    else:
        data = _decode_base64(source, field, limits)
    if len(data) > limits.max_bytes:
        raise invalid(field, f"{field}: image is {_mib(len(data))}, more than the limit {_mib(limits.max_bytes)}")
    if not data:
        raise invalid(field, f"{field}: image is empty")
    return data


def sniff_format(data: bytes, field: str) -> str:
    """png | jpeg | webp from the magic bytes; anything else is refused, naming what it is when known."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    name = next((n for magic, n in OTHER_MAGIC if data.startswith(magic)), None)
    what = f"a {name.upper()} image" if name else "not a recognised image"
    raise invalid(field, f"{field}: {what}; accepted formats: PNG, JPEG, WebP")


def check_size(width: int, height: int, field: str, limits: ImageInputLimits) -> None:
    if width < limits.min_side or height < limits.min_side:
        raise invalid(field, f"{field}: image is {width}x{height}; each side must be at least {limits.min_side} px")
    if width > limits.max_side or height > limits.max_side:
        raise invalid(field, f"{field}: image is {width}x{height}; each side must be at most {limits.max_side} px")
    if width * height > limits.max_pixels:
        raise invalid(field, f"{field}: image is {width}x{height} = {width * height} pixels, more than the limit "
                             f"{limits.max_pixels}")


def decode_image(source: str | bytes | bytearray | memoryview, field: str, limits: ImageInputLimits,
                 uris: UriPolicy = NO_URIS, mode: Literal["RGB", "L", "RGBA"] | None = "RGB") -> DecodedImage:
    """Fetch/decode one input image and check every limit; the pixels are decoded last, after the header passed.

    mode: what the pixels are converted to; None keeps the file's own (e.g. to read an OpenAI mask's alpha).

    JPEG/WebP EXIF orientation is applied (the image as its viewer sees it); an animated file gives its first frame.
    """
    from PIL import Image, ImageOps

    data = load_bytes(source, field, limits, uris)
    fmt = sniff_format(data, field)
    # PIL warns above Image.MAX_IMAGE_PIXELS and raises above twice that, inside Image.open (header only). Our own
    # max_pixels (<= 8192^2, below PIL's default 89M) decides first for anything PIL would warn about, so the
    # warning is turned into the same refusal. catch_warnings is process-global: a concurrent thread may at worst
    # see this "error" filter too, which only makes it refuse a bomb as well.
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=[PIL_FORMATS[fmt]])
            width, height = img.size
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise invalid(field, f"{field}: image header claims too many pixels ({err}); the limit is "
                             f"{limits.max_pixels} pixels") from None
    except Exception as err:  # noqa: BLE001 - a corrupt header (PIL raises OSError, SyntaxError, ValueError...)
        raise invalid(field, f"{field}: cannot read the {fmt.upper()} header: {str(err)[:200]}") from None
    check_size(width, height, field, limits)
    try:
        img.load()  # ImageFile.LOAD_TRUNCATED_IMAGES stays False (PIL's default): a truncated file raises here
    except Exception as err:  # noqa: BLE001 - truncated or corrupt data (OSError "image file is truncated"...)
        raise invalid(field, f"{field}: the {fmt.upper()} data is truncated or corrupt: {str(err)[:200]}") from None
    if fmt != "png":
        img = ImageOps.exif_transpose(img)
    if mode is not None and img.mode != mode:
        img = _to_mode(img, mode)
    return DecodedImage(field, img, fmt, hashlib.sha256(data).hexdigest(), len(data))


def _has_alpha(img: "PILImage.Image") -> bool:
    return img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info)


def _to_mode(img: "PILImage.Image", mode: str) -> "PILImage.Image":
    from PIL import Image

    if img.mode == "I" or img.mode.startswith("I;16"):
        # 16-bit grayscale (depth maps often are): scale 0..65535 to 0..255; convert() alone would clip at 255.
        img = img.convert("I").point(lambda v: v * (1 / 257)).convert("L")
        if mode == "L":
            return img
    if mode == "RGB" and _has_alpha(img):
        # Transparent pixels become white, not whatever colour hides under alpha 0.
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert(mode)


# ---------------------------------------------------------------------------------------------------- masks, sizes

def check_same_size(mask: DecodedImage, init: DecodedImage) -> None:
    if mask.size != init.size:
        raise invalid(mask.field, f"{mask.field}: mask is {mask.width}x{mask.height} but {init.field} is "
                                  f"{init.width}x{init.height}; they must have the same size")


def repaint_mask(mask: "PILImage.Image", blur_px: int = 0) -> "PILImage.Image":
    """Our mask convention: mode L, white (255) = repaint, black = keep; blurred by `blur_px` (Gaussian radius)."""
    from PIL import ImageFilter

    out = mask.convert("L") if mask.mode != "L" else mask
    if blur_px > 0:
        out = out.filter(ImageFilter.GaussianBlur(blur_px))
    return out


def openai_mask_to_repaint(mask: DecodedImage) -> "PILImage.Image":
    """OpenAI's edits mask (transparent = repaint, the rest kept) as our L mask (white = repaint).

    OpenAI requires an alpha channel; a mask without one says nothing in its convention and is refused. Any alpha
    below 255 counts as transparency in proportion (alpha 0 -> 255 repaint, alpha 255 -> 0 keep).
    """
    from PIL import ImageChops

    img = mask.image
    if not _has_alpha(img):
        raise invalid(mask.field, f"{mask.field}: the mask must be a PNG with an alpha channel (transparent = "
                                  f"the area to edit); got mode {img.mode}")
    return ImageChops.invert(img.convert("RGBA").getchannel("A"))


def output_size(init_size: tuple[int, int] | None, width: int | None, height: int | None,
                multiple: int = OUTPUT_MULTIPLE) -> tuple[int | None, int | None]:
    """The size to generate at: width/height when given; else the init image's, rounded down to `multiple`.

    With one side given and an init image, the other follows the init image's aspect ratio (rounded down).
    Without an init image, (width, height) as given (None: the model's default).
    """
    if init_size is None or (width is not None and height is not None):
        return width, height
    iw, ih = init_size
    if width is None and height is None:
        w, h = iw, ih
    elif width is not None:
        w, h = width, ih * width / iw
    else:
        w, h = iw * height / ih, height
    return max(multiple, int(w) // multiple * multiple), max(multiple, int(h) // multiple * multiple)


# ---------------------------------------------------------------------------------------------------- whole request

@dataclass(frozen=True)
class RequestImages:
    """The decoded images of one request: init (RGB), mask (L, white = repaint, not yet blurred), controls (RGB)."""

    init: DecodedImage | None
    mask: DecodedImage | None
    controls: tuple[DecodedImage, ...]


def decode_request_images(init_image, mask_image, control_images: Sequence, limits: ImageInputLimits,
                          uris: UriPolicy = NO_URIS) -> RequestImages:
    """Decode and check every image of a request, naming each failure's field; the mask must match the init size."""
    init = decode_image(init_image, "init_image", limits, uris) if init_image is not None else None
    mask = decode_image(mask_image, "mask_image", limits, uris, mode="L") if mask_image is not None else None
    if mask is not None:
        if init is None:
            raise invalid("mask_image", "mask_image needs init_image")
        check_same_size(mask, init)
    controls = tuple(decode_image(src, f"control.{i}.image", limits, uris) for i, src in enumerate(control_images))
    return RequestImages(init, mask, controls)
