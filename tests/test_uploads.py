"""Uploaded and --inpaint PNGs (diffusion/uploads.py): decoded as a viewer shows them, read with a cap."""
import io
import tracemalloc

import numpy as np
import pytest
import torch
from PIL import Image

from diffusion.errors import UserError
from diffusion.uploads import MAX_BYTES, decode_square_png, digit_to_model_range, read_png_file


def png(array: np.ndarray, mode: str | None = None, **info) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array, mode).save(buffer, format="PNG", **info)
    return buffer.getvalue()


def stroke(ink: int, ground: int) -> np.ndarray:
    """A 28 x 28 digit-like stroke with anti-aliased edges, `ink` on `ground`."""
    shade = np.zeros((28, 28))
    shade[4:24, 11:17] = 1.0
    shade[4:24, 10] = shade[4:24, 17] = 0.5
    return (ground + (ink - ground) * shade).round().astype(np.uint8)


def model_view(data: bytes) -> torch.Tensor:
    return digit_to_model_range(decode_square_png(data, 28, 1))[0]


def test_16_bit_grey_decodes_to_its_8_bit_twin():
    eight = stroke(255, 0)
    sixteen = eight.astype(np.uint16) * 257  # the same picture at 16 bits
    assert Image.open(io.BytesIO(png(sixteen))).mode.startswith("I")
    assert torch.equal(decode_square_png(png(sixteen), 28, 1), decode_square_png(png(eight), 28, 1))


@pytest.mark.parametrize("ink, paper", [(0, 255), (255, 0)])
def test_a_transparent_ground_is_the_paper_the_ink_implies(ink, paper):
    """Black ink on a transparent ground is a drawing on white paper; white ink one on black. RGBA, LA and a
    palette with a transparent entry reach the model as the same digit as the opaque drawing."""
    opaque = model_view(png(stroke(ink, paper)))
    alpha = stroke(255, 0)  # the ink's coverage: opaque on the stroke, transparent on the ground
    rgba = np.dstack([np.full((28, 28, 3), ink, np.uint8), alpha])
    la = np.dstack([np.full((28, 28), ink, np.uint8), alpha])
    assert torch.allclose(model_view(png(rgba, "RGBA")), opaque, atol=2 / 127.5)  # one shade of rounding
    assert torch.allclose(model_view(png(la, "LA")), opaque, atol=2 / 127.5)  # one shade of rounding
    palette = Image.fromarray((alpha > 127).astype(np.uint8), "P")  # 0 = ground (transparent), 1 = ink
    palette.putpalette([128, 128, 128, ink, ink, ink])
    buffer = io.BytesIO()
    palette.save(buffer, format="PNG", transparency=0)
    hard = model_view(png(np.where(alpha > 127, ink, paper).astype(np.uint8)))
    assert torch.equal(model_view(buffer.getvalue()), hard)


def test_an_opaque_drawing_with_an_alpha_channel_is_unchanged():
    rgba = np.dstack([np.repeat(stroke(255, 0)[..., None], 3, 2), np.full((28, 28), 255, np.uint8)])
    assert torch.equal(decode_square_png(png(rgba, "RGBA"), 28, 1), decode_square_png(png(stroke(255, 0)), 28, 1))


def test_a_huge_file_is_refused_after_reading_no_more_than_the_cap(tmp_path):
    big = tmp_path / "digit.png"
    with open(big, "wb") as f:
        f.write(png(stroke(255, 0)))
        f.truncate(2**30)  # a 1 GB file (sparse where the file system allows)
    tracemalloc.start()
    try:
        with pytest.raises(UserError, match="larger than"):
            read_png_file(big, 28, 1, "image")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 * MAX_BYTES, f"read {peak / 1e6:.0f} MB of a file it refuses"


@pytest.mark.skipif(not __import__("os").path.exists("/dev/zero"), reason="no /dev/zero on this system")
def test_an_endless_file_is_refused():
    with pytest.raises(UserError, match="larger than"):
        read_png_file("/dev/zero", 28, 1, "image")
