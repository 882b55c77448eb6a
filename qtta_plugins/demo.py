"""``qtta demo``: a quantized model through a continual corruption stream, method by method.

Train (or load from the cache) a small BN CNN on the clean source data, quantize it with the chosen
backend, and run the 15-corruption continual stream (no reset between domains) once per method,
each on its own copy of the quantized model. Prints the error per domain and the mean, and writes a
plot of the error along the stream.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import adapt, quant_view, quantize
from .data import CORRUPTIONS, continual_stream, load_source
from .models import accuracy, train_source_model

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

    def table(self) -> str:
        domains = [d for d in next(iter(self.errors.values())) if d != "mean"]
        head = (
            f"{'method':<8}"
            + "".join(f"{_SHORT.get(d, d[:5]):>6}" for d in domains)
            + f"{'mean':>7}"
        )
        lines = [head, "-" * len(head)]
        for method, errs in self.errors.items():
            row = (
                f"{method:<8}"
                + "".join(f"{errs[d]:>6.1f}" for d in domains)
                + f"{errs['mean']:>7.1f}"
            )
            lines.append(row)
        return "\n".join(lines)


def run_demo(
    backend: str = "torchao",
    bits: str = "w4a4",
    methods: Sequence[str] = ("source", "norm", "tent"),
    *,
    source: str = "digits",
    severity: int = 5,
    batch_size: int = 50,
    seed: int = 0,
    plot: str | Path | None = "qtta_demo.png",
    progress: bool | None = None,
    threads: int | None = 2,
    echo: bool = True,
) -> DemoResult:
    """Run the demo and return its figures (printing them when ``echo``)."""
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
        backend, bits.upper(), accuracy(model, test.x, test.y), accuracy(qmodel, test.x, test.y)
    )
    say(
        f"source model: {source} BN-CNN, clean accuracy {result.float_accuracy:.1f}% float, "
        f"{result.quant_accuracy:.1f}% {backend} {result.bits}  ({time.perf_counter() - t0:.0f}s)"
    )
    stream = continual_stream(
        source,
        severity=severity,
        corruptions=CORRUPTIONS,
        batch_size=batch_size,
        seed=seed,
        progress=progress,
    )
    labels = [b.y for b in stream]  # the stream's batches, once
    for method in methods:
        t1 = time.perf_counter()
        run = adapt(qmodel, stream, method, progress=progress)
        result.errors[method] = run.errors()
        result.seconds[method] = time.perf_counter() - t1
        result.batch_errors[method] = batch_errors(run.predictions, labels)
    say(
        f"\ncontinual {source}-C, severity {severity}, {len(stream.domains)} domains, no reset: "
        f"error (%) per domain, {backend} {result.bits}\n"
    )
    say(result.table())
    if plot:
        save_plot(result, stream.domains, Path(plot))
        say(f"\nplot: {plot}")
    say(f"total {time.perf_counter() - t0:.0f}s")
    return result


def save_plot(result: DemoResult, domains: Sequence[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 4))
    n_batches = len(next(iter(result.batch_errors.values())))
    per_domain = n_batches / len(domains)
    window = max(1, round(per_domain / 2))
    for method, errs in result.batch_errors.items():
        plot_moving_mean(ax, errs, window, f"{method} (mean {result.errors[method]['mean']:.1f}%)")
    mark_domains(ax, len(domains), per_domain)
    ax.set_xticks([(i + 0.5) * per_domain for i in range(len(domains))])
    ax.set_xticklabels([_SHORT.get(d, d) for d in domains], rotation=45, ha="right")
    ax.set_ylabel(f"error % (moving mean over {window} batches)")
    ax.set_title(f"continual stream, {result.backend} {result.bits}: error along the stream")
    ax.set_ylim(0, 100)
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


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
