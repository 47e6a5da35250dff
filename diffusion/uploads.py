"""Images that people hand us for inpainting (a file on the command line, an upload or a drawing on the demo
page): checked, decoded and brought to the model's size, with one-line errors for anything else."""
from __future__ import annotations

import io
import struct
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from diffusion.errors import UserError

MAX_BYTES = 4_000_000
MAX_SIDE = 2048  # checked in the PNG header before decoding, so a small file cannot unpack into gigabytes
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
REGIONS = ("bottom", "top", "left", "right")  # named masks: the part that is generated


def decode_square_png(data: bytes, size: int, channels: int, what: str = "image") -> torch.Tensor:
    """PNG bytes -> uint8 (channels, size, size). A square of any side up to MAX_SIDE is resized to `size`."""
    if len(data) > MAX_BYTES:
        raise UserError(f"the {what} is {len(data) / 1e6:.1f} MB; at most {MAX_BYTES / 1e6:g} MB")
    if not data.startswith(PNG_SIGNATURE) or len(data) < 24 or data[12:16] != b"IHDR":
        raise UserError(f"the {what} is not a PNG file")
    width, height = struct.unpack(">II", data[16:24])
    if width != height or not 0 < width <= MAX_SIDE:
        raise UserError(f"the {what} is {width} x {height} pixels; it must be square, at most {MAX_SIDE} pixels a side")
    try:
        with Image.open(io.BytesIO(data), formats=["PNG"]) as png:
            pixels = np.array(as_viewed(png).convert("L" if channels == 1 else "RGB"))
    except (OSError, ValueError, SyntaxError) as err:  # what Pillow raises on damaged or truncated files
        raise UserError(f"the {what} is a damaged PNG ({str(err).splitlines()[0][:120]})") from None
    image = torch.from_numpy(pixels).view(width, width, -1).permute(2, 0, 1)
    if width != size:  # each pixel the mean of the area it covers: a 280 px half-mask stays an exact half
        image = F.interpolate(image[None].float(), size=(size, size), mode="area")[0].round().to(torch.uint8)
    return image


def as_viewed(png: Image.Image) -> Image.Image:
    """The 8-bit picture a viewer shows. 16-bit grey is scaled by value (Pillow's convert would clip it at 255).
    A transparent ground is filled with the shade opposite the ink: black strokes on a transparent ground are a
    drawing on white paper, white strokes one on black."""
    if png.mode.startswith("I"):  # 16-bit grey PNG: 0..65535
        png = Image.fromarray((np.asarray(png, dtype=np.float64) / 257).round().clip(0, 255).astype(np.uint8), "L")
    if "A" not in png.mode and "transparency" not in png.info:
        return png
    rgba = np.asarray(png.convert("RGBA"), dtype=np.float64)
    colour, alpha = rgba[..., :3], rgba[..., 3:] / 255
    if alpha.min() == 1:
        return png.convert("RGB")
    ink = (colour * alpha).sum() / max(alpha.sum() * 3, 1e-9)  # the mean shade of what is drawn
    ground = 255.0 if ink < 127.5 else 0.0
    return Image.fromarray((colour * alpha + ground * (1 - alpha)).round().astype(np.uint8), "RGB")


def read_png_file(path: str | Path, size: int, channels: int, what: str) -> torch.Tensor:
    """A PNG from disk, never reading more than MAX_BYTES + 1 bytes (a file may be endless, like /dev/zero)."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_BYTES + 1)
    except OSError as err:
        raise UserError(f"cannot read the {what} {path}: {err.strerror or err}") from None
    if len(data) > MAX_BYTES:
        raise UserError(f"the {what} {path} is larger than {MAX_BYTES / 1e6:g} MB; a digit's PNG is a few kB")
    return decode_square_png(data, size, channels, f"{what} {path}")


def digit_to_model_range(image: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """uint8 image -> float in [-1, 1], light strokes on a dark ground as in MNIST. A drawing with a light
    ground (dark ink on white paper) is inverted; the second value says whether that happened."""
    border = torch.cat([image[..., 0, :], image[..., -1, :], image[..., :, 0], image[..., :, -1]], -1)
    inverted = border.float().mean().item() > 127.5
    if inverted:
        image = 255 - image
    return image.float() / 127.5 - 1, inverted


def region_keep(name: str, size: int) -> torch.Tensor:
    """(1, 1, size, size) bool, True on the pixels kept: 'bottom' generates the bottom half and keeps the top."""
    if name not in REGIONS:
        raise UserError(f"--mask must be a PNG file or one of {', '.join(REGIONS)}; got {name!r}")
    keep = torch.ones(1, 1, size, size, dtype=torch.bool)
    half = size // 2
    region = {"bottom": (slice(half, None), slice(None)), "top": (slice(None, half), slice(None)),
              "left": (slice(None), slice(None, half)), "right": (slice(None), slice(half, None))}[name]
    keep[0, 0][region] = False
    return keep


def mask_keep(mask: torch.Tensor) -> torch.Tensor:
    """A mask image (uint8, white = generate this pixel) -> (1, 1, H, W) bool, True on the pixels kept."""
    return (mask.float().mean(0) <= 127.5).view(1, 1, *mask.shape[-2:])
