"""The online loop around a test-time method: checks, rollback, reset, save / load, results.

:class:`Adaptation` owns a model's view and one :class:`~qtta_plugins.methods.base.TestTimeMethod`.
Each :meth:`Adaptation.step` checks the batch first (so a bad batch never reaches the model), backs up
what the method may change, runs ``forward_and_adapt``, and puts everything back if the step fails or
leaves a non-finite parameter. Predictions and, when the stream carries labels, errors per domain are
recorded in stream order.

A reset policy, for any method: ``reset_on_shift`` puts the model and the method back at their start
whenever the batch's domain changes (the reset-each-shift setting), ``reset_every=N`` every ``N``
batches (the periodic reset of RDumb, Press et al., NeurIPS 2023, which the long-stream studies find
as good as many continual methods). Such a restart keeps the predictions and results.
"""

from __future__ import annotations

import copy
import os
import pickle
import re
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from .config import AdaptConfig
from .errors import BadBatchError, SmallBatchError, UnsafeStateError
from .guard import CollapseGuard, GuardConfig
from .methods.base import TestTimeMethod
from .progress import show_progress
from .view import QuantView, model_device
from .window import Windowed


@dataclass
class DomainResult:
    domain: str
    n: int = 0
    errors: int = 0

    @property
    def error(self) -> float:
        """Error rate in percent."""
        return 100.0 * self.errors / self.n if self.n else float("nan")


@dataclass
class _Item:
    x: torch.Tensor
    y: torch.Tensor | None
    domain: str


def _unpack(item: Any) -> _Item:
    """A stream yields tensors, ``(x, y)`` / ``(x, y, domain)`` tuples, or objects with ``.x``."""
    if isinstance(item, torch.Tensor):
        return _Item(item, None, "stream")
    if hasattr(item, "x"):
        return _Item(item.x, getattr(item, "y", None), str(getattr(item, "domain", "stream")))
    if isinstance(item, tuple | list) and 1 <= len(item) <= 3:
        x = item[0]
        y = item[1] if len(item) > 1 else None
        domain = str(item[2]) if len(item) > 2 else "stream"
        return _Item(x, y, domain)
    raise BadBatchError(
        f"a stream must yield tensors, (x, y) pairs or batches with .x, not {type(item).__name__}"
    )


def calibration_batches(
    calib: Any,
    purpose: str,
    *,
    batches: int | None = None,
    images: int | None = None,
) -> list[torch.Tensor]:
    """Calibration data as a list of input tensors, read lazily: only what is used.

    ``calib``: one tensor (a single batch), or an iterable of tensors, ``(x, y)`` pairs (what a
    ``DataLoader`` over a labelled data set yields) or objects with ``.x``. Reading stops as soon as
    the list holds at least ``batches`` batches *and* at least ``images`` images (``None``: no bound
    on that count; both ``None``: the whole iterable), so a ``DataLoader`` over a training set is
    read for the few batches a caller keeps, never in full. Batches are kept whole: the caller
    trims what it does not use.

    Raises naming what is wrong, before reading further: ``TypeError`` for ``calib`` that is not a
    tensor or an iterable; :class:`BadBatchError` for a batch that is not a floating-point tensor;
    ``ValueError`` when there is no batch at all. ``purpose`` says who needs the data
    (``"quantize"``, ``"reconstruction"``)."""
    if isinstance(calib, torch.Tensor):
        items: Iterable[Any] = (calib,)
    elif isinstance(calib, Iterable) and not isinstance(calib, str | bytes | dict):
        items = calib
    else:
        raise TypeError(
            f"calib must be a tensor or an iterable of batches (tensors, (x, y) pairs, a "
            f"DataLoader), not {type(calib).__name__}: {purpose} reads calibration images from it"
        )
    bounded = batches is not None or images is not None
    kept: list[torch.Tensor] = []
    count = 0
    for item in items:
        b = item[0] if isinstance(item, tuple | list) and item else getattr(item, "x", item)
        if not isinstance(b, torch.Tensor) or not b.is_floating_point():
            what = f"a {b.dtype} tensor" if isinstance(b, torch.Tensor) else type(b).__name__
            raise BadBatchError(
                f"calibration batches must be floating-point tensors (or (x, y) pairs of them); "
                f"batch {len(kept)} is {what}"
            )
        kept.append(b)
        count += b.shape[0] if b.ndim else 1
        enough = (batches is None or len(kept) >= batches) and (images is None or count >= images)
        if bounded and enough:
            break  # what the caller uses is in hand: the rest is never read
    if not kept:
        raise ValueError(f"calib is empty: {purpose} needs at least one calibration batch")
    return kept


def calibration_images(calib: Any, purpose: str, images: int) -> torch.Tensor:
    """The first ``images`` calibration images as one tensor, read lazily through
    :func:`calibration_batches` (nothing past them); a single tensor is sliced, not copied.
    Raises ``ValueError`` for a 0-d batch or batches of different image shapes."""
    kept: list[torch.Tensor] = []
    count = 0
    for b in calibration_batches(calib, purpose, images=images):
        if b.ndim == 0:
            raise ValueError("calibration batches must hold images (N, ...), not a 0-d tensor")
        b = b.detach()[: images - count]
        kept.append(b)
        count += b.shape[0]
    if len(kept) == 1:
        return kept[0]
    try:
        return torch.cat(kept)
    except RuntimeError as exc:
        raise ValueError(f"calibration batches do not share one image shape: {exc}") from None


def check_batch(
    x: Any, sample_shape: tuple[int, ...] | None, device: torch.device | None = None
) -> torch.Tensor:
    """``x`` on the model's ``device``; raise :class:`BadBatchError` naming what is wrong with it.

    A batch on the CPU moves to the model's device (what a data loader yields); a batch on
    another accelerator, or on the meta device, is refused rather than copied behind the user's
    back. Nothing is changed by a refused batch: every check runs before the caller's step.

    The NaN / Inf check needs the answer on the host before the step may change anything, and a
    device cannot answer without a host sync. So it runs where the batch is: a CPU batch (a data
    loader's, also when the model is on a GPU) is checked on the CPU *before* it is copied, which
    costs no device sync, and the copy is asynchronous when the batch is in pinned memory
    (``DataLoader(pin_memory=True)``): such a batch reaches a CUDA model without any host sync
    here. Only a batch the caller already placed on the accelerator is checked there, at the price
    of one sync on a one-element flag (at the start of a step the device has this batch's
    reduction queued, nothing else of ours). Removing that one too would mean raising after the
    step and rolling it back, which the step's own post-update check could fold in; refusing
    before any change was preferred."""
    if not isinstance(x, torch.Tensor):
        raise BadBatchError(f"batch must be a torch.Tensor, got {type(x).__name__}")
    move = device is not None and x.device != device
    if move and (x.device.type != "cpu" or device.type == "meta"):  # type: ignore[union-attr]
        raise BadBatchError(
            f"batch is on {x.device}, the model on {device}: move it there (x.to('{device}'))"
        )
    if not x.is_floating_point():
        raise BadBatchError(
            f"batch has dtype {x.dtype}; expected a floating-point tensor "
            "(convert images with x.float() / 255 or your usual preprocessing)"
        )
    if x.ndim == 0 or x.shape[0] == 0:
        raise BadBatchError(f"batch is empty (shape {tuple(x.shape)})")
    if sample_shape is not None and tuple(x.shape[1:]) != tuple(sample_shape):
        raise BadBatchError(
            f"batch has shape {tuple(x.shape)}; this model expects (N, "
            f"{', '.join(map(str, sample_shape))})"
        )
    # where x is now: on the CPU before any copy (no device sync), or already on the device
    if not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).sum())  # counted on the error path only
        raise BadBatchError(f"batch contains {bad} NaN or Inf value(s) out of {x.numel()}")
    if move:
        x = x.to(device, non_blocking=x.is_pinned())
    return x


def check_labels(y: Any, x: torch.Tensor) -> None:
    """Raise :class:`BadBatchError` unless ``y`` holds one class index per sample of ``x``: shape
    ``(N,)``. Labels of shape ``(N, 1)`` would broadcast against the ``(N,)`` predictions into an
    ``(N, N)`` comparison and count errors above 100%."""
    if not isinstance(y, torch.Tensor):
        raise BadBatchError(
            f"labels must be a tensor of shape ({x.shape[0]},), one class index per sample of the "
            f"batch of shape {tuple(x.shape)}; got {type(y).__name__}"
        )
    if y.ndim != 1 or y.shape[0] != x.shape[0]:
        hint = (
            " (squeeze the extra axis: y.view(-1))"
            if y.ndim == 2 and y.shape[0] == x.shape[0] and y.shape[1] == 1
            else ""
        )
        raise BadBatchError(
            f"labels have shape {tuple(y.shape)}; expected ({x.shape[0]},), one class index per "
            f"sample of the batch of shape {tuple(x.shape)}{hint}"
        )


def check_reset_policy(reset_every: Any, reset_on_shift: Any) -> None:
    """Raise ``ValueError`` naming the problem unless ``reset_every`` is ``None`` or an int >= 1
    and ``reset_on_shift`` is ``None``, ``True`` or ``False``."""
    if reset_every is not None and (
        isinstance(reset_every, bool) or not isinstance(reset_every, int) or reset_every < 1
    ):
        raise ValueError(
            f"reset_every must be a number of batches >= 1 (or None: no periodic reset), got "
            f"{reset_every!r}"
        )
    if reset_on_shift is not None and not isinstance(reset_on_shift, bool):
        raise ValueError(
            "reset_on_shift must be True, False or None (None: as the stream says), got "
            f"{reset_on_shift!r}"
        )


class Adaptation:
    """A model adapting online to a stream, with its state.

    Attributes: ``model`` (the adapted model, still of its backend's kind), ``view``, ``method``,
    ``config``, ``predictions`` (every prediction so far, in order), ``results`` (per-domain errors
    when labels were given), ``reset_every`` / ``reset_on_shift`` (the reset policy, see
    :func:`qtta_plugins.adapt`), ``restarts`` (the index, counted as ``batches``, of each batch
    before which the policy put the model and method back at their start), ``guard`` (the collapse
    guard's state, ``None`` without one) and ``guard_restarts`` (those of ``restarts`` the guard
    asked for: :mod:`qtta_plugins.guard`).
    """

    def __init__(
        self,
        view: QuantView,
        method: TestTimeMethod,
        config: AdaptConfig,
        *,
        before: dict[str, Any] | None = None,
        reset_every: int | None = None,
        reset_on_shift: bool | None = None,
        guard: GuardConfig | None = None,
    ) -> None:
        """``before``: the model's snapshot from before the adaptation was set up (what
        :meth:`restore_model` puts back; :func:`qtta_plugins.adapt` passes it for in-place runs).
        ``reset_every``, ``reset_on_shift``: the reset policy; ``guard``: the collapse guard (see
        :func:`qtta_plugins.adapt`)."""
        check_reset_policy(reset_every, reset_on_shift)
        self.reset_every = reset_every
        self.reset_on_shift = reset_on_shift
        self.view = view
        self.method = method
        self.config = config
        self.sample_shape: tuple[int, ...] | None = getattr(view, "sample_shape", None)
        self._initial = (view.snapshot(), method._copy_state())
        self._before = before
        self._restored = False
        self._predictions: list[torch.Tensor] = []
        self.results: dict[str, DomainResult] = {}
        self.batches = 0
        self.restarts: list[int] = []
        self.guard = CollapseGuard(guard) if guard is not None else None
        self.guard_restarts: list[int] = []
        self._since_start = 0  # batches adapted since the start or the last restart
        self._last_domain: str | None = None

    @property
    def model(self) -> torch.nn.Module:
        return self.view.model

    @property
    def predictions(self) -> torch.Tensor:
        if not self._predictions:
            return torch.empty(0, dtype=torch.long)
        return torch.cat(self._predictions)

    # --- online use ------------------------------------------------------------------------------
    def step(
        self, x: torch.Tensor, y: torch.Tensor | None = None, domain: str = "stream"
    ) -> torch.Tensor:
        """Predict ``x`` and adapt on it; return the logits. A failing step changes nothing.

        The reset policy applies: with ``reset_on_shift=True``, a batch whose ``domain`` differs
        from the previous batch's first puts the model and the method back at their start (a
        restart); with ``reset_every=N``, so does every ``N``-th batch since the last start; with a
        guard, so does the batch after one whose predictions showed a collapse."""
        return self._step(x, y, domain, bool(self.reset_on_shift))

    def _step(
        self, x: torch.Tensor, y: torch.Tensor | None, domain: str, on_shift: bool
    ) -> torch.Tensor:
        if self._restored:
            raise RuntimeError(
                "this adaptation put its model back with restore_model(); start a new one with "
                "qtta_plugins.adapt"
            )
        x = check_batch(x, self.sample_shape, model_device(self.model))
        if y is not None:
            check_labels(y, x)
        self._check_batch_size(x.shape[0])
        restart = self._restart_due(domain, on_shift)
        guarded = restart and self.guard is not None and self.guard.due
        params = self.method.adapted_parameters()
        if restart:  # the restart is part of the step: a failing step undoes it too
            saved = (self.view.snapshot(), self.method._copy_state())
        else:
            backup = [p.detach().clone() for p in params]
            buffers = {k: b.detach().clone() for k, b in self.model.named_buffers()}
            method_state = self.method._copy_state()
        try:
            if restart:
                self._restore_start()
            logits = self.method.forward_and_adapt(x)
            if not torch.isfinite(logits).all():
                raise FloatingPointError("the model produced non-finite logits on this batch")
            if any(not torch.isfinite(p).all() for p in params):
                raise FloatingPointError("adaptation produced a non-finite parameter on this batch")
        except BaseException:
            if restart:
                self.view.restore(saved[0])
                self.method.reset()
                self.method.load_state_dict(saved[1])
            else:
                with torch.no_grad():
                    for p, kept in zip(params, backup, strict=True):
                        p.copy_(kept)
                    for k, b in self.model.named_buffers():
                        b.copy_(buffers[k])
                self.method.load_state_dict(method_state)
            raise
        if self.sample_shape is None:
            self.sample_shape = tuple(x.shape[1:])
        pred = logits.argmax(1)
        self._predictions.append(pred.detach().cpu())
        if y is not None:
            result = self.results.setdefault(domain, DomainResult(domain))
            result.n += int(y.numel())
            result.errors += int((pred.cpu() != y.cpu()).sum())
        if restart:
            self.restarts.append(self.batches)
            if guarded:
                self.guard_restarts.append(self.batches)
            if self.guard is not None:
                self.guard.restart()
            self._since_start = 0
        if self.guard is not None:
            self.guard.observe(pred, logits.shape[1])
        self._since_start += 1
        self._last_domain = domain
        self.batches += 1
        return logits

    def _check_batch_size(self, n: int) -> None:
        """Raise :class:`SmallBatchError` for a batch smaller than the method adapts on correctly
        (before anything changes): silently falling to chance is worse than refusing."""
        need = self.method.min_batch_size()
        if n >= need:
            return
        raise SmallBatchError(
            f"batch of {n} sample{'s' if n != 1 else ''}: method {self.config.method!r} "
            f"needs at least {need} per batch on this {self.view.backend} model (it normalises "
            "with, or compares, the statistics of the test batch, which so few samples cannot "
            "give). For a stream of single images use a sliding window, "
            f"adapt(..., window=16) or longer, which adapts on the last 16 inputs; or batch "
            f"{need} or more images; or a method that needs no batch ('source', or 'rotta' with "
            "its robust statistics)"
        )

    def _restart_due(self, domain: str, on_shift: bool) -> bool:
        if on_shift and self._last_domain is not None and domain != self._last_domain:
            return True
        if self.guard is not None and self.guard.due:
            return True
        return self.reset_every is not None and self._since_start >= self.reset_every

    def run(
        self, stream: Iterable[Any], *, progress: bool | None = None, desc: str | None = None
    ) -> torch.Tensor:
        """Adapt on every batch of ``stream`` in order; return this run's predictions.

        With ``reset_on_shift=None`` the stream's own ``reset_on_shift`` attribute (a stream of
        :func:`qtta_plugins.data.make_stream`'s ``"reset"`` setting carries ``True``) decides
        whether a change of domain restarts the run."""
        on_shift = self.reset_on_shift
        if on_shift is None:
            on_shift = getattr(stream, "reset_on_shift", False)
            if not isinstance(on_shift, bool):
                raise ValueError(
                    f"the stream's reset_on_shift must be True or False, got {on_shift!r}"
                )
        start = len(self._predictions)
        total = len(stream) if hasattr(stream, "__len__") else None  # type: ignore[arg-type]
        bar: Iterator[Any] = tqdm(
            stream,
            total=total,
            desc=desc or self.config.method,
            disable=not show_progress(progress),
            leave=False,
        )
        n = 0
        for item in bar:
            batch = _unpack(item)
            self._step(batch.x, batch.y, batch.domain, on_shift)
            n += 1
        if n == 0:
            raise BadBatchError("the stream is empty: there was no batch to adapt on")
        return torch.cat(self._predictions[start:])

    # --- results ---------------------------------------------------------------------------------
    def errors(self) -> dict[str, float]:
        """Error (%) per domain in stream order, and ``"mean"`` over domains."""
        out = {name: r.error for name, r in self.results.items()}
        if out:
            out["mean"] = sum(out.values()) / len(out)
        return out

    # --- state -----------------------------------------------------------------------------------
    def reset(self) -> None:
        """Back to the model and method state before the first batch; results are cleared."""
        self._restore_start()
        self._predictions.clear()
        self.results.clear()
        self.batches = 0
        self.restarts.clear()
        self.guard_restarts.clear()
        if self.guard is not None:
            self.guard.restart()
        self._since_start = 0
        self._last_domain = None

    def _restore_start(self) -> None:
        """The model and the method back at their state before the first batch (what the reset
        policy does between batches); predictions, results and counts stay."""
        model_state, method_state = self._initial
        self.view.restore(model_state)
        self.method.reset()
        # a copy: a method may keep the tensors it is given and update them in place
        self.method.load_state_dict(copy.deepcopy(method_state))

    def restore_model(self) -> None:
        """Put the model back as it was before :func:`qtta_plugins.adapt` set this run up (after an
        in-place run: parameters, buffers, quantizer bit-widths and switches, norm mode, requires_grad,
        including what the adapter corrected for adaptation), the method back at its start, and
        the results cleared; the run takes no further step. After a run on a copy (the default) your
        model was never changed, and this resets the copy."""
        self.reset()
        if self._before is not None:
            self.view.restore(self._before)
        self._restored = True

    def state_dict(self) -> dict[str, Any]:
        return {
            "method": self.config.method,
            "config": asdict(self.config),
            "model": self.view.snapshot(),
            "method_state": self.method._copy_state(),
            "batches": self.batches,
            "sample_shape": self.sample_shape,
            "since_start": self._since_start,
            "last_domain": self._last_domain,
            "window": self._window_tag(),
            "guard": None if self.guard is None else self.guard.state_dict(),
        }

    def _window_tag(self) -> tuple[int, int | None] | None:
        """``(length, update_every)`` of the run's sliding window, ``None`` without one."""
        if isinstance(self.method, Windowed):
            return (self.method.window.length, self.method.window.update_every)
        return None

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("method") != self.config.method:
            raise ValueError(
                f"state is for method {state.get('method')!r}, this adaptation runs {self.config.method!r}"
            )
        saved_window = state.get("window")
        saved_window = tuple(saved_window) if isinstance(saved_window, list | tuple) else None
        if saved_window != self._window_tag():

            def says(w: tuple[Any, ...] | None) -> str:
                return "no window" if w is None else f"window={w[0]}, update_every={w[1]}"

            raise ValueError(
                f"state was saved by a run with {says(saved_window)}; this run has "
                f"{says(self._window_tag())}: adapt with the same window to load it"
            )
        current = (self.view.snapshot(), self.method._copy_state())
        try:
            self.view.restore(state["model"])
            self.method.load_state_dict(state["method_state"])
        except BaseException:
            self.view.restore(current[0])
            self.method.load_state_dict(current[1])
            raise
        self.batches = state.get("batches", 0)
        self.sample_shape = state.get("sample_shape", self.sample_shape)
        self._since_start = state.get("since_start", self.batches)
        self._last_domain = state.get("last_domain")
        if self.guard is not None:
            # a state saved without a guard: the guard starts over from this point
            saved_guard = state.get("guard")
            if saved_guard is None:
                self.guard.restart()
            else:
                self.guard.load_state_dict(saved_guard)

    def save(self, path: str | os.PathLike[str]) -> None:
        torch.save(self.state_dict(), path)

    def load(self, path: str | os.PathLike[str], *, trusted: bool = False) -> None:
        """Load a state :meth:`save` wrote. The file is read with ``torch.load(weights_only=True)``:
        only tensors, numbers, strings and containers, so a file cannot run code when loaded; one
        that holds anything else raises :class:`~qtta_plugins.errors.UnsafeStateError` and
        changes nothing. A ``foa`` state holds its CMA-ES object, which only full unpickling
        rebuilds: pass ``trusted=True`` for a file you wrote yourself (never for one you were sent).
        """
        try:
            state = torch.load(path, weights_only=not trusted)
        except pickle.UnpicklingError as exc:
            found = re.search(r"WeightsUnpickler error: ([^\n]*)", str(exc))
            detail = found.group(1).strip() if found else str(exc).splitlines()[0]
            raise UnsafeStateError(
                f"refusing to load {os.fspath(path)!r}: it holds more than tensors, numbers, "
                f"strings and containers ({detail}), and unpickling it could run arbitrary code. "
                "If you wrote this file yourself (a 'foa' state holds its CMA-ES object), load it "
                "with load(path, trusted=True)."
            ) from None
        if not isinstance(state, dict):
            raise ValueError(
                f"{os.fspath(path)!r} does not hold an adaptation state (a dict from "
                f"Adaptation.save), but a {type(state).__name__}"
            )
        self.load_state_dict(state)
