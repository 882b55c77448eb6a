"""How every cell is measured: the time ratio to plain inference, paired batch by batch, and the
peak memory of the adaptation loop.

**Time per batch, one way everywhere** (:func:`run_row`): before each adaptation step, plain
inference of the same quantized model (``plain_model(x)`` on a copy, no adaptation, no grad) runs
on the same batch, and both are timed; the ratio is the median step time over the median plain
time, the first batch left out (lazy set-up, compilation). Pairing each step with plain inference
just before it gives both the same machine load, which on a shared machine moves absolute times
far more than the methods differ. On CUDA both are timed between ``torch.cuda.synchronize()``
calls (kernels run asynchronously: without a sync the clock reads the launch, not the work).

**Peak memory, without a polling thread** (:class:`PeakMemory`): on the CPU the kernel's own
high-water mark of the process's resident set (``VmHWM``), reset just before the loop by writing
``5`` to ``/proc/self/clear_refs`` and read just after it; the figure is that peak above the
resident size at the start. A sampling thread (what the benchmarks used before) competes with the
loop it measures for the GIL and the cores, and misses any peak shorter than its interval; the
kernel's mark sees every page the loop touched, costs nothing inside the loop, and counts torch's
C++ allocations, which :mod:`tracemalloc` does not see. Where ``clear_refs`` cannot be written (not
Linux), ``getrusage``'s ``ru_maxrss`` stands in: the process's lifetime peak, so the figure is 0
when an earlier part of the process peaked higher (the record says which was used). On CUDA the
figure is ``torch.cuda.max_memory_allocated`` above the allocation at the start (the device's
memory, what limits a GPU run), after ``torch.cuda.reset_peak_memory_stats``.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import gc
import statistics
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any

import torch

import qtta_plugins
from qtta_plugins.view import copy_model, model_device

_PAGE_KB = 1024


def _status_kb(field: str) -> int | None:
    """A ``kB`` field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``), or ``None`` off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _maxrss_kb() -> int:
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak // 1024 if sys.platform == "darwin" else peak  # bytes on macOS, kB elsewhere


class PeakMemory:
    """Peak memory of a block above its start, read outside the block (see the module doc).

    ``device``: a CUDA device reads its allocator's peak; anything else, the process's resident
    set. After the block: ``extra_mb`` (peak above the start), ``peak_mb`` (the peak itself) and
    ``method`` (``"VmHWM"``, ``"ru_maxrss"`` or ``"cuda max_memory_allocated"``)."""

    def __init__(self, device: torch.device | str | None = None) -> None:
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.method = ""
        self.start_kb = self.peak_kb = 0

    def __enter__(self) -> PeakMemory:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start_kb = torch.cuda.memory_allocated(self.device) // 1024
            self.method = "cuda max_memory_allocated"
            return self
        with contextlib.suppress(OSError, AttributeError):  # give freed memory back first
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        rss = _status_kb("VmRSS")
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current resident size
            self.method, self.start_kb = "VmHWM", rss or 0
        except OSError:
            self.method, self.start_kb = "ru_maxrss", _maxrss_kb()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_kb = torch.cuda.max_memory_allocated(self.device) // 1024
        elif self.method == "VmHWM":
            self.peak_kb = _status_kb("VmHWM") or self.start_kb
        else:
            self.peak_kb = _maxrss_kb()

    @property
    def extra_mb(self) -> float:
        return max(0, self.peak_kb - self.start_kb) / _PAGE_KB

    @property
    def peak_mb(self) -> float:
        return self.peak_kb / _PAGE_KB


class DeviceStream:
    """A stream whose batches' images are moved to ``device`` (non-blocking from pinned memory
    where the loader pins it). Labels stay where they are: the run compares them with the
    predictions on the CPU, and moving them would only add a copy each way. ``len``,
    ``reset_on_shift``, ``domains`` and ``rounds`` are the wrapped stream's."""

    def __init__(self, stream: Iterable[Any], device: torch.device | str) -> None:
        self.stream = stream
        self.device = torch.device(device)
        self.reset_on_shift = getattr(stream, "reset_on_shift", False)

    def __len__(self) -> int:
        return len(self.stream)  # type: ignore[arg-type]

    def __getattr__(self, name: str) -> Any:
        if name == "stream":  # not set yet (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.stream, name)

    def __iter__(self) -> Iterator[Any]:
        for batch in self.stream:
            if self.device.type == "cpu" or batch.x.device == self.device:
                yield batch
            else:
                yield dataclasses.replace(batch, x=batch.x.to(self.device, non_blocking=True))


def _clock(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def run_row(
    model: torch.nn.Module,
    stream: Iterable[Any],
    method: Any,
    options: dict[str, Any] | None = None,
    inplace: bool = False,
    plain_model: torch.nn.Module | None = None,
    reset_every: int | None = None,
    *,
    window: Any = None,
    guard: Any = None,
    measure_time: bool = True,
    measure_memory: bool = True,
    warmup_steps: int = 1,
) -> tuple[dict[str, Any], qtta_plugins.Adaptation]:
    """Adapt ``model`` over ``stream`` with ``method`` (a name plus ``options``, or a config
    object); return its measurements and the :class:`~qtta_plugins.Adaptation`.

    The run restarts at each domain when the stream says so (``stream.reset_on_shift``, the reset
    setting) and every ``reset_every`` batches when given. ``window``: ``adapt``'s sliding window
    (an int or a :class:`~qtta_plugins.WindowConfig`; ``None``: none); ``guard``: its collapse guard
    (``True`` or a :class:`~qtta_plugins.GuardConfig`; ``None``: none). ``plain_model``: what plain inference
    runs (default: a copy of ``model``, in eval mode; pass a compiled copy to time a compiled
    model against itself). Batches go to the model's device before either clock starts.

    Returns ``(stats, run)``; ``stats``: ``errors`` (per domain and ``mean``, as
    :meth:`~qtta_plugins.Adaptation.errors`), ``passes_per_batch`` (forward calls of the model per
    step, counted), ``time_ratio`` (median step time / median plain time, the first batch left
    out; ``None`` when ``measure_time`` is off), ``total_time_ratio`` (the same over sums: what a
    method that runs some batches in one pass costs on average), ``step_seconds`` /
    ``plain_seconds`` (the medians), ``peak_extra_mb``, ``peak_mb`` and ``memory_method`` (see
    :class:`PeakMemory`; ``None`` when ``measure_memory`` is off), and ``per_batch``: one
    ``(round, domain, wrong, n)`` per batch.
    """
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
        raise ValueError(f"warmup_steps must be an int >= 0, got {warmup_steps!r}")
    options = dict(options or {})
    device = model_device(model)
    plain = None
    if measure_time:
        plain = plain_model if plain_model is not None else copy_model(model)
        plain.eval()
    config_given = not isinstance(method, str) and method is not None
    run = qtta_plugins.adapt(
        model,
        None,
        method,
        progress=False,
        inplace=inplace,
        reset_every=reset_every,
        reset_on_shift=getattr(stream, "reset_on_shift", False),
        window=window,
        guard=guard,
        **({} if config_given else options),
    )
    calls = [0]

    def count(module: torch.nn.Module, args: Any) -> None:
        calls[0] += 1

    handle = run.model.register_forward_pre_hook(count)
    step_times: list[float] = []
    plain_times: list[float] = []
    per_batch: list[tuple[int, str, int, int]] = []
    memory = PeakMemory(device) if measure_memory else contextlib.nullcontext()
    try:
        with memory:
            for batch in stream:
                x = batch.x.to(device, non_blocking=True) if batch.x.device != device else batch.x
                if plain is not None:
                    with torch.no_grad():
                        t = _clock(device)
                        plain(x)
                        plain_times.append(_clock(device) - t)
                t = _clock(device)
                logits = run.step(x, batch.y, batch.domain)
                step_times.append(_clock(device) - t)
                wrong = int((logits.argmax(1).cpu() != batch.y.cpu()).sum())
                per_batch.append((int(batch.round), str(batch.domain), wrong, len(batch.y)))
    finally:
        handle.remove()
    if not step_times:
        raise ValueError("the stream is empty: there was no batch to adapt on")
    # the first batches carry one-off costs (lazy set-up, compilation): left out where there are more
    steps = step_times[warmup_steps:] or step_times
    stats: dict[str, Any] = {
        "errors": run.errors(),
        "passes_per_batch": calls[0] / len(step_times),
        "time_ratio": None,
        "total_time_ratio": None,
        "step_seconds": statistics.median(steps),
        "plain_seconds": None,
        "peak_extra_mb": None,
        "peak_mb": None,
        "memory_method": None,
        "per_batch": per_batch,
    }
    if plain_times:
        plains = plain_times[warmup_steps:] or plain_times
        stats["plain_seconds"] = statistics.median(plains)
        stats["time_ratio"] = statistics.median(steps) / statistics.median(plains)
        stats["total_time_ratio"] = sum(steps) / sum(plains)
    if isinstance(memory, PeakMemory):
        stats["peak_extra_mb"] = memory.extra_mb
        stats["peak_mb"] = memory.peak_mb
        stats["memory_method"] = memory.method
    return stats, run


def round_errors(per_batch: Iterable[tuple[int, str, int, int]]) -> list[float]:
    """Mean over domains of the error (%) in each round, from ``per_batch`` records."""
    rounds: dict[int, dict[str, list[int]]] = {}
    for rnd, dom, wrong, n in per_batch:
        acc = rounds.setdefault(int(rnd), {}).setdefault(dom, [0, 0])
        acc[0] += wrong
        acc[1] += n
    return [statistics.mean(100.0 * e / n for e, n in rounds[r].values()) for r in sorted(rounds)]


def stream_errors(per_batch: Iterable[tuple[int, str, int, int]]) -> list[tuple[int, str, float]]:
    """``(round, domain, error %)`` of each domain visit along the stream, in stream order."""
    out: list[list[Any]] = []
    for rnd, dom, wrong, n in per_batch:
        if out and out[-1][0] == rnd and out[-1][1] == dom:
            out[-1][2] += wrong
            out[-1][3] += n
        else:
            out.append([rnd, dom, wrong, n])
    return [(r, d, 100.0 * e / n) for r, d, e, n in out]


__all__ = ["DeviceStream", "PeakMemory", "round_errors", "run_row", "stream_errors"]
