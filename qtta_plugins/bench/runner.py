"""One cell of the grid, run: model, calibration, quantization, reconstruction, stream, adaptation.

:func:`run_cell` does, for one :class:`~qtta_plugins.bench.grid.Cell`:

1. the float model: trained by :func:`~qtta_plugins.models.train_source_model` (cached there) or
   loaded by :func:`~qtta_plugins.models.load_model` from its local checkpoint; moved to the
   config's ``device``;
2. the calibration batches (an in-memory source's train split, or images on disk read through the
   model's preprocessing), on the device;
3. :func:`qtta_plugins.quantize` at the cell's backend and bits, then the cell's
   :func:`qtta_plugins.reconstruct` variant, if any (its result kept on disk, keyed by
   everything that made it, so a resumed run does not reconstruct again);
4. the stream: :func:`qtta_plugins.data.make_stream` of the cell's setting, seed and batch size
   (an in-memory source with ``split_seed``: its test split drawn by that seed instead), its
   images moved to the device batch by batch;
5. :func:`~qtta_plugins.bench.measure.run_row`: :func:`qtta_plugins.adapt` step by step (with
   the row's ``window``), with the time ratio to plain inference and the peak memory (see
   :mod:`qtta_plugins.bench.measure`). A method that refuses the batch size
   (:class:`qtta_plugins.SmallBatchError`) makes a *refused* record: its error class and message,
   no error figure.

Models, calibration sets and quantized models are kept in small per-process memos keyed by the
parts of the cell spec they depend on: a sequential run (or a Ray worker that gets several cells)
builds each once; the results do not depend on whether a memo hit (each is a function of its key).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import platform
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

import qtta_plugins
from qtta_plugins.view import copy_model

from .cache import CellCache
from .config import Bench, ModelSpec
from .grid import Cell, cell_batch_size, cell_spec, method_config
from .measure import DeviceStream, round_errors, run_row


class _Memo:
    """The ``size`` most recently used values by key (a model per entry: kept few)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.items: OrderedDict[str, Any] = OrderedDict()

    def get(self, key: str, build: Callable[[], Any]) -> Any:
        if key in self.items:
            self.items.move_to_end(key)
            return self.items[key]
        value = build()
        self.items[key] = value
        while len(self.items) > self.size:
            self.items.popitem(last=False)
        return value

    def clear(self) -> None:
        self.items.clear()


_FLOAT = _Memo(2)
_CALIB = _Memo(4)
_QUANT = _Memo(3)


def clear_memos() -> None:
    """Forget every model and calibration set this process keeps (tests; memory)."""
    for memo in (_FLOAT, _CALIB, _QUANT):
        memo.clear()


def _key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=repr).encode()).hexdigest()


# --------------------------------------------------------------------------------------------
# models and preprocessing
# --------------------------------------------------------------------------------------------


def is_trained(spec: ModelSpec) -> bool:
    """Whether ``spec`` names an architecture that :func:`train_source_model` trains."""
    from ..models import ARCHITECTURES

    return spec.spec in ARCHITECTURES


def build_float_model(spec: ModelSpec) -> nn.Module:
    """The float model of ``spec``, on the CPU, in eval mode."""
    from ..models import load_model, train_source_model

    if is_trained(spec):
        train = spec.train
        return train_source_model(
            spec.spec,
            train.source,
            epochs=train.epochs,
            batch_size=train.batch_size,
            lr=train.lr,
            seed=train.seed,
            max_train=train.max_train,
            scale=train.scale,  # type: ignore[arg-type]
            progress=False,
        )
    return load_model(
        spec.spec, spec.weights, spec.num_classes, trusted=spec.trusted, **spec.kwargs
    ).eval()


def input_channels(spec: ModelSpec, model: nn.Module) -> int:
    """The image channels ``model`` takes: its architecture's (ours are gray), else its first
    convolution's, else 3 (RGB)."""
    from ..models import input_channels as arch_channels

    if is_trained(spec):
        return arch_channels(spec.spec)
    first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    return first.in_channels if first is not None else 3


def build_transform(transform: dict[str, Any] | None, model: nn.Module) -> Callable | None:
    """The model's preprocessing for images on disk (see :class:`~qtta_plugins.bench.config.DataSpec`):

    * ``timm``: :func:`qtta_plugins.data.timm_transform` (``resolve_data_config`` of the model,
      the other keys its overrides: ``input_size``, ``crop_pct``, ``interpolation``...);
    * ``torchvision``: ``torchvision.models.get_weight(weights).transforms()`` (the preset of a
      weights enum; nothing is downloaded);
    * ``eval``: ``Resize(size)``, ``CenterCrop(crop)``, ``ToTensor()``, ``Normalize(mean, std)``
      (each only when given);
    * ``callable``: ``factory(**options)`` of a ``package.module:function``.
    """
    if transform is None:
        return None
    options = {k: tuple(v) if isinstance(v, list) else v for k, v in transform.items()}
    kind = options.pop("kind")
    if kind == "timm":
        from ..data import timm_transform

        return timm_transform(model, **options)
    if kind == "callable":
        module, _, attr = str(options.pop("factory")).partition(":")
        factory: Any = importlib.import_module(module)
        for part in attr.split("."):
            factory = getattr(factory, part)
        return factory(**options)
    from ..models.zoo import import_torchvision

    tv = import_torchvision()
    if kind == "torchvision":
        return tv.models.get_weight(options.pop("weights")).transforms(**options)
    steps: list[Any] = []
    mode = tv.transforms.InterpolationMode(options.get("interpolation", "bilinear"))
    if options.get("size"):
        steps.append(tv.transforms.Resize(options["size"], interpolation=mode))
    if options.get("crop"):
        steps.append(tv.transforms.CenterCrop(options["crop"]))
    steps.append(tv.transforms.ToTensor())
    if options.get("mean") is not None or options.get("std") is not None:
        steps.append(tv.transforms.Normalize(options.get("mean"), options.get("std")))
    return tv.transforms.Compose(steps)


# --------------------------------------------------------------------------------------------
# calibration and the stream
# --------------------------------------------------------------------------------------------


def calibration_batches(
    bench: Bench,
    seed: int | None,
    transform: Callable | None,
    channels: int,
) -> list[torch.Tensor]:
    """The calibration batches (on the CPU): ``calibration.n`` images of its source, the first
    ones (``seed`` ``None``) or drawn under ``seed``, in batches of ``calibration.batch_size``.

    In memory: the train split of ``load_source(source, n_test=..., seed=split_seed)``; a seeded
    draw is ``torch.randperm(len(train), generator=manual_seed(seed))[:n]`` (the benchmarks'
    draw). On disk: the first ``n`` images of the source's continual stream under the seed
    (0 for ``first``), through the model's ``transform``, cut into batches the same way.
    """
    from ..data import SOURCES, load_source, make_stream, to_channels

    cal = bench.config.calibration
    if cal.source in SOURCES:
        train, _ = load_source(cal.source, n_test=cal.n_test, seed=cal.split_seed, size=cal.size)
        x = train.x
        if cal.n > len(x):
            raise ValueError(
                f"calibration.n is {cal.n}, but the {cal.source} train split has {len(x)} images"
            )
        if seed is None:
            x = x[: cal.n]
        else:
            gen = torch.Generator().manual_seed(seed)
            x = x[torch.randperm(len(x), generator=gen)[: cal.n]]
        x = to_channels(x, channels)
        return [x[i : i + cal.batch_size] for i in range(0, len(x), cal.batch_size)]
    stream = make_stream(
        "continual",
        cal.source,
        root=cal.root,
        corruptions=cal.corruptions,
        severity=cal.severity,
        image_list=cal.image_list,
        class_order=cal.class_order,
        batch_size=cal.batch_size,
        seed=0 if seed is None else seed,
        channels=channels,
        transform=transform,
        num_workers=cal.num_workers,
    )
    parts, have = [], 0
    for batch in stream:  # read only as many batches as the n images need
        parts.append(batch.x[: cal.n - have])
        have += len(parts[-1])
        if have >= cal.n:
            break
    x = torch.cat(parts)
    return [x[i : i + cal.batch_size] for i in range(0, len(x), cal.batch_size)]


def cell_stream(bench: Bench, cell: Cell, transform: Callable | None, channels: int) -> Any:
    """The cell's stream: ``make_stream(setting, source, seed=cell.seed, ...)`` (images on the
    CPU; the gradual setting walks its own severities, so the data's ``severity`` is not passed);
    with the data's ``split_seed`` passed on for an in-memory source."""
    from ..data import SOURCES, make_stream

    d = bench.data_spec(cell.data)
    kw: dict[str, Any] = {
        "severity": None if cell.setting == "gradual" else d.severity,
        "corruptions": d.corruptions,
        "batch_size": cell_batch_size(bench, cell),
        "rounds": d.rounds,
        "order": d.order,
        "dirichlet_delta": d.dirichlet_delta,
        "seed": cell.seed,
        "channels": channels,
        "per_domain": d.per_domain,
        "root": d.root,
    }
    if d.source in SOURCES:
        kw.update(n_test=d.n_test, size=d.size, progress=False, split_seed=d.split_seed)
    else:
        kw.update(
            transform=transform,
            num_workers=d.num_workers,
            image_list=d.image_list,
            class_order=d.class_order,
        )
    return make_stream(cell.setting, d.source, **kw)


def _reconstructed(
    bench: Bench,
    cell: Cell,
    spec: dict[str, Any],
    base: nn.Module,
    fp: nn.Module,
    calib: list[torch.Tensor],
) -> tuple[nn.Module, float | None]:
    """``reconstruct(base, fp, calib, method, **options)``, or its state dict from the cache
    folder's ``models/`` (loaded into a copy of ``base``: the same model, as a fresh reconstruction
    gives; the source statistics then measured again, as ``reconstruct`` does). Returns the model
    and the seconds the reconstruction took (``None`` when it came from the cache)."""
    from ..source import kept_source_statistics, state_fingerprint

    row = bench.reconstruct[cell.reconstruct]
    key = _key(
        spec["versions"],
        spec["model"],
        spec["calibration"],
        spec["quantize"],
        spec["reconstruct"],
        spec["device"],
        state_fingerprint(qtta_plugins.quant_view(base)),
    )[:24]
    path = CellCache(bench.config.cache).models_dir() / f"{spec['quantize']['backend']}-{key}.pt"
    if path.is_file():
        qm = copy_model(base)
        qm.load_state_dict(torch.load(path, map_location=spec["device"], weights_only=True))
        if kept_source_statistics(qm) is not None:
            from ..features import measure_source_statistics

            measure_source_statistics(qm, calib)
        return qm, None
    start = time.perf_counter()
    options = {"seed": cell.seed, **row.options}
    if "progress" in spec["reconstruct"]:
        options["progress"] = False  # the harness shows its own progress over cells
    qm = qtta_plugins.reconstruct(base, fp, calib, row.method, **options)
    seconds = time.perf_counter() - start
    from ..data.corruption import save_atomic

    path.parent.mkdir(parents=True, exist_ok=True)
    save_atomic(path, qm.state_dict())
    return qm, seconds


# --------------------------------------------------------------------------------------------
# the cell
# --------------------------------------------------------------------------------------------


def run_cell(bench: Bench, cell: Cell, spec: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run ``cell`` of ``bench`` and return its record (see :mod:`qtta_plugins.bench.results`):
    its labels, its ``spec`` (what determines it), mean ``error`` and ``errors`` per domain,
    ``round_errors`` on a stream of several rounds, the time ratio, passes per batch, peak memory,
    the predictions' SHA-256 (and the predictions, when ``measure.predictions``), per-batch
    errors (``measure.per_batch``), times and the environment."""
    start = time.perf_counter()
    config = bench.config
    spec = spec if spec is not None else cell_spec(bench, cell)
    device = torch.device(config.device)
    mspec = bench.model_spec(cell.model)
    fp = _FLOAT.get(_key(spec["model"], str(device)), lambda: build_float_model(mspec).to(device))
    channels = bench.data_spec(cell.data).channels or input_channels(mspec, fp)
    transform = build_transform(mspec.transform, fp)
    seed = cell.seed if config.calibration.draw == "seeded" else None
    calib = _CALIB.get(
        _key(spec["model"], spec["calibration"], channels, str(device)),
        lambda: [b.to(device) for b in calibration_batches(bench, seed, transform, channels)],
    )
    base_key = _key(spec["model"], spec["calibration"], spec["quantize"], channels, str(device))
    base = _QUANT.get(
        base_key,
        lambda: qtta_plugins.quantize(fp, cell.backend, cell.bits, calib, **config.quantize),
    )
    qmodel, rec_seconds = base, None
    if spec["reconstruct"] is not None:
        rec_key = _key(base_key, spec["reconstruct"])
        holder: list[float | None] = [None]

        def build() -> nn.Module:
            model, holder[0] = _reconstructed(bench, cell, spec, base, fp, calib)
            return model

        qmodel = _QUANT.get(rec_key, build)
        rec_seconds = holder[0]
    stream = cell_stream(bench, cell, transform, channels)
    row = bench.methods[cell.method]
    # methods draw from their own generators (config.seed); the global seed is set as the
    # benchmarks did, for any code that still draws from it
    torch.manual_seed(cell.seed)
    adapt_start = time.perf_counter()
    try:
        stats, run = run_row(
            qmodel,
            DeviceStream(stream, device),
            method_config(bench, cell),
            reset_every=row.reset_every,
            window=row.window_config(),
            guard=row.guard_config(),
            measure_time=config.measure.time,
            measure_memory=config.measure.memory,
        )
    except qtta_plugins.SmallBatchError as err:
        # the method refuses this batch size (before its step changed anything): a result of
        # the grid, recorded as such, not a failure of it
        return {
            **cell.labels(),
            "error": None,
            "errors": {},
            "round_errors": None,
            "refused": {"error": type(err).__name__, "message": str(err)},
            "reconstruct_seconds": rec_seconds,
            "adapt_seconds": time.perf_counter() - adapt_start,
            "seconds": time.perf_counter() - start,
            "environment": environment(device),
            "spec": spec,
        }
    adapt_seconds = time.perf_counter() - adapt_start
    errors = dict(stats["errors"])
    mean = errors.pop("mean")
    per_batch = stats.pop("per_batch")
    predictions = run.predictions.to(torch.int64).contiguous()
    record: dict[str, Any] = {
        **cell.labels(),
        "error": mean,
        "errors": errors,
        "round_errors": round_errors(per_batch) if len({b[0] for b in per_batch}) > 1 else None,
        **{k: v for k, v in stats.items() if k != "errors"},
        "batches": len(per_batch),
        "images": sum(b[3] for b in per_batch),
        "restarts": len(run.restarts),
        **({"guard_restarts": list(run.guard_restarts)} if run.guard is not None else {}),
        "predictions_sha256": hashlib.sha256(predictions.numpy().tobytes()).hexdigest(),
        "reconstruct_seconds": rec_seconds,
        "adapt_seconds": adapt_seconds,
        "seconds": time.perf_counter() - start,
        "environment": environment(device),
        "spec": spec,
    }
    if config.measure.per_batch:
        record["per_batch"] = [list(b) for b in per_batch]
    if config.measure.predictions:
        record["predictions"] = predictions.tolist()
    return record


def environment(device: torch.device) -> dict[str, Any]:
    """Where a cell ran: the device (a GPU's name), torch's threads, the machine."""
    name = str(device)
    if device.type == "cuda" and torch.cuda.is_available():
        name = f"{device} ({torch.cuda.get_device_name(device)})"
    return {
        "device": name,
        "threads": torch.get_num_threads(),
        "host": platform.node(),
        "machine": platform.machine(),
        "python": platform.python_version(),
    }


__all__ = [
    "build_float_model",
    "build_transform",
    "calibration_batches",
    "cell_stream",
    "clear_memos",
    "input_channels",
    "run_cell",
]
