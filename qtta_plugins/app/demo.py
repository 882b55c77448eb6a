"""``qtta demo``: a quantized model through a continual corruption stream, method by method.

Train (or load from the cache) a small BN CNN on the clean source data, quantize it with the chosen
backend, and run the 15-corruption continual stream (no reset between domains) once per method,
each on its own copy of the quantized model. Prints the error per domain and the mean, and writes a
plot of the error along the stream. ``setting=`` runs another stream setting of
:func:`qtta_plugins.data.make_stream` (reset-each-shift, gradual, mixed, Dirichlet, long), and
``reset_every=N`` adds the periodic reset (RDumb) to every method.
"""

from __future__ import annotations

import importlib.util
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import adapt, quant_view, quantize
from ..adaptation import check_reset_policy
from ..data import (
    CORRUPTIONS,
    GRADUAL_SEVERITIES,
    SETTINGS,
    ContinualStream,
    load_source,
    make_stream,
)
from ..errors import BackendNotInstalledError, UnknownBackendError
from ..models import accuracy, train_source_model

_SHORT = {
    "gaussian_noise": "gauss",
    "shot_noise": "shot",
    "impulse_noise": "impul",
    "defocus_blur": "defoc",
    "glass_blur": "glass",
    "motion_blur": "motn",
    "zoom_blur": "zoom",
    "snow": "snow",
    "frost": "frost",
    "fog": "fog",
    "brightness": "brit",
    "contrast": "contr",
    "elastic_transform": "elast",
    "pixelate": "pixel",
    "jpeg_compression": "jpeg",
}


@dataclass
class DemoResult:
    backend: str
    bits: str
    float_accuracy: float
    quant_accuracy: float
    errors: dict[str, dict[str, float]] = field(default_factory=dict)  # method -> domain -> error %
    batch_errors: dict[str, list[float]] = field(
        default_factory=dict
    )  # method -> error % per batch
    seconds: dict[str, float] = field(default_factory=dict)
    setting: str = "continual"

    def table(self) -> str:
        """Error per corruption (a gradual stream's severities of one corruption: their mean) and
        the mean over the stream's domains."""
        domains = [d for d in next(iter(self.errors.values())) if d != "mean"]
        columns = list(dict.fromkeys(corruption_of(d) for d in domains))
        head = (
            f"{'method':<8}"
            + "".join(f"{_SHORT.get(c, c[:5]):>6}" for c in columns)
            + f"{'mean':>7}"
        )
        lines = [head, "-" * len(head)]
        for method, errs in self.errors.items():
            cells = []
            for c in columns:
                values = [errs[d] for d in domains if corruption_of(d) == c]
                cells.append(sum(values) / len(values))
            row = f"{method:<8}" + "".join(f"{v:>6.1f}" for v in cells) + f"{errs['mean']:>7.1f}"
            lines.append(row)
        return "\n".join(lines)


# --- what the demo needs, checked before it starts -----------------------------------------------
@dataclass(frozen=True)
class Prerequisite:
    """A package the demo imports beyond the core dependencies: its import name, what the demo uses
    it for, and the qtta-plugins extra that installs it."""

    module: str
    purpose: str
    extra: str


#: Per built-in backend: ``"backend"``, what quantizing and adapting on it imports; ``"export"``,
#: what its export path imports (``qtta demo`` without ``--methods``, the tour, calls
#: ``qtta_plugins.export`` in its ZOA part). Each backend's extra installs both (pyproject.toml).
DEMO_PREREQUISITES: dict[str, dict[str, tuple[Prerequisite, ...]]] = {
    "torchao": {
        "backend": (Prerequisite("torchao", "the torchao backend", "torchao"),),
        "export": (),  # convert_pt2e and torch.compile: torchao and torch themselves
    },
    "brevitas": {
        "backend": (Prerequisite("brevitas", "the Brevitas backend", "brevitas"),),
        "export": tuple(
            Prerequisite(name, "Brevitas' ONNX (QCDQ) export", "brevitas")
            for name in ("onnx", "onnxoptimizer", "onnxscript")
        ),
    },
    "nncf": {
        "backend": (Prerequisite("nncf", "the NNCF backend", "nncf"),),
        # nncf.strip builds its torch FakeQuantize modules from torchao's observers
        "export": (Prerequisite("torchao", "nncf.strip, NNCF's export", "nncf"),),
    },
}


def _installed(module: str) -> bool:
    """Whether ``module`` can be imported, without importing it (a backend import costs seconds)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a missing parent package; a module without a spec
        return False


def missing_prerequisites(backend: str, *, tour: bool = True) -> list[Prerequisite]:
    """What ``qtta demo --backend backend`` would import and cannot: the backend's packages, and
    for the ``tour`` (``qtta demo`` without ``--methods``) those of its export path too. A backend
    this project does not ship is checked only for being installed (:func:`check_prerequisites`)."""
    needs = DEMO_PREREQUISITES.get(backend, {})
    parts = ("backend", "export") if tour else ("backend",)
    return [p for part in parts for p in needs.get(part, ()) if not _installed(p.module)]


def check_prerequisites(backend: str, *, tour: bool = True) -> None:
    """Stop before the demo starts when it could not finish: raise
    :class:`~qtta_plugins.errors.BackendNotInstalledError` naming every missing package, what the
    demo uses it for and the pip command that installs it, or
    :class:`~qtta_plugins.errors.UnknownBackendError` for a backend no installed plugin provides."""
    if not isinstance(backend, str) or not backend:
        raise UnknownBackendError(f"backend must be a backend's name, got {backend!r}")
    missing = missing_prerequisites(backend, tour=tour)
    if missing:
        purposes = "; ".join(dict.fromkeys(p.purpose for p in missing))
        extras = ",".join(dict.fromkeys(p.extra for p in missing))
        message = (
            f"qtta demo --backend {backend} needs {', '.join(p.module for p in missing)} (for "
            f"{purposes}), not installed: pip install 'qtta-plugins[{extras}]'"
        )
        exporting = {p.module for p in DEMO_PREREQUISITES[backend]["export"]}
        if tour and all(p.module in exporting for p in missing):
            message += (
                f" (or, without export, the continual table only: qtta demo --backend {backend} "
                "--methods source norm tent)"
            )
        raise BackendNotInstalledError(message)
    if backend not in DEMO_PREREQUISITES:
        from ..plugins import available_backends

        installed = available_backends()
        if backend not in installed:
            raise UnknownBackendError(
                f"unknown backend {backend!r}; installed adapters: {', '.join(installed) or 'none'} "
                f"(this project's: {', '.join(DEMO_PREREQUISITES)}, e.g. pip install "
                "'qtta-plugins[torchao]')"
            )


def corruption_of(domain: str) -> str:
    """The corruption of a domain name: ``"fog-3"`` (a gradual stream's) -> ``"fog"``; any other
    name as it is."""
    base, _, severity = domain.rpartition("-")
    return base if base in _SHORT and severity.isdigit() else domain


def run_demo(
    backend: str = "torchao",
    bits: str = "w4a4",
    methods: Sequence[str] = ("source", "norm", "tent"),
    *,
    source: str = "digits",
    severity: int | None = None,
    batch_size: int = 50,
    seed: int = 0,
    plot: str | Path | None = "qtta_demo.png",
    progress: bool | None = None,
    threads: int | None = 2,
    echo: bool = True,
    setting: str = "continual",
    reset_every: int | None = None,
    rounds: int | None = None,
) -> DemoResult:
    """Run the demo and return its figures (printing them when ``echo``).

    ``setting``: the stream, one of :data:`qtta_plugins.data.SETTINGS` (see
    :func:`~qtta_plugins.data.make_stream`); ``severity`` (default 5; not for ``"gradual"``) and
    ``rounds`` go to it. ``reset_every``: every method restarts from the source model every that
    many batches (:func:`qtta_plugins.adapt`). Bad values, and a backend or package the demo
    needs that is not installed (:func:`check_prerequisites`), raise before any training."""
    check_prerequisites(backend, tour=False)
    if setting not in SETTINGS:
        raise ValueError(f"unknown stream setting {setting!r}; settings: {', '.join(SETTINGS)}")
    check_reset_policy(reset_every, None)
    if setting == "gradual" and severity is not None:
        raise ValueError(
            "the gradual setting walks the severities 1..5..1 of each corruption: no severity"
        )
    if threads:
        torch.set_num_threads(threads)
    say = print if echo else (lambda *a, **k: None)
    t0 = time.perf_counter()
    model = train_source_model("bncnn", source, seed=seed, progress=progress)
    train, test = load_source(source, seed=seed)
    calib = [train.x[i : i + 64] for i in range(0, min(len(train), 512), 64)]
    qmodel = quantize(model, backend=backend, bits=bits, calib=calib)
    quant_view(qmodel).set_norm_mode("source")
    result = DemoResult(
        backend,
        bits.upper(),
        accuracy(model, test.x, test.y),
        accuracy(qmodel, test.x, test.y),
        setting=setting,
    )
    say(
        f"source model: {source} BN-CNN, clean accuracy {result.float_accuracy:.1f}% float, "
        f"{result.quant_accuracy:.1f}% {backend} {result.bits}  ({time.perf_counter() - t0:.0f}s)"
    )
    stream = make_stream(
        setting,
        source,
        severity=severity,
        corruptions=CORRUPTIONS,
        batch_size=batch_size,
        rounds=rounds,
        seed=seed,
        progress=progress,
    )
    batches = [(b.y, b.domain, b.sample_domains) for b in stream]  # the stream's batches, once
    labels = [y for y, _, _ in batches]
    for method in methods:
        t1 = time.perf_counter()
        run = adapt(qmodel, stream, method, progress=progress, reset_every=reset_every)
        errors = run.errors()
        if stream.mixed:  # each corruption's error, from the samples' own domains
            by_sample = sample_domain_errors(run.predictions, batches)
            errors = {**{d: by_sample[d] for d in stream.domains}, "mean": errors["mean"]}
        result.errors[method] = errors
        result.seconds[method] = time.perf_counter() - t1
        result.batch_errors[method] = batch_errors(run.predictions, labels)
    line = describe(setting, stream, source, severity, reset_every)
    say(f"\n{line}: {_per_what(setting)}, {backend} {result.bits}\n")
    say(result.table())
    if plot:
        save_plot(result, Path(plot), stream, [d for _, d, _ in batches], reset_every)
        say(f"\nplot: {plot}")
    say(f"total {time.perf_counter() - t0:.0f}s")
    return result


def describe(
    setting: str,
    stream: ContinualStream,
    source: str,
    severity: int | None = None,
    reset_every: int | None = None,
) -> str:
    """One line that says which stream a demo ran: setting, data, severity, domains, resets."""
    n = len(stream.domains)
    severity = 5 if severity is None else severity
    if setting == "gradual":
        ladder = ", ".join(map(str, GRADUAL_SEVERITIES))
        head = f"gradual {source}-C, severities {ladder} per corruption, {n} domains"
    elif setting == "mixed":
        head = f"mixed-domain {source}-C, severity {severity}, {n} domains pooled"
    else:
        kind = {"reset": "reset-each-shift", "dirichlet": "Dirichlet-label"}.get(
            setting, "continual"
        )
        head = f"{kind} {source}-C, severity {severity}, {n} domains"
    if stream.rounds > 1:
        head += f", {stream.rounds} rounds"
    resets = (["at each domain"] if stream.reset_on_shift else []) + (
        [f"every {reset_every} batches"] if reset_every is not None else []
    )
    return f"{head}, " + ("reset " + " and ".join(resets) if resets else "no reset")


def _per_what(setting: str) -> str:
    if setting == "gradual":
        return "error (%) per corruption (mean over its severities)"
    if setting == "long":
        return "error (%) per domain (all rounds)"
    return "error (%) per domain"


def sample_domain_errors(
    predictions: torch.Tensor, batches: Sequence[tuple[torch.Tensor, str, Sequence[str] | None]]
) -> dict[str, float]:
    """Error % per sample domain of a mixed-domain stream: ``predictions`` of a whole run against
    the stream's ``(labels, domain, sample_domains)`` per batch."""
    counts: dict[str, list[int]] = {}
    i = 0
    for y, domain, sample_domains in batches:
        wrong = (predictions[i : i + len(y)] != y).tolist()
        for d, w in zip(sample_domains or [domain] * len(y), wrong, strict=True):
            tally = counts.setdefault(d, [0, 0])
            tally[0] += int(w)
            tally[1] += 1
        i += len(y)
    return {d: 100.0 * e / n for d, (e, n) in counts.items()}


def save_plot(
    result: DemoResult,
    path: Path,
    stream: ContinualStream,
    batch_domains: Sequence[str],
    reset_every: int | None = None,
) -> None:
    """The error along the stream, a moving mean over half a domain's batches per method; a line
    at each change of corruption, ticks at the corruptions (at the rounds, on a stream of several
    rounds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 4))
    n_batches = len(batch_domains)
    per_domain = n_batches / (len(stream.domains) * stream.rounds)
    window = max(1, round(per_domain / 2))
    for method, errs in result.batch_errors.items():
        plot_moving_mean(ax, errs, window, f"{method} (mean {result.errors[method]['mean']:.1f}%)")
    segments = _segments([corruption_of(d) for d in batch_domains])
    if len(segments) <= 60:
        for _, start, _ in segments[1:]:
            ax.axvline(start - 0.5, color="0.85", lw=0.8)
    if stream.rounds > 1:
        per_round = n_batches / stream.rounds
        for r in range(1, stream.rounds):
            ax.axvline(r * per_round - 0.5, color="0.6", lw=0.8)
        ax.set_xticks([(r + 0.5) * per_round for r in range(stream.rounds)])
        ax.set_xticklabels([f"round {r + 1}" for r in range(stream.rounds)])
    else:
        ax.set_xticks([(start + end) / 2 for _, start, end in segments])
        ax.set_xticklabels(
            [_SHORT.get(name, name) for name, _, _ in segments], rotation=45, ha="right"
        )
    ax.set_ylabel(f"error % (moving mean over {window} batches)")
    resets = f", reset every {reset_every}" if reset_every else ""
    ax.set_title(
        f"{result.setting} stream{resets}, {result.backend} {result.bits}: error along the stream"
    )
    ax.set_ylim(0, 100)
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _segments(keys: Sequence[str]) -> list[tuple[str, int, int]]:
    """Runs of equal consecutive keys as ``(key, start, end)``."""
    out: list[tuple[str, int, int]] = []
    for i, key in enumerate(keys):
        if out and out[-1][0] == key:
            out[-1] = (key, out[-1][1], i + 1)
        else:
            out.append((key, i, i + 1))
    return out


def batch_errors(predictions: torch.Tensor, labels: Sequence[torch.Tensor]) -> list[float]:
    """Error % of each batch: ``predictions`` of a whole run against the stream's ``labels``."""
    out, i = [], 0
    for y in labels:
        out.append(100.0 * float((predictions[i : i + len(y)] != y).float().mean()))
        i += len(y)
    return out


def plot_moving_mean(ax: Any, errors: Sequence[float], window: int, label: str) -> None:
    """Per-batch errors as a moving mean over ``window`` batches, each point at its last batch."""
    t = torch.tensor(list(errors), dtype=torch.float64)
    smooth = t.unfold(0, window, 1).mean(1) if len(t) >= window else t
    start = window - 1 if len(t) >= window else 0
    ax.plot(range(start, start + len(smooth)), smooth.tolist(), label=label)


def mark_domains(ax: Any, n_domains: int, per_domain: float) -> None:
    """Light vertical lines at the domain boundaries of a stream plot."""
    for i in range(1, n_domains):
        ax.axvline(i * per_domain - 0.5, color="0.85", lw=0.8)
