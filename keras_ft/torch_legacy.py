"""Safe reader for PyTorch's legacy (non-zip) ``.pt`` serialization format.

PyTorch before 1.6 (and ``torch.save(..., _use_new_zipfile_serialization=False)``
since) writes a state dict as five pickles in a row followed by raw storages:

1. the magic number ``0x1950a86a20f9469cfc6c``,
2. the protocol version ``1001``,
3. a system-info dict (endianness, type sizes),
4. the object itself (here an ``OrderedDict`` of tensors), whose storages are
   emitted as *persistent ids* ``('storage', storage_type, key, location,
   numel, view_metadata)``,
5. the list of storage keys, in the order the storages follow,

then, for each key, an ``int64`` element count and the raw little-endian data.

Unpickling runs arbitrary code if the pickle is allowed to name arbitrary
globals, so this module never uses the default unpickler and never imports
torch. A ``pickle.Unpickler`` subclass admits exactly four globals
(``collections.OrderedDict``, ``torch._utils._rebuild_tensor_v2``,
``torch.FloatStorage``, ``torch.LongStorage``), each replaced by an inert
placeholder; tensors are then materialised as numpy arrays from the raw bytes.

The file is untrusted, so every size it states is checked against what it
holds before anything is allocated: a storage's element count against the
file size, each tensor's offset, element count and strides against its
storage (a zero-stride tensor of shape (65536, 65536, 1024) over one float
would otherwise ask for 16 TiB), and all tensors' bytes together against
the file size.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import math
import os
import pickle
import struct
from typing import Any, BinaryIO

import numpy as np

_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
_PROTOCOL_VERSION = 1001
_ZIP_SIGNATURE = b"PK\x03\x04"

# Storage class name -> numpy dtype (little-endian, as the format stores it).
_STORAGE_DTYPES: dict[str, np.dtype] = {
    "FloatStorage": np.dtype("<f4"),
    "LongStorage": np.dtype("<i8"),
}


@dataclasses.dataclass(frozen=True)
class _StorageType:
    """Placeholder for ``torch.FloatStorage`` / ``torch.LongStorage``."""

    name: str

    @property
    def dtype(self) -> np.dtype:
        return _STORAGE_DTYPES[self.name]


@dataclasses.dataclass(frozen=True)
class _StorageRef:
    """Placeholder for a storage announced through ``persistent_load``."""

    key: str
    dtype: np.dtype
    numel: int
    # Legacy "views" share a root storage: (view key, element offset, numel).
    view: tuple[str, int, int] | None = None


@dataclasses.dataclass(frozen=True)
class _TensorRef:
    """Placeholder for the result of ``torch._utils._rebuild_tensor_v2``."""

    storage: _StorageRef
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


def _rebuild_tensor_v2(
    storage: Any,
    storage_offset: Any,
    size: Any,
    stride: Any,
    requires_grad: Any = False,
    backward_hooks: Any = None,
    metadata: Any = None,
) -> _TensorRef:
    """Stand-in for torch's ``_rebuild_tensor_v2``: records, never executes."""
    del requires_grad, backward_hooks, metadata  # Irrelevant for weights.
    if not isinstance(storage, _StorageRef):
        raise ValueError(f"tensor rebuilt from a non-storage object {type(storage).__name__}")
    return _TensorRef(
        storage=storage,
        offset=_as_int(storage_offset, "storage offset"),
        size=tuple(_as_int(d, "size") for d in size),
        stride=tuple(_as_int(d, "stride") for d in stride),
    )


def _as_int(value: Any, what: str) -> int:
    # bool is an int subclass; a crafted file could smuggle other types too.
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"expected an integer {what}, got {type(value).__name__}")
    return value


# (module, name) -> the inert object handed to the unpickler instead.
_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch", "FloatStorage"): _StorageType("FloatStorage"),
    ("torch", "LongStorage"): _StorageType("LongStorage"),
}


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler admitting only the globals a legacy state dict needs.

    Args:
        file: Binary stream positioned at the start of one pickle.
        allow_globals: If False (the header pickles), refuse every global.
    """

    def __init__(self, file: BinaryIO, allow_globals: bool = True, max_bytes: int | None = None):
        super().__init__(file)
        self._allow_globals = allow_globals
        self._max_bytes = max_bytes  # no storage can hold more than the file

    def find_class(self, module: str, name: str) -> Any:
        key = (module, name)
        if not self._allow_globals or key not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"refused global '{module}.{name}'")
        return _ALLOWED_GLOBALS[key]

    def persistent_load(self, pid: Any) -> _StorageRef:
        if not isinstance(pid, tuple) or len(pid) < 5 or pid[0] != "storage":
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r:.80}")
        _, storage_type, key, _location, numel = pid[:5]
        view_metadata = pid[5] if len(pid) > 5 else None
        if not isinstance(storage_type, _StorageType):
            raise pickle.UnpicklingError(f"unsupported storage type {storage_type!r:.80}")
        if not isinstance(key, str):
            raise pickle.UnpicklingError(f"storage key must be a string, got {key!r:.80}")
        view = None
        if view_metadata is not None:
            view_key, view_offset, view_numel = view_metadata
            view = (str(view_key), _as_int(view_offset, "view offset"), _as_int(view_numel, "view size"))
            if min(view[1:]) < 0:
                raise pickle.UnpicklingError(f"storage view {view!r:.80} has a negative offset or size")
        numel = _as_int(numel, "storage size")
        nbytes = numel * storage_type.dtype.itemsize
        if numel < 0 or (self._max_bytes is not None and nbytes > self._max_bytes):
            raise pickle.UnpicklingError(
                f"storage {key!r:.40} of {numel} elements ({nbytes} bytes) cannot fit in the "
                f"file's {self._max_bytes} bytes"
            )
        return _StorageRef(key, storage_type.dtype, numel, view)


def _unpickle(f: BinaryIO, allow_globals: bool, max_bytes: int | None = None) -> Any:
    return RestrictedUnpickler(f, allow_globals=allow_globals, max_bytes=max_bytes).load()


def _check_header(f: BinaryIO, path: str) -> None:
    """Reads and checks the three header pickles."""
    magic = _unpickle(f, allow_globals=False)
    if magic != _MAGIC_NUMBER:
        raise ValueError(f"{path}: not a legacy PyTorch file (bad magic number)")
    version = _unpickle(f, allow_globals=False)
    if version != _PROTOCOL_VERSION:
        raise ValueError(f"{path}: unsupported legacy PyTorch protocol version {version!r}")
    sys_info = _unpickle(f, allow_globals=False)
    if not isinstance(sys_info, dict) or not sys_info.get("little_endian", False):
        raise ValueError(f"{path}: only little-endian legacy PyTorch files are supported")


def _read_storages(
    f: BinaryIO, keys: list[str], refs: dict[str, _StorageRef], path: str
) -> dict[str, np.ndarray]:
    """Reads the raw storages that follow the pickles, in key-list order."""
    storages: dict[str, np.ndarray] = {}
    for key in keys:
        if key not in refs:
            raise ValueError(f"{path}: storage '{key}' is listed but never referenced")
        dtype = refs[key].dtype
        header = f.read(8)
        if len(header) != 8:
            raise ValueError(f"{path}: truncated before storage '{key}'")
        (numel,) = struct.unpack("<q", header)
        nbytes = numel * dtype.itemsize
        if numel < 0 or nbytes > _remaining(f):
            raise ValueError(f"{path}: storage '{key}' claims {numel} elements, file is too short")
        if numel != refs[key].numel:
            raise ValueError(f"{path}: storage '{key}' holds {numel} elements, pickle says {refs[key].numel}")
        storages[key] = np.frombuffer(f.read(nbytes), dtype=dtype)
    return storages


def _remaining(f: BinaryIO) -> int:
    here = f.tell()
    end = f.seek(0, io.SEEK_END)
    f.seek(here)
    return end - here


def _collect_storage_refs(state: dict[str, Any], path: str) -> dict[str, _StorageRef]:
    refs: dict[str, _StorageRef] = {}
    for name, tensor in state.items():
        if not isinstance(tensor, _TensorRef):
            raise ValueError(f"{path}: entry '{name}' is a {type(tensor).__name__}, not a tensor")
        root = tensor.storage.view[0] if tensor.storage.view else tensor.storage.key
        refs.setdefault(root, tensor.storage)
    return refs


def _materialise(tensor: _TensorRef, storages: dict[str, np.ndarray], name: str, path: str) -> np.ndarray:
    """Builds a numpy array honouring the tensor's offset, size and stride."""
    ref = tensor.storage
    offset = tensor.offset
    flat = storages[ref.view[0] if ref.view else ref.key]
    if ref.view:
        flat = flat[ref.view[1] : ref.view[1] + ref.view[2]]
    if flat.dtype != ref.dtype:
        raise ValueError(f"{path}: tensor '{name}' dtype differs from its storage")
    if len(tensor.size) != len(tensor.stride) or any(s < 0 for s in tensor.size + tensor.stride):
        raise ValueError(f"{path}: tensor '{name}' has an invalid size/stride")
    if offset < 0 or offset > flat.size:
        raise ValueError(
            f"{path}: tensor '{name}' starts at storage offset {offset}, outside its "
            f"storage of {flat.size} elements"
        )
    count = math.prod(tensor.size)  # Python integers: no overflow to wrap around
    if count > flat.size - offset:  # a weight never repeats its storage's elements
        raise ValueError(
            f"{path}: tensor '{name}' of shape {tensor.size} has {count} elements; its "
            f"storage holds {flat.size - offset} from offset {offset}"
        )
    if count == 0:
        return np.zeros(tensor.size, dtype=ref.dtype)
    # Bounds check before as_strided: a crafted file must not read past the buffer.
    last = offset + sum((d - 1) * s for d, s in zip(tensor.size, tensor.stride))
    if last >= flat.size:
        raise ValueError(f"{path}: tensor '{name}' reaches past the end of its storage")
    view = np.lib.stride_tricks.as_strided(
        flat[offset:],
        shape=tensor.size,
        strides=tuple(s * flat.itemsize for s in tensor.stride),
        writeable=False,
    )
    return np.array(view, dtype=ref.dtype.newbyteorder("="))


def load_state_dict(path: str | os.PathLike) -> "collections.OrderedDict[str, np.ndarray]":
    """Loads a legacy-format PyTorch state dict as numpy arrays, safely.

    Args:
        path: A ``.pt``/``.pth`` file written by ``torch.save`` in the legacy
            (non-zip) format.

    Returns:
        An ordered dict mapping parameter/buffer names to numpy arrays, in the
        file's order.

    Raises:
        ValueError: naming the file, if it is zip-based, not in the legacy
            format, malformed, or references a global outside the allow-list.
    """
    path = os.fspath(path)
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        if f.read(4) == _ZIP_SIGNATURE:
            raise ValueError(
                f"{path}: zip-based PyTorch file (torch>=1.6 default); only the legacy "
                "non-zip format is supported: re-save it with torch.save(obj, f, "
                "_use_new_zipfile_serialization=False)"
            )
        f.seek(0)
        try:
            _check_header(f, path)
            state = _unpickle(f, allow_globals=True, max_bytes=size)
            keys = _unpickle(f, allow_globals=False)
        except (pickle.UnpicklingError, EOFError, TypeError, AttributeError, IndexError) as e:
            raise ValueError(f"{path}: not a readable legacy PyTorch state dict: {e}") from e
        if not isinstance(state, dict):
            raise ValueError(f"{path}: top-level object is a {type(state).__name__}, not a state dict")
        if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
            raise ValueError(f"{path}: malformed storage key list")
        refs = _collect_storage_refs(state, path)
        missing = sorted(set(refs) - set(keys))
        if missing:
            raise ValueError(f"{path}: storages {missing[:3]} are referenced but not stored")
        storages = _read_storages(f, keys, refs, path)
    total = sum(math.prod(t.size) * t.storage.dtype.itemsize for t in state.values())
    if total > size:  # tensors sharing one storage, many times over
        raise ValueError(f"{path}: its tensors claim {total} bytes, more than the file's {size}")
    return collections.OrderedDict(
        (name, _materialise(tensor, storages, name, path)) for name, tensor in state.items()
    )
