"""Helpers of the serving tests: encoded images, including a decompression bomb's header."""

import io
import struct
import zlib

import numpy as np
from PIL import Image


def png_bytes(height: int, width: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((height, width, 3), 100, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def declared_png(width: int, height: int) -> bytes:
    """A PNG whose header declares ``width x height`` but carries almost no data (a decompression bomb's header)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b"")
