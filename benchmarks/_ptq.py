"""The benchmarks' PTQ variants, their calibration draw, and a disk cache of reconstructed models.

A reconstruction of ResNet-18 at W2A4 takes minutes on two cores, so ``lowbit_ptq`` keeps the ones
it builds (the harness, ``qtta bench``, keeps its own: ``qtta_plugins.bench.runner``). Each
reconstructed model is kept as its state dict, keyed by everything that made it; loading it into
a fresh ``quantize`` of the same calibration gives the same model bit for bit (checked on every
backend: the write-back keeps the backend's own parameters and buffers).
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import torch

import qtta_plugins
from qtta_plugins.data.corruption import cache_dir, save_atomic
from qtta_plugins.methods.ttaq import TTAQConfig
from qtta_plugins.models import accuracy
from qtta_plugins.view import copy_model, state_fingerprint

#: PTQ variant -> (reconstruction method or None for the backend's own ranges, options)
PTQ = {
    "min-max": (None, {}),
    "qdrop": ("qdrop", {}),
    "ttaq": ("ttaq", {}),
    "ttaq -pem": ("ttaq", {"pem": False}),
    "ttaq -pcr": ("ttaq", {"pcr": False}),
    "ttaq -logits": ("ttaq", {"logits": False}),
}


def calibration(images: torch.Tensor, n: int, seed: int) -> list[torch.Tensor]:
    """``n`` of ``images`` drawn under ``seed``, in batches of 64."""
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(images), generator=gen)[:n]
    x = images[idx]
    return [x[i : i + 64] for i in range(0, len(x), 64)]


def model_key(arch: str, source: str, settings: dict) -> str:
    """The cache's name for a float model: its architecture, data and training settings."""
    return f"{arch}|{source}|" + ",".join(f"{k}={v}" for k, v in settings.items())


def ptq_model(
    model: torch.nn.Module,
    model_key: str,
    backend: str,
    bits: str,
    calib: list[torch.Tensor],
    name: str,
    *,
    seed: int,
    iters: int,
    base: torch.nn.Module | None = None,
) -> tuple[torch.nn.Module, bool]:
    """PTQ variant ``name`` of ``model``; ``(quantized model, whether it came from the cache)``.

    ``model_key`` names the float model (its architecture, data and training settings); with the
    backend, bits, variant, seed, iterations and the calibration images' checksum it keys the
    cache, with a fingerprint of the quantized starting point and every option of the
    reconstruction. ``base``: ``quantize(model, backend, bits, calib)`` if the caller has it
    already.
    """
    method, options = PTQ[name]
    if base is None:
        base = qtta_plugins.quantize(model, backend, bits, calib)
    if method is None:
        return base, False
    x = torch.cat(calib)
    # the quantized starting point's state too: a change to quantize (its ranges) must not find
    # the reconstruction of the old starting point
    start = state_fingerprint(qtta_plugins.quant_view(base))[:12]
    # and every option of the reconstruction, defaults included (a changed default is a new
    # model): the config that keys the cache is the one that runs
    config = TTAQConfig(method=method, iters=iters, seed=seed, progress=False, **options)
    options_key = ",".join(f"{k}={v}" for k, v in sorted(vars(config).items()) if k != "progress")
    key = (
        f"{model_key}|{backend}|{bits.lower()}|{name}|s{seed}|i{iters}|{len(x)}"
        f"|{x.sum().item():.6e}|{start}|{options_key}"
    )
    digest = hashlib.sha1(key.encode()).hexdigest()[:12]
    path = (
        Path(cache_dir())
        / "ptq"
        / f"{model_key.split('|')[0]}-{backend}-{bits.lower()}-{digest}.pt"
    )
    if path.exists():
        qm = copy_model(base)  # the same quantize as the reconstruction started from
        qm.load_state_dict(torch.load(path, weights_only=True))
        return qm, True
    qm = qtta_plugins.reconstruct(base, model, calib, config)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_atomic(path, qm.state_dict())
    return qm, False


def ptq_entry(
    model: torch.nn.Module,
    model_key: str,
    backend: str,
    bits: str,
    calib: list[torch.Tensor],
    name: str,
    test: tuple[torch.Tensor, torch.Tensor],
    *,
    seed: int,
    iters: int,
    base: torch.nn.Module,
) -> tuple[torch.nn.Module, dict, float]:
    """:func:`ptq_model`, timed, with its results row: ``(model, row, seconds)``. The row's
    ``seconds`` is the reconstruction's time, ``None`` for min-max or a model from the cache."""
    start = time.perf_counter()
    qm, cached = ptq_model(
        model, model_key, backend, bits, calib, name, seed=seed, iters=iters, base=base
    )
    seconds = time.perf_counter() - start
    row = {
        "backend": backend,
        "bits": bits.upper(),
        "ptq": name,
        "seed": seed,
        "clean_accuracy": accuracy(qm, *test),
        "seconds": seconds if PTQ[name][0] and not cached else None,
    }
    return qm, row, seconds
