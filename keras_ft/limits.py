"""What keras_ft reads of an untrusted image file, and what it refuses.

An image file can be hostile without being broken: a FIFO named `a.jpg`
blocks whoever opens it for reading, a link to `/dev/zero` never ends, a
389 KB PNG claims 20000 x 20000 pixels (7 GB decoded), a 1.5 MB GIF holds 40
frames of 7000 x 7000 (the decoder keeps every frame). So, for training
files (`keras_ft.validate`) and served images (`keras_ft.export`) alike:

- `read_regular`: `lstat` first; only a regular file of at most
  `MAX_FILE_BYTES` is opened (non-blocking, so a FIFO swapped in after the
  `lstat` cannot block), and only a prefix is read until the caller knows it
  is an image. A link is followed only if it stays inside `root`.
- `decoded_pixels`: the pixels a decoder will allocate, read from the
  headers without decoding (every GIF frame counted), as TensorFlow ops, so
  the exported SavedModel applies the same `MAX_PIXELS` cap in its graph.
- `file_type`: what a non-image is ("HTML", "ELF executable", "text"): the
  reason a scan gives names the type, never the file's bytes.

docs/data.md lists the limits and what happens at each.
"""

from __future__ import annotations

import errno
import os
import stat

import tensorflow as tf

MAX_PIXELS = 50_000_000  # decoded pixels per image: frames x width x height
MAX_FILE_BYTES = 256 * 2**20  # an image file's size (a 50 MP PNG is at most ~150 MB)
PREFIX_BYTES = 64 * 2**10  # read to identify a file before the rest is read

_TYPES = {  # st_mode test -> the type a bad-file reason names
    stat.S_ISDIR: "folder", stat.S_ISFIFO: "FIFO", stat.S_ISCHR: "character device",
    stat.S_ISBLK: "block device", stat.S_ISSOCK: "socket",
}


class Refused(Exception):
    """A path that is not read: `kind` (a `keras_ft.validate` kind) and `reason`."""

    def __init__(self, kind: str, reason: str):
        super().__init__(reason)
        self.kind, self.reason = kind, reason


def inside(path: str, root: str) -> bool:
    """Whether the real path of `path` lies inside the real path of `root`."""
    real, top = os.path.realpath(path), os.path.realpath(root)
    return real == top or real.startswith(top.rstrip(os.sep) + os.sep)


def read_regular(path: str, root: str | None = None, max_bytes: int = MAX_FILE_BYTES,
                 whole=lambda prefix: True) -> bytes:
    """The bytes of a regular file, read without trusting the path.

    Args:
        path: the file.
        root: links must resolve inside this folder (None: links anywhere,
            for files a user lists one by one).
        max_bytes: larger files are refused unread.
        whole: called with the first `PREFIX_BYTES`; the rest is read only if
            it returns True (a file that is no image is never read whole).

    Raises:
        Refused: kinds "not a regular file", "link", "too large", "unreadable".
    """
    try:
        st = os.lstat(path)
        if stat.S_ISLNK(st.st_mode):
            if root is not None and not inside(path, root):
                raise Refused("link", "link leaving the data folder")
            st = os.stat(path)
            via = ", through a link"
        else:
            via = ""
        _check_regular(st, via, max_bytes)
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | (os.O_NOFOLLOW if not via else 0))
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise Refused("link", "link loop") from None
        raise Refused("unreadable", f"unreadable ({e.strerror or e})") from None
    try:
        _check_regular(os.fstat(fd), via, max_bytes)  # what was opened, not what was looked at
        blob = _read(fd, PREFIX_BYTES)
        if len(blob) == PREFIX_BYTES and whole(blob):
            blob += _read(fd, max_bytes - PREFIX_BYTES + 1)
        if len(blob) > max_bytes:  # it grew since the stat
            raise Refused("too large", f"too large: over max_file_bytes {max_bytes:,}")
        return blob
    finally:
        os.close(fd)


def _check_regular(st: os.stat_result, via: str, max_bytes: int) -> None:
    if not stat.S_ISREG(st.st_mode):
        name = next((n for test, n in _TYPES.items() if test(st.st_mode)), "special file")
        raise Refused("not a regular file", f"not a regular file ({name}{via})")
    if st.st_size > max_bytes:
        raise Refused("too large", f"too large: {st.st_size:,} bytes > max_file_bytes {max_bytes:,}")


def _read(fd: int, n: int) -> bytes:
    parts = []
    while n > 0:
        part = os.read(fd, min(n, PREFIX_BYTES))
        if not part:
            break
        parts.append(part)
        n -= len(part)
    return b"".join(parts)


def file_type(blob: bytes) -> str:
    """A name for what a file that is no image seems to be."""
    head = blob[:512].lstrip().lower()
    for magic, name in (
        (b"<!doctype html", "HTML"), (b"<html", "HTML"), (b"<?xml", "XML"), (b"<svg", "SVG"),
        (b"\x7felf", "ELF executable"), (b"mz", "Windows executable"), (b"%pdf", "PDF"),
        (b"pk\x03\x04", "zip archive"), (b"\x1f\x8b", "gzip archive"),
    ):
        if head.startswith(magic):
            return name
    try:
        text = blob[:4096].decode("utf-8")
    except UnicodeDecodeError as e:
        text = blob[:e.start].decode("utf-8") if e.start > 4096 - 4 else None
    if text is not None and all(c.isprintable() or c in "\t\r\n" for c in text):
        return "text"
    return "unknown binary data"


# ------------------------------------------------------- pixels, in the graph


def decoded_pixels(blob: tf.Tensor) -> tf.Tensor:
    """int64 pixels that decoding the encoded image `blob` allocates, from its
    headers alone: width x height for PNG, JPEG and BMP, the sum over frames
    for a GIF (TensorFlow's decoder holds them all, even when it returns the
    first); 0 for bytes of no known format (the decoder refuses those)."""
    b = tf.cast(tf.io.decode_raw(tf.strings.substr(blob, 0, PREFIX_BYTES), tf.uint8), tf.int64)
    b = tf.concat([b, tf.zeros([32], tf.int64)], 0)  # header reads past a short file see 0
    magic = tf.strings.substr(blob, 0, 4)

    def be32(i):
        return b[i] * 2**24 + b[i + 1] * 2**16 + b[i + 2] * 2**8 + b[i + 3]

    def bmp():
        height = b[22] + b[23] * 2**8 + b[24] * 2**16 + b[25] * 2**24
        width = b[18] + b[19] * 2**8 + b[20] * 2**16 + b[21] * 2**24
        return width * tf.minimum(height, 2**32 - height)  # negative: stored top-down

    return tf.case([
        (tf.equal(magic, b"\x89PNG"), lambda: be32(16) * be32(20)),
        (tf.equal(tf.strings.substr(magic, 0, 3), b"\xff\xd8\xff"),
         lambda: tf.reduce_prod(tf.cast(tf.io.extract_jpeg_shape(blob)[:2], tf.int64))),
        (tf.equal(magic, b"GIF8"), lambda: _gif_pixels(blob)),
        (tf.equal(tf.strings.substr(magic, 0, 2), b"BM"), bmp),
    ], default=lambda: tf.constant(0, tf.int64), exclusive=True)


def _gif_pixels(blob: tf.Tensor) -> tf.Tensor:
    """The summed width x height of a GIF's frames, walking its blocks:
    extensions (0x21) and image descriptors (0x2C), each followed by
    sub-blocks (a length byte, then that many bytes) up to an empty one."""
    b = tf.cast(tf.io.decode_raw(blob, tf.uint8), tf.int64)
    n = tf.size(b, out_type=tf.int64)

    def at(i):  # reads past the end see 0: the walk then stops
        i = tf.cast(i, tf.int64)
        return tf.where(i < n, tf.gather(b, tf.minimum(i, n - 1)), tf.constant(0, tf.int64))

    def table(flags):  # a colour table's bytes, if the flags announce one
        return tf.where(flags >= 128, 3 * tf.bitwise.left_shift(tf.constant(2, tf.int64), flags % 8), 0)

    def step(pos, in_blocks, total):
        size = at(pos)  # in sub-blocks: the next one's length (0 ends them)
        tag = at(pos)  # between blocks: what comes next
        area = (at(pos + 5) + 256 * at(pos + 6)) * (at(pos + 7) + 256 * at(pos + 8))
        after_tag = tf.where(tag == 0x21, pos + 2, tf.where(tag == 0x2C, pos + 11 + table(at(pos + 9)), n))
        return (
            tf.where(in_blocks, pos + 1 + size, after_tag),
            tf.where(in_blocks, size > 0, (tag == 0x21) | (tag == 0x2C)),
            total + tf.where(~in_blocks & (tag == 0x2C), area, 0),
        )

    start = 13 + table(at(10))
    _, _, total = tf.while_loop(
        lambda pos, in_blocks, total: pos < n,  # pos grows at every step
        step, (start, tf.constant(False), tf.constant(0, tf.int64)),
    )
    return total


@tf.function(input_signature=[tf.TensorSpec([], tf.string)])
def count_pixels(blob):
    """`decoded_pixels` as a traced function, for the scan's Python code."""
    return decoded_pixels(blob)


def check_pixels(blob: tf.Tensor, max_pixels: int = MAX_PIXELS) -> tf.Operation:
    """An op that fails for an image of more than `max_pixels` decoded pixels
    (run it before decoding: `tf.control_dependencies`)."""
    return tf.debugging.assert_less_equal(
        decoded_pixels(blob), tf.constant(max_pixels, tf.int64),
        message=f"image too large: more than max_pixels {max_pixels:,} decoded pixels "
                "(frames x width x height); send a smaller image",
    )
