"""``qtta demo``: the tour of the three methods this project brings to quantized models.

On scikit-learn's bundled digits (nothing is downloaded), with one backend (torchao by default):

1. **TTAQ**: quantize at low precision, reconstruct with ``qdrop`` and with ``ttaq`` (demo-sized
   iterations), then adapt with Tent (+ ABL) against PTQ without reconstruction + Tent, on an
   i.i.d. and a class-imbalanced (Dirichlet) continual stream of the 15 corruptions at severity 5.
2. **ZOA**: the deployable model (what :func:`qtta_plugins.export` gives, where the backend's export
   is a torch module our view recognises: torchao's integer Q/DQ graph; otherwise the quantized
   model), adapted forward-only with ZOA against FOA and BN-adapt (``norm``), with the time per
   batch as a ratio to plain inference measured as ``qtta bench`` measures it
   (:func:`qtta_plugins.bench.measure.run_row`: paired batch by batch in the same run).
3. **RTF-Q**: a small bank of quantized subnets (width x resolution x bits) trained briefly for one
   target domain (digits under fog), ``select_subnet`` under three MAC budgets, and each
   materialized model's accuracy next to its table row.

One summary table (printed, and written with the figures as ``summary.md`` / ``summary.json``) and
two plots (``stream.png``: error along the stream; ``rtfq_frontier.png``) in ``out_dir``.

The figures are a demo's: one seed, demo-sized reconstruction and bank training. The published,
seeded tables are in docs/ttaq.md, docs/zoa.md and docs/rtfq.md.
"""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import adapt, export, quant_view, quantize, reconstruct, select_subnet
from ..bench.measure import run_row
from ..data import ContinualStream, continual_stream, corrupt_set, load_source
from ..models import accuracy, train_source_model
from .demo import batch_errors, check_prerequisites

#: reconstruction iterations per block in the demo (the methods' default is 1000)
DEMO_ITERS = 40  # keep in step with the cli default
#: RTF-Q bank training steps in the demo (docs/rtfq.md trains 300)
DEMO_BANK_STEPS = 40  # keep in step with the cli default
#: test images per corruption in the demo's streams (of the 500 of digits' test split)
DEMO_PER_DOMAIN = 150
#: the RTF-Q demo's target domain: digits under this corruption, at this severity (the float
#: source model keeps about a third of its accuracy there; fog leaves it at chance)
RTFQ_TARGET = ("motion_blur", 5)
#: the demo's bank: 2 widths x 2 resolutions x 2 bit-widths (docs/rtfq.md: 3 x 3 x 3)
DEMO_BANK = {"widths": (0.5, 1.0), "resolutions": (32, 24), "bits": (8, 4)}
#: the budgets ``select_subnet`` is called with, as fractions of the full subnet's MACs
BUDGETS = (0.3, 0.6, 1.0)


@dataclass
class Row:
    """One line of the summary table."""

    part: str
    name: str
    clean: float | None = None  # clean accuracy %, where it says something
    error: float | None = None  # mean error % on the (i.i.d.) stream / the target test split
    error_dirichlet: float | None = None
    note: str = ""


@dataclass
class TourResult:
    backend: str
    bits: str
    float_accuracy: float
    rows: list[Row] = field(default_factory=list)
    curves: dict[str, list[float]] = field(default_factory=dict)  # row -> error % per batch
    frontier: list[dict[str, Any]] = field(default_factory=list)  # the bank's table
    selected: list[dict[str, Any]] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)  # part -> wall time
    zoa_model: str = ""  # what the ZOA part adapted: the exported integer model, or the quantized

    def table(self) -> str:
        head = f"{'part':<6} {'row':<34} {'clean':>6} {'error':>6} {'Dirich':>7}  note"
        lines = [head, "-" * (len(head) + 26)]
        part = None
        for r in self.rows:
            if part is not None and r.part != part:
                lines.append("")
            part = r.part
            lines.append(
                f"{r.part:<6} {r.name:<34} {_pct(r.clean):>6} {_pct(r.error):>6} "
                f"{_pct(r.error_dirichlet):>7}  {r.note}".rstrip()
            )
        return "\n".join(lines)

    def markdown(self) -> str:
        out = [
            "| part | row | clean acc % | error % | error %, Dirichlet | note |",
            "|---" * 6 + "|",
        ]
        for r in self.rows:
            cells = [r.part, r.name, _pct(r.clean), _pct(r.error), _pct(r.error_dirichlet), r.note]
            out.append("| " + " | ".join(c or "" for c in cells) + " |")
        return "\n".join(out)


def _pct(value: float | None) -> str:
    return "" if value is None else f"{value:.1f}"


def run_tour(
    backend: str = "torchao",
    *,
    bits: str = "w4a4",
    seed: int = 0,
    iters: int = DEMO_ITERS,
    bank_steps: int = DEMO_BANK_STEPS,
    batch_size: int = 50,
    per_domain: int = DEMO_PER_DOMAIN,
    out_dir: str | Path | None = None,
    progress: bool | None = None,
    threads: int | None = 2,
    echo: bool = True,
) -> TourResult:
    """Run the tour and return its figures (printing them when ``echo``; writing the summary and
    the plots to ``out_dir`` unless it is ``None``). A backend or package the tour needs that is
    not installed raises before any training (:func:`~qtta_plugins.app.demo.check_prerequisites`)."""
    check_prerequisites(backend, tour=True)
    if threads:
        torch.set_num_threads(threads)
    say: Callable[..., None] = (lambda *a: print(*a, flush=True)) if echo else (lambda *a: None)
    start = time.perf_counter()
    model = train_source_model("bncnn", "digits", seed=seed, progress=progress)
    train, test = load_source("digits", seed=seed)
    calib = [train.x[i : i + 64] for i in range(0, min(len(train), 512), 64)]
    result = TourResult(backend, bits.upper(), accuracy(model, test.x, test.y))
    say(
        f"source model: digits BN-CNN, {result.float_accuracy:.1f}% clean accuracy (float); "
        f"backend {backend}, {result.bits}"
    )
    streams = {
        order: continual_stream(
            "digits",
            severity=5,
            batch_size=batch_size,
            order=order,
            seed=seed,
            progress=progress,
            per_domain=per_domain,
        )
        for order in ("iid", "dirichlet")
    }
    result.seconds["setup"] = time.perf_counter() - start

    t = time.perf_counter()
    qmodel = _ttaq_part(result, model, calib, test, streams, iters, seed, progress, say)
    result.seconds["TTAQ"] = time.perf_counter() - t
    t = time.perf_counter()
    _zoa_part(result, qmodel, calib, test, streams["iid"], progress, say)
    result.seconds["ZOA"] = time.perf_counter() - t
    t = time.perf_counter()
    _rtfq_part(result, model, train, test, bank_steps, seed, progress, say)
    result.seconds["RTF-Q"] = time.perf_counter() - t
    result.seconds["total"] = time.perf_counter() - start

    stream = streams["iid"]
    say(
        f"\nsummary: digits-C, severity 5, {len(stream.domains)} corruptions x {per_domain} "
        f"images as one continual stream (i.i.d. and Dirichlet-ordered labels), batch "
        f"{batch_size}; {backend} {result.bits}; error %"
    )
    say(result.table())
    if out_dir is not None:
        paths = write_outputs(result, stream, Path(out_dir))
        say("\n" + "written: " + ", ".join(str(p) for p in paths))
    say(
        "time: "
        + ", ".join(f"{k} {v:.0f}s" for k, v in result.seconds.items() if k != "total")
        + f"; total {result.seconds['total']:.0f}s"
    )
    return result


# --- 1. TTAQ ------------------------------------------------------------------------------------
def _ttaq_part(result, model, calib, test, streams, iters, seed, progress, say):
    say(f"\n[TTAQ] quantize at {result.bits}, then reconstruct with qdrop and ttaq")
    # "PTQ only": quantize's calibrated ranges (least-error weights, percentile activations below
    # 8 bit), no reconstruction
    ptq = {"ptq": quantize(model, backend=result.backend, bits=result.bits, calib=calib)}
    notes = {"ptq": "PTQ: calibrated ranges only"}
    for method in ("qdrop", "ttaq"):
        t = time.perf_counter()
        ptq[method] = reconstruct(
            ptq["ptq"], model, calib, method, iters=iters, seed=seed, progress=progress
        )
        notes[method] = f"reconstruct {iters} it/block: {time.perf_counter() - t:.0f}s"
    clean = {name: accuracy(q, test.x, test.y) for name, q in ptq.items()}
    rows = (
        ("PTQ only + Tent", "ptq", False),
        ("QDrop + Tent", "qdrop", False),
        ("QDrop + Tent + ABL", "qdrop", True),
        ("TTAQ + Tent + ABL", "ttaq", True),
    )
    labels = [b.y for b in streams["iid"]]  # the curves are drawn along the i.i.d. stream
    for label, name, abl in rows:
        errors = {}
        for order, stream in streams.items():
            run = adapt(ptq[name], stream, "tent", abl=abl, seed=seed, progress=progress)
            errors[order] = run.errors()["mean"]
            if order == "iid":
                result.curves[label] = batch_errors(run.predictions, labels)
        result.rows.append(
            Row("TTAQ", label, clean[name], errors["iid"], errors["dirichlet"], notes[name])
        )
        say(f"  {label:<20} error {errors['iid']:.1f} (Dirichlet {errors['dirichlet']:.1f})")
    return ptq["ptq"]


# --- 2. ZOA -------------------------------------------------------------------------------------
def _zoa_part(result, qmodel, calib, test, stream, progress, say):
    deployed, what = _deployable(qmodel)
    result.zoa_model = what
    say(f"\n[ZOA] forward-only adaptation of {what}")
    clean = accuracy(deployed, test.x, test.y)
    rows = (
        ("source (no adaptation)", "source", {}),
        ("BN-adapt (norm)", "norm", {}),
        ("FOA", "foa", {"source_data": calib}),
        ("ZOA", "zoa", {"source_data": calib}),
    )
    labels = [b.y for b in stream]
    for label, method, options in rows:
        # the harness's measurement (qtta bench): each step timed against plain inference of the
        # same model on the same batch just before it, the median ratio, the first batch left out
        stats, run = run_row(deployed, stream, method, options, measure_memory=False)
        error = run.errors()["mean"]
        result.curves[label] = batch_errors(run.predictions, labels)
        note = f"{stats['time_ratio']:.1f}x plain inference per batch"
        result.rows.append(
            Row("ZOA", label, clean if method == "source" else None, error, None, note)
        )
        say(f"  {label:<22} error {error:.1f}, {note}")


def _deployable(qmodel: torch.nn.Module) -> tuple[torch.nn.Module, str]:
    """What the backend deploys, where its export gives a torch module our view recognises
    (torchao: the integer Q/DQ graph); otherwise the quantized model itself, with a warning that
    says so: the ZOA rows then show adaptation of the fake-quantized model, not of the deployed
    one (Brevitas deploys an ONNX graph; NNCF's ``strip`` takes 8-bit quantizers only)."""
    from ..errors import UnknownBackendError
    from ..exporting import UnsupportedExportError

    backend = quant_view(qmodel).backend
    try:
        exported = export(qmodel)
    except UnsupportedExportError as exc:  # the backend's own path refuses this model
        why = f"{backend}'s export does not take this model ({exc})"
    else:
        if not isinstance(exported, torch.nn.Module):
            why = f"{backend}'s export gives a {type(exported).__name__}, not a torch module"
        else:
            try:
                quant_view(exported)
            except UnknownBackendError:  # a deployable module no adapter can adapt
                why = f"no installed adapter recognises {backend}'s exported model"
            else:
                return exported, "the exported integer model"
    warnings.warn(
        f"the ZOA part adapts the fake-quantized model, not the deployed one: {why}. Its rows "
        "show what ZOA, FOA and BN-adapt do on the fake-quantized model, and its time per batch "
        "is that model's, not the deployed model's",
        stacklevel=3,
    )
    return qmodel, "the fake-quantized model"


# --- 3. RTF-Q -----------------------------------------------------------------------------------
def _rtfq_part(result, model, train, test, steps, seed, progress, say):
    from ..methods.rtfq import RTFQConfig, SubnetBank, train_bank

    corruption, severity = RTFQ_TARGET
    say(
        f"\n[RTF-Q] a bank of 8 subnets (width x resolution x bits), {steps} steps of "
        f"unsupervised adaptation to digits under {corruption} (severity {severity})"
    )
    target = corrupt_set(train, corruption, severity, seed=seed, progress=progress)
    target_test = corrupt_set(test, corruption, severity, seed=seed, progress=progress)
    config = RTFQConfig(train_steps=steps, seed=seed, progress=progress, **DEMO_BANK)
    bank = SubnetBank(model, target.x, config)
    source_only = accuracy(model, target_test.x, target_test.y)
    trained = train_bank(bank, (train.x, train.y), target.x)
    table = bank.evaluate(target_test.x, target_test.y)
    result.frontier = [{k: v for k, v in r.items() if k != "subnet"} for r in table]
    full = max(r["macs"] for r in table)
    result.rows.append(
        Row("RTF-Q", "float source model", None, 100 - source_only, None, "no adaptation")
    )
    for fraction in BUDGETS:
        qmodel = select_subnet(bank, macs=fraction * full, backend=result.backend)
        row = qmodel.qtta_subnet.row
        measured = accuracy(qmodel, target_test.x, target_test.y)
        result.selected.append(
            {
                "budget": fraction,
                "name": row["name"],
                "macs": row["macs"],
                "table": row["accuracy"],
                "materialized": measured,
            }
        )
        note = (
            f"{row['name']}, {row['macs'] / full:.0%} MACs; bank table {100 - row['accuracy']:.1f}"
        )
        result.rows.append(
            Row("RTF-Q", f"select_subnet(macs <= {fraction:.0%})", None, 100 - measured, None, note)
        )
        say(
            f"  budget {fraction:>4.0%}: {note}, materialized ({result.backend}) {100 - measured:.1f}"
        )
    say(f"  (bank trained in {trained['seconds']:.0f}s; error % on the held-out target split)")


# --- outputs ------------------------------------------------------------------------------------
def write_outputs(result: TourResult, stream: ContinualStream, out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = out_dir / "summary.md"
    summary.write_text(result.markdown() + "\n")
    figures = out_dir / "summary.json"
    figures.write_text(json.dumps(asdict(result), indent=1, default=str))
    return [summary, figures, *save_plots(result, stream, out_dir)]


def save_plots(result: TourResult, stream: ContinualStream, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .demo import _SHORT, mark_domains, plot_moving_mean

    stream_png = out_dir / "stream.png"
    fig, axes = plt.subplots(2, 1, figsize=(11, 7), sharex=True)
    n = len(next(iter(result.curves.values())))
    per_domain = n / len(stream.domains)
    window = max(1, round(per_domain / 2))
    for ax, part in zip(axes, ("TTAQ", "ZOA"), strict=True):
        means = {r.name: r.error for r in result.rows if r.part == part}
        for label, errs in result.curves.items():
            if label not in means:
                continue
            plot_moving_mean(ax, errs, window, f"{label} (mean {means[label]:.1f}%)")
        mark_domains(ax, len(stream.domains), per_domain)
        ax.set_ylabel(f"error % (moving mean, {window} batches)")
        on = f", {result.zoa_model}" if part == "ZOA" else ""
        ax.set_title(f"{part}: digits-C continual stream, {result.backend} {result.bits}{on}")
        ax.set_ylim(0, 100)
        ax.legend(loc="upper right", fontsize=8)
    axes[-1].set_xticks([(i + 0.5) * per_domain for i in range(len(stream.domains))])
    axes[-1].set_xticklabels([_SHORT.get(d, d) for d in stream.domains], rotation=45, ha="right")
    fig.tight_layout()
    fig.savefig(stream_png, dpi=110)
    plt.close(fig)

    frontier_png = out_dir / "rtfq_frontier.png"
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for bits, marker in zip(DEMO_BANK["bits"], ("o", "^"), strict=True):
        rows = [r for r in result.frontier if r["name"].endswith(f"W{bits}A{bits}")]
        ax.scatter(
            [r["macs"] / 1e6 for r in rows],
            [r["accuracy"] for r in rows],
            marker=marker,
            label=f"bank subnets, W{bits}A{bits}",
            alpha=0.7,
        )
    ax.scatter(
        [s["macs"] / 1e6 for s in result.selected],
        [s["materialized"] for s in result.selected],
        marker="*",
        s=160,
        color="black",
        label=f"select_subnet, materialized ({result.backend})",
    )
    ax.set_xlabel("MACs per image (millions)")
    ax.set_ylabel("accuracy % on the target test split")
    corruption, severity = RTFQ_TARGET
    ax.set_title(f"RTF-Q bank: digits -> digits-{corruption} (severity {severity})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(frontier_png, dpi=110)
    plt.close(fig)
    return [stream_png, frontier_png]
