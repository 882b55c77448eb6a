"""The harness's config: a YAML file plus ``KEY=VALUE`` overrides, checked before anything runs.

Loading goes through OmegaConf (the ``bench`` extra): YAML, ``${...}`` interpolation, and the
dotted overrides users of Marsden and Döbler's test-time-adaptation library know
(``qtta bench cfg.yaml seeds=[0,1] methods.tent.lr=1e-3 data.0.root=/data``). The schema is the
dataclasses below, merged by OmegaConf as a structured config: an unknown key or a value of the
wrong type fails there, with the full key named (and a close match suggested). What a type cannot
say (a setting name, a bit-width, a method's options) is checked next, before any model is built,
and raised as :class:`BenchConfigError` naming the key.

``data`` and ``model`` take one mapping or a list of them (each then a grid axis, told apart by
``name``); ``methods`` and ``reconstruct`` map a row name to its options, so that the same method
can appear with different options (``"tent + abl": {method: tent, abl: true}``).

Over 500 lines: the harness's whole schema, every key validated where it is read, with the error it gives.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1
"""Bumped when the meaning of a config key changes: part of every cell's cache key."""

DEVICES = ("cpu", "cuda")
DRAWS = ("first", "seeded")
TRANSFORM_KINDS = ("timm", "torchvision", "eval", "callable")
PLAN_AXES = (
    "data",
    "model",
    "backends",
    "bits",
    "reconstruct",
    "methods",
    "settings",
    "seeds",
    "batch_size",
)
#: options of a method row that the harness takes itself (the rest go to the method's config)
ROW_OPTIONS = ("method", "reset_every", "window", "guard")


class BenchConfigError(ValueError):
    """A config key that is unknown, missing or holds a value it cannot take (the message names
    the key, dotted from the top: ``data[1].severity``)."""


# --------------------------------------------------------------------------------------------
# the schema
# --------------------------------------------------------------------------------------------


@dataclass
class DataSpec:
    """A test stream: :func:`qtta_plugins.data.make_stream`'s source and arguments (the setting,
    seed and batch size come from the grid; images on disk go through the model's
    ``transform``). ``channels``: default the model's input channels. ``split_seed`` (in-memory
    sources): the seed of the test split (``load_source(..., seed=split_seed)``), one split for
    every cell, while the cell's seed still draws the rest (corruption noise, ``per_domain``
    subset, order); ``None``: the cell's seed draws the split too."""

    name: str | None = None
    source: str | None = None
    root: str | None = None
    corruptions: list[str] | None = None
    severity: int | None = None
    per_domain: int | None = None
    n_test: int | None = None
    size: int = 32
    order: str | None = None
    dirichlet_delta: float = 0.1
    rounds: int | None = None
    image_list: str | None = None
    class_order: Any = None
    channels: int | None = None
    num_workers: int | None = None
    split_seed: int | None = None


@dataclass
class TrainSpec:
    """:func:`qtta_plugins.models.train_source_model`'s options, for a model ``spec`` that is one
    of its architectures (``source``: default the data's in-memory source)."""

    source: str | None = None
    epochs: int = 12
    batch_size: int = 64
    lr: float = 2e-3
    seed: int = 0
    max_train: int | None = None
    scale: str = "full"


@dataclass
class ModelSpec:
    """The float model: ``spec`` is an architecture of
    :func:`~qtta_plugins.models.train_source_model` (``bncnn``, ``resnet18``, ``timm-vit``...:
    trained on ``train.source`` and cached), or a :func:`~qtta_plugins.models.load_model` spec
    (``torchvision:resnet18``, ``timm:vit_base_patch16_224``, ``package.module:factory``, or a
    checkpoint file) with ``weights`` (a local file), ``num_classes``, ``trusted`` and the
    constructor's ``kwargs``.

    ``transform``: the model's preprocessing of images read from disk (data and calibration):
    ``timm`` (``resolve_data_config`` of the model; other keys override it, e.g. ``crop_pct``),
    ``{kind: torchvision, weights: ResNet18_Weights.IMAGENET1K_V1}`` (that preset; nothing is
    downloaded), ``{kind: eval, size: 256, crop: 224, mean: [...], std: [...]}`` or ``{kind:
    callable, factory: package.module:function, ...its keyword arguments}``; ``null``: images as
    ``[0, 1]`` tensors of their own size."""

    name: str | None = None
    spec: str | None = None
    weights: str | None = None
    num_classes: int | None = None
    trusted: bool = False
    kwargs: dict[str, Any] = field(default_factory=dict)
    train: TrainSpec = field(default_factory=TrainSpec)
    transform: Any = None


@dataclass
class CalibrationSpec:
    """Clean images for ``quantize`` (and ``reconstruct``): ``n`` of them in batches of
    ``batch_size``. ``source``: an in-memory source (its train split under ``split_seed``, as
    ``load_source`` splits it) or any source on disk (read like the data, through the model's
    transform; e.g. ``folder`` over ImageNet's ``val/<wnid>/`` with ``corruptions: [val]``).
    ``draw``: ``first`` (the first ``n``: one calibration set for every seed) or ``seeded`` (drawn
    under each cell's seed: the spread over seeds then includes PTQ's)."""

    source: str | None = None
    root: str | None = None
    corruptions: list[str] | None = None
    severity: int | None = None
    image_list: str | None = None
    class_order: Any = None
    n_test: int | None = None
    size: int = 32
    split_seed: int = 0
    n: int = 512
    batch_size: int = 64
    draw: str = "first"
    num_workers: int | None = None


@dataclass
class MeasureSpec:
    """What each cell measures besides its errors: ``time`` (each step's time as a ratio to plain
    inference of the same quantized model, paired batch by batch), ``memory`` (peak memory of the
    adaptation loop), ``per_batch`` (errors per batch, for rounds and plots), ``predictions``
    (every prediction in the results; their SHA-256 is always kept)."""

    time: bool = True
    memory: bool = True
    per_batch: bool = True
    predictions: bool = False


@dataclass
class TablesSpec:
    """``paired``: ``[a, b]`` (or ``[a, b, note]``) row pairs whose error difference ``a - b`` is
    tabled seed by seed; ``digits`` after the decimal point."""

    paired: list[Any] = field(default_factory=list)
    digits: int = 1


@dataclass
class RaySpec:
    """Ray: ``address`` (``auto``, ``ray://host:10001``, ...; ``null``: run locally in sequence
    unless ``--ray`` is given), resources per task (``num_gpus`` default: 1 when ``device`` is
    ``cuda``, else 0)."""

    address: str | None = None
    num_cpus: float = 1.0
    num_gpus: float | None = None


@dataclass
class BenchConfig:
    """A whole benchmark: the grid's axes, what runs in each cell, and where results go.

    ``vars``: free values for ``${vars.name}`` interpolation elsewhere in the file (paths to fill
    in: ``qtta bench cfg.yaml vars.imagenet_c=/data``); a cell's key holds only what they are
    interpolated into."""

    name: str = "bench"
    description: str = ""
    vars: dict[str, Any] = field(default_factory=dict)
    data: Any = None
    model: Any = None
    calibration: CalibrationSpec = field(default_factory=CalibrationSpec)
    backends: list[str] = field(default_factory=lambda: ["torchao"])
    bits: list[str] = field(default_factory=lambda: ["w8a8"])
    quantize: dict[str, Any] = field(default_factory=dict)
    # empty here, filled in by validate(): OmegaConf merges a file's mapping into the schema's
    # default, which would add the default's rows to every config
    reconstruct: dict[str, Any] = field(default_factory=dict)
    methods: dict[str, Any] = field(default_factory=dict)
    settings: list[str] = field(default_factory=lambda: ["continual"])
    seeds: list[int] = field(default_factory=lambda: [0])
    # an int, or a list of them: a grid axis (the cells then carry a ``batch`` label)
    batch_size: Any = 64
    method_seed: int | None = None
    reset_every: int | None = None
    device: str = "cpu"
    threads: int | None = None
    measure: MeasureSpec = field(default_factory=MeasureSpec)
    plan: list[Any] | None = None
    tables: TablesSpec = field(default_factory=TablesSpec)
    cache: str | None = None
    out: str | None = None
    ray: RaySpec = field(default_factory=RaySpec)


@dataclass(frozen=True)
class MethodRow:
    """One row of ``methods``: the adapt ``method``, its config ``options``, ``reset_every`` and
    ``window`` (``adapt``'s sliding window: an int, or a mapping of
    :class:`~qtta_plugins.WindowConfig` fields; ``None``: none) and ``guard`` (``adapt``'s collapse
    guard: ``true``, or a mapping of :class:`~qtta_plugins.GuardConfig` fields; ``None``: none)."""

    name: str
    method: str
    options: dict[str, Any]
    reset_every: int | None
    window: int | dict[str, Any] | None = None
    guard: bool | dict[str, Any] | None = None

    def guard_config(self) -> Any:
        """``guard`` as a :class:`~qtta_plugins.GuardConfig` (``None``: no guard)."""
        from ..guard import as_guard

        return as_guard(self.guard)

    def window_config(self) -> Any:
        """``window`` as a :class:`~qtta_plugins.WindowConfig` (``None``: no window)."""
        from ..window import WindowConfig, as_window

        return (
            WindowConfig(**self.window) if isinstance(self.window, dict) else as_window(self.window)
        )


@dataclass(frozen=True)
class ReconstructRow:
    """One variant of ``reconstruct``: ``method`` ``None`` is the quantized model as it is."""

    name: str
    method: str | None
    options: dict[str, Any]


@dataclass
class Bench:
    """A validated config: :class:`BenchConfig` with ``data`` / ``model`` as lists of specs and
    the method and reconstruction rows resolved, paths made absolute (from the working
    directory). ``path``: the file it came from, if any."""

    config: BenchConfig
    data: list[DataSpec]
    models: list[ModelSpec]
    methods: dict[str, MethodRow]
    reconstruct: dict[str, ReconstructRow]
    path: Path | None = None

    def data_spec(self, name: str) -> DataSpec:
        return next(d for d in self.data if d.name == name)

    def model_spec(self, name: str) -> ModelSpec:
        return next(m for m in self.models if m.name == name)

    @property
    def batch_axis(self) -> bool:
        """Whether the batch size is a grid axis (``batch_size`` a list, or named by a ``plan``
        block): the cells then carry a ``batch`` label."""
        return isinstance(self.config.batch_size, list) or any(
            "batch_size" in block for block in self.config.plan or []
        )

    def batch_sizes(self) -> list[int]:
        """The config's batch sizes (one, or the axis's)."""
        b = self.config.batch_size
        return list(b) if isinstance(b, list) else [b]

    def as_dict(self) -> dict[str, Any]:
        """The config as plain data (what the results file records)."""
        out = asdict(self.config)
        out["data"] = [asdict(d) for d in self.data]
        out["model"] = [asdict(m) for m in self.models]
        return out


# --------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------


def _omegaconf() -> Any:
    try:
        import omegaconf
    except ImportError as err:
        raise ImportError(
            "qtta bench reads its config with OmegaConf, which is not installed: "
            "pip install 'qtta-plugins[bench]' (or pip install omegaconf)"
        ) from err
    return omegaconf


def load_config(
    source: str | os.PathLike[str] | Mapping[str, Any],
    overrides: Sequence[str] = (),
) -> Bench:
    """The validated config of a YAML file (or a mapping), with ``KEY=VALUE`` ``overrides``.

    Overrides take OmegaConf's dotted keys (``methods.tent.lr=1e-3``; list items by index,
    ``data.0.root=/data``) and YAML values (``seeds=[0,1,2]``, ``reconstruct.ttaq=null``); each
    is an assignment (``methods={tent: {}}`` replaces the rows; ``methods.eata={}`` adds one).

    Raises:
        FileNotFoundError: the config file does not exist.
        BenchConfigError: a key that is unknown, missing, or holds a bad value (named).
        ImportError: OmegaConf is not installed (the message names the ``bench`` extra).
    """
    omegaconf = _omegaconf()
    om = omegaconf.OmegaConf
    path: Path | None = None
    try:
        if isinstance(source, Mapping):
            raw = om.create(dict(source))
        else:
            path = Path(source).expanduser()
            if not path.is_file():
                raise FileNotFoundError(f"config file {path} does not exist")
            raw = om.load(path)
        if not isinstance(raw, omegaconf.DictConfig):
            raise BenchConfigError(f"{path or 'the config'} must be a mapping of keys at the top")
        for item in overrides:
            key, value = _parse_override(item, om)
            # an assignment, as in Hydra: methods={tent: {}} replaces the rows, methods.tent.lr=1e-3
            # sets one option
            om.update(raw, key, value, merge=False)
        merged = om.merge(om.structured(BenchConfig), raw)
        plain = om.to_container(merged, resolve=True)
    except omegaconf.errors.OmegaConfBaseException as err:
        raise BenchConfigError(_omegaconf_message(err)) from None
    config = BenchConfig(**{f.name: plain[f.name] for f in fields(BenchConfig)})
    # the nested dataclasses come back as dicts from to_container: rebuild them
    config.calibration = CalibrationSpec(**plain["calibration"])
    config.measure = MeasureSpec(**plain["measure"])
    config.tables = TablesSpec(**plain["tables"])
    config.ray = RaySpec(**plain["ray"])
    return validate(config, path)


def _parse_override(item: str, om: Any) -> tuple[str, Any]:
    if not isinstance(item, str) or "=" not in item or item.startswith("="):
        raise BenchConfigError(
            f"override {item!r} is not KEY=VALUE (e.g. seeds=[0,1] or methods.tent.lr=1e-3)"
        )
    key, _, text = item.partition("=")
    try:  # OmegaConf's own parse of the value (its YAML, where 1e-3 is a float)
        value = om.to_container(om.from_dotlist([f"v={text}"]))["v"]
    except Exception as err:
        raise BenchConfigError(
            f"override {item!r}: cannot read the value {text!r} ({err})"
        ) from None
    return key.strip(), value


def _omegaconf_message(err: Exception) -> str:
    """OmegaConf's message, led by the key it is about."""
    key = getattr(err, "full_key", None)
    first = str(err).splitlines()[0] if str(err) else type(err).__name__
    return f"config key {key!r}: {first}" if key else f"config: {first}"


def _merge_item(schema: type, item: Any, where: str) -> Any:
    """``item`` (a mapping) checked against the dataclass ``schema`` by OmegaConf; errors name
    the key under ``where``."""
    omegaconf = _omegaconf()
    om = omegaconf.OmegaConf
    if not isinstance(item, Mapping):
        raise BenchConfigError(f"{where} must be a mapping of keys, got {item!r}")
    try:
        plain = om.to_container(om.merge(om.structured(schema), dict(item)), resolve=True)
    except omegaconf.errors.OmegaConfBaseException as err:
        key = getattr(err, "full_key", None)
        first = str(err).splitlines()[0]
        raise BenchConfigError(f"config key '{where}.{key}': {first}" if key else first) from None
    if schema is ModelSpec:
        plain["train"] = TrainSpec(**plain["train"])
    return schema(**plain)


def _items(value: Any, key: str) -> list[Any]:
    if value is None:
        raise BenchConfigError(f"config key '{key}' is missing")
    if isinstance(value, Mapping):
        return [value]
    if isinstance(value, list) and value:
        return value
    raise BenchConfigError(f"config key '{key}' must be a mapping or a non-empty list of them")


# --------------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------------


def validate(config: BenchConfig, path: Path | None = None) -> Bench:
    """Every check a config can have before a model is built; a :class:`Bench` back."""
    from ..data import DISK_SOURCES, SETTINGS, SOURCES
    from ..models import ARCHITECTURES

    datas = [
        _merge_item(DataSpec, d, _where("data", i, config.data))
        for i, d in enumerate(_items(config.data, "data"))
    ]
    models = [
        _merge_item(ModelSpec, m, _where("model", i, config.model))
        for i, m in enumerate(_items(config.model, "model"))
    ]
    known_sources = (*SOURCES, *DISK_SOURCES)
    for i, d in enumerate(datas):
        where = _where("data", i, config.data)
        if d.source is None:
            raise BenchConfigError(
                f"config key '{where}.source' is missing: one of {', '.join(known_sources)}"
            )
        _choice(f"{where}.source", d.source, known_sources)
        d.name = d.name or d.source
        d.root = _path(d.root)
        d.image_list = _path(d.image_list)
        if isinstance(d.class_order, str):
            d.class_order = _path(d.class_order)
        _source_options(where, d.source, d)
        keys = (
            "severity",
            "per_domain",
            "n_test",
            "rounds",
            "channels",
            "num_workers",
            "split_seed",
        )
        for key in keys:
            _non_negative_int(
                f"{where}.{key}",
                getattr(d, key),
                minimum=0 if key in ("num_workers", "split_seed") else 1,
            )
    _unique("data", [d.name for d in datas])
    for i, m in enumerate(models):
        where = _where("model", i, config.model)
        if not m.spec:
            raise BenchConfigError(
                f"config key '{where}.spec' is missing: an architecture to train "
                f"({', '.join(ARCHITECTURES)}) or a load_model spec ('torchvision:resnet18', "
                "'timm:<name>', 'package.module:factory', a checkpoint file)"
            )
        trained = m.spec in ARCHITECTURES
        if not trained and ":" not in m.spec:  # a checkpoint file of a whole module
            if not Path(m.spec).expanduser().is_file():
                close = difflib.get_close_matches(m.spec, ARCHITECTURES, n=2)
                hint = f"; did you mean {', '.join(close)}?" if close else ""
                raise BenchConfigError(
                    f"config key '{where}.spec': {m.spec!r} is neither an architecture to train "
                    f"({', '.join(ARCHITECTURES)}), a load_model spec with ':' nor a file{hint}"
                )
            m.spec = _path(m.spec) or m.spec
        if trained and m.weights is not None:
            raise BenchConfigError(
                f"config key '{where}.weights': {m.spec!r} is trained by train_source_model; a "
                "checkpoint goes with a load_model spec (e.g. 'torchvision:resnet18')"
            )
        m.weights = _path(m.weights)
        m.transform = _transform(m.transform, f"{where}.transform")
        m.name = m.name or (Path(m.spec).stem if Path(m.spec).is_file() else m.spec)
        if trained:
            source = m.train.source or next((d.source for d in datas if d.source in SOURCES), None)
            if source is None:
                raise BenchConfigError(
                    f"config key '{where}.train.source' is missing: {m.spec!r} is trained on an "
                    f"in-memory source ({', '.join(SOURCES)}), and no data source is one"
                )
            _choice(f"{where}.train.source", source, SOURCES)
            m.train.source = source
    _unique("model", [m.name for m in models])

    _calibration(config.calibration, datas)
    from ..plugins import available_backends

    backends = available_backends()
    for i, b in enumerate(_list(config.backends, "backends")):
        if b not in ("torchao", "brevitas", "nncf") and b not in backends:
            raise BenchConfigError(
                f"config key 'backends[{i}]': unknown backend {b!r}; installed adapters: "
                f"{', '.join(backends) or 'none'}"
            )
    from ..config import parse_bits

    for i, bits in enumerate(_list(config.bits, "bits")):
        try:
            w, a = parse_bits(bits)
        except (TypeError, ValueError) as err:
            raise BenchConfigError(f"config key 'bits[{i}]': {err}") from None
        if not (2 <= w <= 8 and 2 <= a <= 8):
            raise BenchConfigError(f"config key 'bits[{i}]': {bits!r} is outside w2a2..w8a8")
    _quantize_options(config.quantize)
    for i, s in enumerate(_list(config.settings, "settings")):
        _choice(f"settings[{i}]", s, SETTINGS)
    for i, seed in enumerate(_list(config.seeds, "seeds")):
        _non_negative_int(f"seeds[{i}]", seed, minimum=0)
    _batch_sizes("batch_size", config.batch_size)
    _non_negative_int("method_seed", config.method_seed, minimum=0)
    _non_negative_int("reset_every", config.reset_every, minimum=1)
    _non_negative_int("threads", config.threads, minimum=1)
    device = config.device.split(":")[0]
    _choice("device", device, DEVICES)
    methods = _method_rows(config)
    reconstruct = _reconstruct_rows(config)
    if config.plan is not None:
        _plan(config, datas, models, methods, reconstruct)
    _pairs(config, datas, models)
    _paired(config.tables)
    _non_negative_int("tables.digits", config.tables.digits, minimum=0)
    if config.ray.num_cpus <= 0 or (config.ray.num_gpus is not None and config.ray.num_gpus < 0):
        raise BenchConfigError("config key 'ray': num_cpus must be > 0 and num_gpus >= 0")
    config.cache = _path(config.cache)
    return Bench(config, datas, models, methods, reconstruct, path)


def _where(key: str, i: int, value: Any) -> str:
    return key if isinstance(value, Mapping) else f"{key}[{i}]"


def _path(value: str | None) -> str | None:
    """A path from the config, ``~`` expanded and made absolute from the working directory (where
    the command runs, as for any command-line tool): a Ray worker, whose working directory is its
    own, then reads the same file, and the cache key names one file wherever the command ran."""
    if value is None:
        return None
    return os.path.abspath(os.path.expanduser(str(value)))


def _choice(key: str, value: Any, allowed: Sequence[str]) -> None:
    if value not in allowed:
        close = difflib.get_close_matches(str(value), list(allowed), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise BenchConfigError(
            f"config key '{key}': {value!r} is not one of {', '.join(allowed)}{hint}"
        )


def _non_negative_int(key: str, value: Any, *, minimum: int) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise BenchConfigError(f"config key '{key}' must be an int >= {minimum}, got {value!r}")


def _list(value: Any, key: str) -> list[Any]:
    if not isinstance(value, list) or not value:
        raise BenchConfigError(f"config key '{key}' must be a non-empty list")
    return value


def _unique(key: str, names: list[str]) -> None:
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise BenchConfigError(
            f"config key '{key}': the name(s) {', '.join(map(repr, twice))} appear more than "
            "once: give each entry its own 'name'"
        )


def _transform(value: Any, key: str) -> dict[str, Any] | None:
    """``None``, or ``{"kind": ..., **options}`` (a bare string is the kind)."""
    if value is None:
        return None
    if isinstance(value, str):
        value = {"kind": value}
    if not isinstance(value, Mapping):
        raise BenchConfigError(
            f"config key '{key}' must be a kind ({', '.join(TRANSFORM_KINDS)}) or a mapping with 'kind'"
        )
    value = dict(value)
    _choice(f"{key}.kind", value.get("kind"), TRANSFORM_KINDS)
    kind = value["kind"]
    if kind == "torchvision" and not isinstance(value.get("weights"), str):
        raise BenchConfigError(
            f"config key '{key}.weights' is missing: torchvision's preset of a weights enum, "
            "e.g. ResNet18_Weights.IMAGENET1K_V1 (nothing is downloaded: only its transforms)"
        )
    if kind == "callable" and not (
        isinstance(value.get("factory"), str) and ":" in value["factory"]
    ):
        raise BenchConfigError(f"config key '{key}.factory' must be 'package.module:function'")
    if kind == "eval":
        unknown = set(value) - {"kind", "size", "crop", "mean", "std", "interpolation"}
        if unknown:
            raise BenchConfigError(
                f"config key '{key}': unknown option(s) {sorted(unknown)} of the eval transform "
                "(size, crop, mean, std, interpolation)"
            )
        for opt in ("size", "crop"):
            _non_negative_int(f"{key}.{opt}", value.get(opt), minimum=1)
    return value


def _source_options(where: str, source: str, spec: Any) -> None:
    """Options that only a source on disk, or only one in memory, takes: an error naming the key
    when given to the other kind."""
    from ..data import SOURCES

    if source in SOURCES:
        wrong = [
            k
            for k in ("image_list", "class_order", "num_workers")
            if getattr(spec, k, None) is not None
        ]
        kind = f"{source!r} is in memory"
    else:
        # calibration's split_seed has a default (0); the data's is None unless given
        disk_wrong = ("n_test", "split_seed") if isinstance(spec, DataSpec) else ("n_test",)
        wrong = [k for k in disk_wrong if getattr(spec, k, None) is not None]
        kind = f"{source!r} is read from disk (use per_domain for a shorter stream)"
    if wrong:
        raise BenchConfigError(f"config key '{where}.{wrong[0]}': not taken here: {kind}")


def _pairs(config: BenchConfig, datas: list[DataSpec], models: list[ModelSpec]) -> None:
    """A model with a ``transform`` (preprocessing of images on disk) never meets in-memory data
    or calibration: their images are gray ``[0, 1]`` tensors, and skipping the model's
    normalisation there would run it on inputs it was not made for, silently."""
    from ..data import SOURCES

    by_name = {d.name: d for d in datas}
    blocks = config.plan or [{}]
    for m in models:
        if m.transform is None:
            continue
        if config.calibration.source in SOURCES:
            raise BenchConfigError(
                f"config key 'calibration.source': {config.calibration.source!r} is in memory "
                f"(gray [0, 1] tensors), but model {m.name!r} has a transform for images on disk"
            )
        for block in blocks:
            if m.name not in block.get("model", [m.name]):
                continue
            for name in block.get("data", list(by_name)):
                if by_name[name].source in SOURCES:
                    raise BenchConfigError(
                        f"config key 'model.transform': model {m.name!r} has a transform for "
                        f"images on disk, and data {name!r} is in memory (gray [0, 1] tensors): "
                        "run them in separate plan blocks, or drop the transform"
                    )


def _calibration(cal: CalibrationSpec, datas: list[DataSpec]) -> None:
    from ..data import DISK_SOURCES, SOURCES

    if cal.source is None:
        memory = [d for d in datas if d.source in SOURCES]
        if not memory:
            raise BenchConfigError(
                "config key 'calibration.source' is missing: the data is on disk, so name clean "
                "calibration images (e.g. source: folder, root: <ImageNet>, corruptions: [val])"
            )
        cal.source = memory[0].source  # its train split, as the source model was trained on
    _choice("calibration.source", cal.source, (*SOURCES, *DISK_SOURCES))
    _choice("calibration.draw", cal.draw, DRAWS)
    for key in ("n", "batch_size"):
        _non_negative_int(f"calibration.{key}", getattr(cal, key), minimum=1)
    _non_negative_int("calibration.split_seed", cal.split_seed, minimum=0)
    _source_options("calibration", cal.source, cal)
    _non_negative_int("calibration.num_workers", cal.num_workers, minimum=0)
    cal.root = _path(cal.root)
    cal.image_list = _path(cal.image_list)
    if isinstance(cal.class_order, str):
        cal.class_order = _path(cal.class_order)


def _quantize_options(options: dict[str, Any]) -> None:
    from ..config import QuantConfig

    names = {f.name for f in fields(QuantConfig)} - {"backend", "weight_bits", "act_bits"}
    for key in options:
        if key not in names:
            close = difflib.get_close_matches(key, sorted(names), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise BenchConfigError(
                f"config key 'quantize.{key}': not an option of quantize{hint}; options: "
                f"{', '.join(sorted(names))} (backends and bits are grid axes)"
            )
    try:
        QuantConfig(**options)
    except (TypeError, ValueError) as err:
        raise BenchConfigError(f"config key 'quantize': {err}") from None


def _method_rows(config: BenchConfig) -> dict[str, MethodRow]:
    """Each ``methods`` row built into its method's config once, so that an unknown option or a
    bad value fails here, naming the row."""
    from ..plugins import available_methods

    installed = available_methods("adapt")
    if not config.methods:
        raise BenchConfigError(
            "config key 'methods' is missing: name at least one method row (e.g. {source: {}, "
            "tent: {}})"
        )
    rows = {}
    for name, options in config.methods.items():
        key = f"methods.{name}"
        options = dict(options or {})
        method = options.pop("method", name)
        reset_every = options.pop("reset_every", config.reset_every)
        _non_negative_int(f"{key}.reset_every", reset_every, minimum=1)
        window = _window(options.pop("window", None), f"{key}.window")
        guard = _guard(options.pop("guard", None), f"{key}.guard")
        if method not in installed:
            close = difflib.get_close_matches(str(method), sorted(installed), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise BenchConfigError(
                f"config key '{key}': no installed plugin provides adaptation method "
                f"{method!r}{hint}; available: {', '.join(sorted(installed))} (a row named "
                "otherwise says which with 'method:')"
            )
        _build_options(installed[method].config_cls, method, options, key)
        rows[str(name)] = MethodRow(str(name), method, options, reset_every, window, guard)
    return rows


def _reconstruct_rows(config: BenchConfig) -> dict[str, ReconstructRow]:
    from ..plugins import available_methods

    installed = available_methods("reconstruct")
    if not config.reconstruct:
        config.reconstruct = {"none": None}  # the quantized model as it is
    rows = {}
    for name, options in config.reconstruct.items():
        key = f"reconstruct.{name}"
        if options is None:
            rows[str(name)] = ReconstructRow(str(name), None, {})
            continue
        if not isinstance(options, Mapping):
            raise BenchConfigError(
                f"config key '{key}' must be null (no reconstruction) or a mapping of options"
            )
        options = dict(options)
        method = options.pop("method", name)
        if method not in installed:
            raise BenchConfigError(
                f"config key '{key}': no installed plugin provides reconstruction method "
                f"{method!r}; available: {', '.join(sorted(installed)) or 'none'}"
            )
        _build_options(installed[method].config_cls, method, options, key)
        rows[str(name)] = ReconstructRow(str(name), method, options)
    return rows


def _build_options(config_cls: type, method: str, options: dict[str, Any], key: str) -> Any:
    """``config_cls(method=method, **options)``, its errors named with ``key``. An option's name
    from before a rename (``config_cls.renamed_options``) is accepted, with the config's
    DeprecationWarning naming the new one."""
    names = {f.name for f in fields(config_cls)}
    old_names = set(getattr(config_cls, "renamed_options", {}))
    unknown = [k for k in options if (k not in names and k not in old_names) or k == "method"]
    if unknown:
        close = difflib.get_close_matches(unknown[0], sorted(names), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise BenchConfigError(
            f"config key '{key}.{unknown[0]}': not an option of {config_cls.__name__}{hint}; "
            f"options: {', '.join(sorted(names - {'method'}))}"
        )
    try:
        return config_cls(method=method, **options)
    except (TypeError, ValueError) as err:
        raise BenchConfigError(f"config key '{key}': {err}") from None


def _plan(
    config: BenchConfig,
    datas: list[DataSpec],
    models: list[ModelSpec],
    methods: dict[str, MethodRow],
    reconstruct: dict[str, ReconstructRow],
) -> None:
    from ..data import SETTINGS

    names = {
        "data": [d.name for d in datas],
        "model": [m.name for m in models],
        "reconstruct": list(reconstruct),
        "methods": list(methods),
        "settings": list(SETTINGS),
    }
    if not isinstance(config.plan, list) or not config.plan:
        raise BenchConfigError("config key 'plan' must be a non-empty list of blocks (or null)")
    for i, block in enumerate(config.plan):
        key = f"plan[{i}]"
        if not isinstance(block, Mapping):
            raise BenchConfigError(f"config key '{key}' must be a mapping of grid axes")
        for axis, values in block.items():
            if axis not in PLAN_AXES:
                close = difflib.get_close_matches(str(axis), PLAN_AXES, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise BenchConfigError(
                    f"config key '{key}.{axis}': not a grid axis{hint}; axes: {', '.join(PLAN_AXES)}"
                )
            if not isinstance(values, list) or not values:
                raise BenchConfigError(f"config key '{key}.{axis}' must be a non-empty list")
            for j, v in enumerate(values):
                if axis in names:
                    if v not in names[axis]:
                        raise BenchConfigError(
                            f"config key '{key}.{axis}[{j}]': {v!r} is not defined; "
                            f"defined: {', '.join(map(str, names[axis]))}"
                        )
                elif axis == "seeds":
                    _non_negative_int(f"{key}.seeds[{j}]", v, minimum=0)
                elif axis == "batch_size":
                    _non_negative_int(f"{key}.batch_size[{j}]", v, minimum=1)
                elif axis == "bits":
                    from ..config import parse_bits

                    try:
                        parse_bits(v)
                    except (TypeError, ValueError) as err:
                        raise BenchConfigError(f"config key '{key}.bits[{j}]': {err}") from None


def _batch_sizes(key: str, value: Any) -> None:
    """An int >= 1, or a non-empty list of distinct ones (a grid axis)."""
    if isinstance(value, list):
        if not value:
            raise BenchConfigError(f"config key '{key}' must be an int >= 1 or a non-empty list")
        for i, v in enumerate(value):
            _non_negative_int(f"{key}[{i}]", v, minimum=1)
        if len(set(value)) != len(value):
            raise BenchConfigError(f"config key '{key}': {value!r} names a batch size twice")
        return
    if value is None:
        raise BenchConfigError(f"config key '{key}' must be an int >= 1 or a list of them")
    _non_negative_int(key, value, minimum=1)


def _guard(value: Any, key: str) -> bool | dict[str, Any] | None:
    """A row's ``guard``: ``None`` / ``false`` (none), ``true`` (the defaults) or a mapping of
    ``GuardConfig`` fields (``window``, ``drop``); checked by building it, errors naming the key."""
    from ..guard import as_guard

    if isinstance(value, Mapping):
        value = dict(value)
    try:
        as_guard(value)
    except (TypeError, ValueError) as err:
        raise BenchConfigError(f"config key '{key}': {err}") from None
    return value


def _window(value: Any, key: str) -> int | dict[str, Any] | None:
    """A row's ``window``: ``None``, an int (its length) or a mapping of ``WindowConfig`` fields
    (``length``, ``update_every``); checked by building it, errors naming the key."""
    from ..window import WindowConfig

    if value is None:
        return None
    try:
        if isinstance(value, Mapping):
            value = dict(value)
            names = {f.name for f in fields(WindowConfig)}
            unknown = sorted(set(value) - names)
            if unknown:
                raise BenchConfigError(
                    f"config key '{key}.{unknown[0]}': not a field of WindowConfig; fields: "
                    f"{', '.join(sorted(names))}"
                )
            WindowConfig(**value)
        else:
            WindowConfig(value)
    except (TypeError, ValueError) as err:
        if isinstance(err, BenchConfigError):
            raise
        raise BenchConfigError(f"config key '{key}': {err}") from None
    return value


def _paired(tables: TablesSpec) -> None:
    for i, pair in enumerate(tables.paired):
        if isinstance(pair, Mapping):
            pair = [pair.get("a"), pair.get("b"), pair.get("note", "")]
        if (
            not isinstance(pair, list | tuple)
            or len(pair) not in (2, 3)
            or not all(isinstance(p, str) for p in pair)
        ):
            raise BenchConfigError(
                f"config key 'tables.paired[{i}]' must be [row a, row b] or [a, b, note], got {pair!r}"
            )
        tables.paired[i] = list(pair) if len(pair) == 3 else [*pair, ""]


__all__ = [
    "SCHEMA_VERSION",
    "Bench",
    "BenchConfig",
    "BenchConfigError",
    "CalibrationSpec",
    "DataSpec",
    "MeasureSpec",
    "MethodRow",
    "ModelSpec",
    "RaySpec",
    "ReconstructRow",
    "TablesSpec",
    "TrainSpec",
    "load_config",
    "validate",
]
