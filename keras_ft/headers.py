"""Image file headers, read without decoding: format, size, what converts.

`sniff` names a format by its magic bytes (not its extension); `HEADERS`
maps each supported format to a parser of its header giving `(width,
height, kinds)`: the kinds of image that decode fine but are converted to
3-channel 8-bit ("grayscale", "alpha", "CMYK", "16-bit"), and for a JPEG
whose EXIF orientation asks for a rotation, `EXIF_ROTATED`. TensorFlow's
decoders ignore EXIF orientation, and so do training, evaluation and the
export alike (docs/data.md): such photos are learned and served as stored,
and the scan counts them so that it is not silent. A bad header raises
`struct.error`, `ValueError` or `IndexError`.
"""

from __future__ import annotations

import struct

EXIF_ROTATED = "EXIF-rotated"


def sniff(blob: bytes) -> str | None:
    """The format named by the file's magic bytes, whatever its extension."""
    if blob.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if blob.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if blob.startswith((b"GIF87a", b"GIF89a")):
        return "GIF"
    if blob.startswith(b"BM"):
        return "BMP"
    if blob.startswith(b"RIFF") and blob[8:12] == b"WEBP":
        return "WebP"
    if blob.startswith((b"II*\x00", b"MM\x00*")):
        return "TIFF"
    if blob[4:8] == b"ftyp" and blob[8:12] in (
        b"heic", b"heix", b"heim", b"heis", b"hevc", b"mif1", b"msf1", b"avif",
    ):
        return "AVIF" if blob[8:12] == b"avif" else "HEIC"
    if blob.startswith(b"\x00\x00\x00\x0cjP  "):
        return "JPEG 2000"
    if blob.startswith(b"8BPS"):
        return "PSD"
    return None


def _png_header(blob: bytes):
    if blob[12:16] != b"IHDR":
        raise ValueError("no IHDR chunk")
    width, height, depth, color = struct.unpack(">IIBB", blob[16:26])
    conversions = []
    if color in (0, 4):
        conversions.append("grayscale")
    if color in (4, 6):
        conversions.append("alpha")
    if depth == 16:
        conversions.append("16-bit")
    return width, height, tuple(conversions)


def _jpeg_header(blob: bytes):
    pos, rotated = 2, ()
    while True:
        while blob[pos] != 0xFF:  # tolerate padding between segments
            pos += 1
        while blob[pos] == 0xFF:
            pos += 1
        marker = blob[pos]
        pos += 1
        if marker in (0x01, *range(0xD0, 0xD8)):  # no length field
            continue
        if marker in (0xD9, 0xDA):
            raise ValueError("no SOF segment before the image data")
        (length,) = struct.unpack(">H", blob[pos:pos + 2])
        if marker == 0xE1 and _exif_orientation(blob[pos + 2:pos + length]) not in (0, 1):
            rotated = (EXIF_ROTATED,)
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            _, height, width, components = struct.unpack(">BHHB", blob[pos + 2:pos + 8])
            kinds = {1: ("grayscale",), 4: ("CMYK",)}.get(components, ())
            return width, height, kinds + rotated
        pos += length


def _exif_orientation(segment: bytes) -> int:
    """The EXIF orientation (1 = as stored) of an APP1 segment's body, 1 if none."""
    if not segment.startswith(b"Exif\x00\x00"):
        return 1
    tiff = segment[6:]
    order = {b"II": "<", b"MM": ">"}.get(tiff[:2])
    if order is None:
        return 1
    (ifd,) = struct.unpack(order + "I", tiff[4:8])
    (count,) = struct.unpack(order + "H", tiff[ifd:ifd + 2])
    for i in range(count):
        entry = tiff[ifd + 2 + 12 * i:ifd + 14 + 12 * i]
        tag, _, _, value = struct.unpack(order + "HHIH", entry[:10])
        if tag == 0x0112:
            return value
    return 1


def _gif_header(blob: bytes):
    width, height = struct.unpack("<HH", blob[6:10])
    return width, height, ()


def _bmp_header(blob: bytes):
    (dib_size,) = struct.unpack("<I", blob[14:18])
    if dib_size == 12:  # OS/2 BITMAPCOREHEADER
        width, height = struct.unpack("<HH", blob[18:22])
        bits = struct.unpack("<H", blob[24:26])[0]
    else:
        width, height = struct.unpack("<ii", blob[18:26])
        bits = struct.unpack("<H", blob[28:30])[0]
    return width, abs(height), ("alpha",) if bits == 32 else ()


HEADERS = {"PNG": _png_header, "JPEG": _jpeg_header, "GIF": _gif_header, "BMP": _bmp_header}
