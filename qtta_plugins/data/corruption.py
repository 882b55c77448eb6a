"""ImageNet-C corruptions of an image set (:mod:`imagecorruptions`, the reference implementation),
deterministic under a seed, and their on-disk cache."""

from __future__ import annotations

import contextlib
import hashlib
import os
import pathlib
import random
import re
import tempfile
import warnings
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..progress import show_progress
from .sources import ImageSet

CORRUPTIONS: tuple[str, ...] = (
    "gaussian_noise",
    "shot_noise",
    "impulse_noise",
    "defocus_blur",
    "glass_blur",
    "motion_blur",
    "zoom_blur",
    "snow",
    "frost",
    "fog",
    "brightness",
    "contrast",
    "elastic_transform",
    "pixelate",
    "jpeg_compression",
)
"""The 15 ImageNet-C corruptions in the standard continual-TTA order."""


# Corruptions whose randomness does NOT come from numpy's global RNG: impulse_noise uses
# skimage.util.random_noise(rng=None) -> np.random.default_rng(), glass_blur draws its seed from
# np.random.default_rng() and shuffles pixels with numba's own RNG.  Both accept ``seed=``.
_SEED_KWARG_CORRUPTIONS = frozenset({"impulse_noise", "glass_blur"})


_CACHE_FORMAT = 1


# --------------------------------------------------------------------------------------------
# cache directory
# --------------------------------------------------------------------------------------------


def cache_dir(path: str | os.PathLike[str] | None = None) -> pathlib.Path:
    """Return (and create) the on-disk cache directory.

    Precedence: explicit ``path`` > ``$QTTA_CACHE_DIR`` > ``$XDG_CACHE_HOME/qtta-plugins`` >
    ``~/.cache/qtta-plugins``.  Empty environment variables are ignored.
    """
    if path is not None:
        out = pathlib.Path(path)
    elif os.environ.get("QTTA_CACHE_DIR"):
        out = pathlib.Path(os.environ["QTTA_CACHE_DIR"])
    elif os.environ.get("XDG_CACHE_HOME"):
        out = pathlib.Path(os.environ["XDG_CACHE_HOME"]) / "qtta-plugins"
    else:
        out = pathlib.Path.home() / ".cache" / "qtta-plugins"
    out = out.expanduser()
    out.mkdir(parents=True, exist_ok=True)
    return out


# --------------------------------------------------------------------------------------------
# corruptions
# --------------------------------------------------------------------------------------------


def _check_corruption(corruption: str) -> int:
    if corruption not in CORRUPTIONS:
        raise ValueError(
            f"unknown corruption {corruption!r}; valid corruptions: {', '.join(CORRUPTIONS)}"
        )
    return CORRUPTIONS.index(corruption)


def _check_severity(severity: int) -> None:
    ok = isinstance(severity, (int, np.integer)) and not isinstance(severity, bool)
    if not ok or not 1 <= severity <= 5:
        raise ValueError(f"severity must be an int in 1..5, got {severity!r}")


def _check_seed(seed: int) -> None:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")


def _corrupt_image(image: np.ndarray, corruption: str, severity: int, seed: int) -> np.ndarray:
    """Corrupt one ``uint8`` ``(H, W, 3)`` image with :func:`imagecorruptions.corrupt`.

    ``seed`` is forwarded to the corruptions that ignore numpy's global RNG (impulse noise,
    glass blur); the others draw from ``np.random`` (seeded by :func:`corrupt_set`).
    """
    from imagecorruptions import corrupt

    kwargs: dict[str, Any] = {"seed": seed} if corruption in _SEED_KWARG_CORRUPTIONS else {}
    return corrupt(image, severity=severity, corruption_name=corruption, **kwargs)


def _content_hash(images: ImageSet) -> str:
    h = hashlib.blake2b(digest_size=6)
    x = images.x.detach().cpu().contiguous()
    h.update(f"{x.dtype}{tuple(x.shape)}".encode())
    h.update(x.numpy().tobytes())
    h.update(images.y.detach().cpu().to(torch.int64).contiguous().numpy().tobytes())
    return h.hexdigest()


def _cache_path(
    images: ImageSet, corruption: str, severity: int, seed: int, cache_root: str | None
) -> pathlib.Path:
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", images.name).strip("_") or "images"
    directory = cache_dir(cache_root) / "corrupted"
    directory.mkdir(parents=True, exist_ok=True)
    name = f"{safe}-{corruption}-s{severity}-seed{seed}-{_content_hash(images)}.pt"
    return directory / name


def _load_cached(path: pathlib.Path, images: ImageSet) -> torch.Tensor | None:
    """Return the cached ``uint8`` images if ``path`` holds a valid entry for ``images``."""
    if not path.is_file():
        return None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        x_u8, y = payload["x"], payload["y"]
        valid = (
            payload.get("format") == _CACHE_FORMAT
            and x_u8.dtype == torch.uint8
            and tuple(x_u8.shape) == tuple(images.x.shape)
            and torch.equal(y, images.y.detach().cpu().to(torch.int64))
        )
    except Exception as exc:  # any unreadable cache entry is just recomputed
        warnings.warn(f"ignoring unreadable cache file {path}: {exc}", stacklevel=3)
        return None
    if not valid:
        warnings.warn(f"ignoring mismatching cache file {path}", stacklevel=3)
        return None
    return x_u8


def save_atomic(path: pathlib.Path, payload: Any) -> None:
    """``torch.save(payload)`` to ``path`` through a temporary file in its folder, so a reader (or a
    second process filling the same cache) never sees half a file; the temporary goes on failure."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def corrupt_set(
    images: ImageSet,
    corruption: str,
    severity: int,
    *,
    seed: int = 0,
    cache: bool = True,
    cache_root: str | None = None,
    progress: bool | None = None,
) -> ImageSet:
    """Apply an ImageNet-C corruption to every image of ``images``.

    Each gray image is quantised to ``uint8``, replicated to 3 channels, passed through
    ``imagecorruptions.corrupt(img, severity=severity, corruption_name=corruption)``, averaged
    back to one channel, rounded to ``uint8`` and returned as ``float32`` in ``[0, 1]``.  (Note
    that averaging the channels reduces the per-pixel std of the channel-independent noises --
    gaussian/shot/impulse -- by about sqrt(3) compared with one channel.)

    Determinism: before the loop numpy's global RNG and Python's :mod:`random` are seeded from
    ``(seed, corruption index, severity)`` and restored afterwards.  ``impulse_noise`` and
    ``glass_blur`` ignore the global RNG (they use ``np.random.default_rng()`` and numba's own
    RNG), so they get an explicit per-image ``seed`` drawn from the same seed sequence.

    Caching: the result is stored as ``uint8`` in
    ``cache_dir(cache_root)/corrupted/<name>-<corruption>-s<severity>-seed<seed>-<hash>.pt``
    (``hash``: of the bytes of ``images.x`` and ``images.y``), written atomically, and reused
    when present.  Cached and fresh results are bit-identical.

    Args:
        images: gray images, at least 32x32 (an :mod:`imagecorruptions` requirement).
        corruption: one of :data:`CORRUPTIONS`.
        severity: 1..5.
        seed: non-negative int.
        cache: read/write the on-disk cache.
        cache_root: cache directory (see :func:`cache_dir`).
        progress: show a tqdm bar; ``None`` = only when stderr is a terminal.

    Returns:
        An :class:`ImageSet` named ``f"{images.name}/{corruption}-{severity}"`` with the same
        labels.
    """
    c_index = _check_corruption(corruption)
    _check_severity(severity)
    _check_seed(seed)
    severity, seed = int(severity), int(seed)
    height, width = images.x.shape[-2:]
    if height < 32 or width < 32:
        raise ValueError(f"imagecorruptions needs images of at least 32x32, got {height}x{width}")
    out_name = f"{images.name}/{corruption}-{severity}"
    y = images.y.detach().cpu().to(torch.int64)

    path = _cache_path(images, corruption, severity, seed, cache_root) if cache else None
    if path is not None:
        cached = _load_cached(path, images)
        if cached is not None:
            return ImageSet(cached.float().div_(255.0), y, out_name)

    clean = images.x.detach().cpu().float().clamp(0.0, 1.0).mul(255.0).round_()
    clean_u8 = clean.to(torch.uint8)[:, 0].numpy()  # (N, H, W)
    n = clean_u8.shape[0]
    seq = np.random.SeedSequence([seed, c_index, severity])
    global_seed, python_seed = (int(s) for s in seq.generate_state(2))
    image_seeds = seq.spawn(1)[0].generate_state(max(n, 1))
    out_u8 = np.empty_like(clean_u8)

    np_state, py_state = np.random.get_state(), random.getstate()
    np.random.seed(global_seed)
    random.seed(python_seed)
    try:
        bar = tqdm(range(n), desc=f"{corruption}-{severity}", disable=not show_progress(progress))
        for i in bar:
            rgb = np.repeat(clean_u8[i][:, :, None], 3, axis=2)
            corrupted = np.asarray(_corrupt_image(rgb, corruption, severity, int(image_seeds[i])))
            gray = corrupted.astype(np.float32).reshape(height, width, -1).mean(axis=2)
            out_u8[i] = np.clip(np.rint(gray), 0, 255).astype(np.uint8)
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)

    x_u8 = torch.from_numpy(out_u8).unsqueeze(1)
    if path is not None:
        payload = {
            "format": _CACHE_FORMAT,
            "x": x_u8,
            "y": y,
            "corruption": corruption,
            "severity": severity,
            "seed": seed,
        }
        save_atomic(path, payload)
    return ImageSet(x_u8.float().div_(255.0), y, out_name)
