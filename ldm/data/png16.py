"""16-bit PNG decoding that a damaged file cannot crash.

Pillow reduces 16-bit RGB PNGs to 8 bits, so those files are decoded by torchvision's libpng
binding, which takes the process down (segmentation fault) on some truncated or corrupt
files (found by the fuzz tests). :func:`decode_png16` therefore checks the whole file first,
in Python: chunk layout and CRCs, the IHDR fields, the zlib stream (complete, checksummed, of
exactly the size the header implies) and every scanline's filter byte. Only a file that passes
reaches libpng; any other is a :class:`Png16Error` saying what is wrong.
"""

from __future__ import annotations

import struct
import warnings
import zlib

import numpy as np
import torch

SIGNATURE = b"\x89PNG\r\n\x1a\n"
#: Channels per PNG colour type (16-bit depth: palette images do not exist).
CHANNELS = {0: 1, 2: 3, 4: 2, 6: 4}
#: Adam7 passes: (x start, y start, x step, y step).
ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2),
         (0, 1, 1, 2))  # fmt: skip


class Png16Error(ValueError):
    """A 16-bit PNG that is truncated, corrupt or not what its header says."""


def _chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    if data[:8] != SIGNATURE:
        raise Png16Error("not a PNG file")
    out, pos = [], 8
    while pos < len(data):
        if pos + 8 > len(data):
            raise Png16Error("truncated (a chunk header is cut off)")
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        name = kind.decode("latin-1")
        end = pos + 12 + length
        if length > 2**31 - 1 or end > len(data):
            raise Png16Error(f"truncated (chunk {name!r} is cut off)")
        body = data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[end - 4 : end])
        if zlib.crc32(kind + body) != crc:
            raise Png16Error(f"corrupt (CRC error in chunk {name!r})")
        out.append((kind, body))
        pos = end
        if kind == b"IEND":
            return out
    raise Png16Error("truncated (no IEND chunk)")


def _raw_size(
    width: int, height: int, row_bytes: int, bpp: int, interlace: int
) -> list[tuple[int, int]]:
    """``(rows, bytes per row incl. the filter byte)`` of each (non-empty) pass."""
    if interlace == 0:
        return [(height, 1 + row_bytes)]
    passes = []
    for x0, y0, dx, dy in ADAM7:
        w = (width - x0 + dx - 1) // dx if width > x0 else 0
        h = (height - y0 + dy - 1) // dy if height > y0 else 0
        if w and h:
            passes.append((h, 1 + w * bpp))
    return passes


def check_png16(data: bytes) -> tuple[int, int, int]:
    """Validate a 16-bit PNG completely; returns ``(width, height, channels)``."""
    chunks = _chunks(data)
    kind, ihdr = chunks[0]
    if kind != b"IHDR" or len(ihdr) != 13:
        raise Png16Error("corrupt (the first chunk is not a valid IHDR)")
    width, height, depth, color, comp, filt, interlace = struct.unpack(">IIBBBBB", ihdr)
    if not (0 < width < 2**31 and 0 < height < 2**31):
        raise Png16Error(f"invalid size {width}x{height}")
    if depth != 16 or color not in CHANNELS or comp != 0 or filt != 0 or interlace > 1:
        raise Png16Error(
            f"invalid header (bit depth {depth}, colour type {color}, compression {comp}, "
            f"filter {filt}, interlace {interlace})"
        )
    channels = CHANNELS[color]
    bpp = 2 * channels
    passes = _raw_size(width, height, width * bpp, bpp, interlace)
    expected = sum(rows * stride for rows, stride in passes)
    if expected > 2**33:
        raise Png16Error(f"too large ({width}x{height})")
    kinds = [k for k, _ in chunks]
    idat = [i for i, k in enumerate(kinds) if k == b"IDAT"]
    if not idat or idat != list(range(idat[0], idat[-1] + 1)):
        raise Png16Error("corrupt (image data missing or not in one run of IDAT chunks)")
    stream = zlib.decompressobj()
    try:
        raw = stream.decompress(b"".join(chunks[i][1] for i in idat), expected + 1)
    except zlib.error as err:
        raise Png16Error(f"corrupt image data ({err})") from None
    if len(raw) != expected or not stream.eof:
        raise Png16Error(f"truncated or corrupt image data ({len(raw)} of {expected} bytes)")
    offset = 0
    for rows, stride in passes:
        filters = np.frombuffer(raw, np.uint8, count=rows * stride, offset=offset)[::stride]
        if int(filters.max()) > 4:
            raise Png16Error("corrupt image data (invalid scanline filter)")
        offset += rows * stride
    return width, height, channels


def decode_png16(data: bytes) -> torch.Tensor:
    """A checked 16-bit PNG as a ``[C, H, W]`` tensor of 16-bit values (``int32``)."""
    width, height, channels = check_png16(data)
    with warnings.catch_warnings():  # torchvision 0.29 flags its image IO as deprecated
        warnings.filterwarnings("ignore", message=".*TorchVision are deprecated.*")
        from torchvision.io import ImageReadMode, decode_png

        t = decode_png(torch.frombuffer(bytearray(data), dtype=torch.uint8),
                       mode=ImageReadMode.UNCHANGED)  # fmt: skip
    if tuple(t.shape) != (channels, height, width):
        raise Png16Error(f"decoded {tuple(t.shape)}, the header says {(channels, height, width)}")
    return t.to(torch.int32)
