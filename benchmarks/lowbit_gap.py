"""Where W2A4 accuracy goes, per backend: the starting grids, the reconstruction, the write-back.

    python benchmarks/lowbit_gap.py                      # digits BN CNN, W2A4, qdrop, seed 0
    python benchmarks/lowbit_gap.py --seeds 0 1 2 --out benchmarks/results/lowbit_gap.json

``reconstruct`` learns in a simulation built from the float model and the grids each backend
applies, then writes the result back (docs/ttaq.md). So a backend that ends below another after
``qdrop`` got there at one of three points, and this script measures each, on clean test images:

1. **start**: the simulation before learning (hard rounding to nearest, the backend's grids): the
   backend's own accuracy, up to what the simulation leaves out;
2. **simulated**: the simulation after reconstruction: what the learning reached from those grids;
3. **backend**: the backend's model after the write-back.

(1) vs (2) across backends says whether the grids the backends start from differ in how far
learning takes them; (2) vs (3), whether the write-back loses what was learned. The activation
step sizes each backend starts from are printed per layer (mean over the layers at 4 bits, as
a ratio to torchao's), since the three calibrate activations differently.

``--act-steps-from BACKEND`` gives every backend that backend's activation step sizes (layer by
layer, each keeping its own zero point) before anything is measured: if the backends then end
alike, the activation ranges they calibrate are what separates them. ``--shared-inputs`` makes the
reconstruction's simulation quantize a residual block's identity path where the backend does (NNCF
quantizes an activation once, at its producer, so the identity path reads the quantized tensor
too); by default (``TTAQConfig.shared_inputs=False``) it learns with that path in float. The
"start" column always simulates the backend as it is.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import warnings
from pathlib import Path

os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")
os.environ.setdefault("QTTA_QUIET", "1")
os.environ.setdefault("NNCF_EXTENSION_LOAD_TIMEOUT", "0")
warnings.filterwarnings("ignore")

import torch  # noqa: E402

import qtta_plugins  # noqa: E402
from qtta_plugins.data import load_source, to_channels  # noqa: E402
from qtta_plugins.methods.ttaq import Simulation, TTAQConfig, reconstruct_view  # noqa: E402
from qtta_plugins.models import accuracy, input_channels, train_source_model  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _ptq import calibration  # noqa: E402
from lowbit_ptq import MODELS  # noqa: E402


@torch.no_grad()
def sim_accuracy(sim: Simulation, x: torch.Tensor, y: torch.Tensor) -> float:
    """Clean accuracy (%) of the simulation, its weights rounded as they are written back."""
    with sim.hard_rounding():
        return accuracy(sim.model, x, y)


def act_steps(view) -> dict[str, float]:
    """Mean activation step size of each quantized layer's input quantizer."""
    out = {}
    for layer in view.layers():
        q = layer.input_quantizer
        if q is not None and q.enabled:
            out[layer.name] = float(q.grid().scale.float().mean())
    return out


def set_act_steps(view, steps: dict[str, float]) -> None:
    """Each layer's input quantizer at the step size ``steps`` names for it (zero point kept)."""
    for layer in view.layers():
        q = layer.input_quantizer
        if q is not None and q.enabled and layer.name in steps:
            grid = q.grid()
            q.set_grid(torch.full_like(grid.scale, steps[layer.name]), grid.zero_point)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="bncnn", choices=sorted(MODELS))
    parser.add_argument("--source", default="digits")
    parser.add_argument("--backends", nargs="+", default=["torchao", "brevitas", "nncf"])
    parser.add_argument("--bits", default="w2a4")
    parser.add_argument("--method", default="qdrop")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--calib", type=int, default=1024)
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--act-steps-from", default=None, help="a backend whose steps all use")
    parser.add_argument("--shared-inputs", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    model = train_source_model(args.model, args.source, seed=0, **MODELS[args.model])
    n_test = None if args.source == "digits" else 2000
    train, test = load_source(args.source, n_test=n_test, seed=0)
    ch = input_channels(args.model)
    test_x, train_x = to_channels(test.x, ch), to_channels(train.x, ch)
    rows, steps = [], {}
    for seed in args.seeds:
        calib = calibration(train_x, args.calib, seed)  # the images lowbit_ptq.py draws
        reference = None
        if args.act_steps_from:
            ref_model = qtta_plugins.quantize(model, args.act_steps_from, args.bits, calib)
            reference = act_steps(qtta_plugins.quant_view(ref_model))
        for backend in args.backends:
            qm = qtta_plugins.quantize(model, backend, args.bits, calib)
            view = qtta_plugins.quant_view(qm)
            if reference is not None:
                set_act_steps(view, reference)
            steps[backend] = act_steps(view)
            x_cal = torch.cat(calib)
            start = Simulation(view, model, False, x_cal[:8])
            row = {
                "backend": backend,
                "seed": seed,
                "act_steps_from": args.act_steps_from or backend,
                "shared_inputs": args.shared_inputs,
                "quantized": accuracy(qm, test_x, test.y),
                "start": sim_accuracy(start, test_x, test.y),
                "unsimulated_quantizers": len(start.unsimulated),
            }
            config = TTAQConfig(
                method=args.method,
                iters=args.iters,
                seed=seed,
                shared_inputs=args.shared_inputs,
                progress=False,
            )
            sim = reconstruct_view(view, model, calib, config)
            row["simulated"] = sim_accuracy(sim, test_x, test.y)
            row["backend_after"] = accuracy(qm, test_x, test.y)
            rows.append(row)
            print(json.dumps(row), flush=True)
    names = list(next(iter(steps.values())))
    ref = steps.get("torchao")
    print("\nactivation step size per layer (ratio to torchao's):")
    print("layer | " + " | ".join(steps))
    for n in names:
        cells = [
            f"{steps[b][n]:.4f}" + (f" ({steps[b][n] / ref[n]:.2f}x)" if ref and n in ref else "")
            for b in steps
            if n in steps[b]
        ]
        print(f"{n} | " + " | ".join(cells))
    print("\nmean over seeds: quantized / start (sim) / simulated after / backend after")
    for b in args.backends:
        r = [x for x in rows if x["backend"] == b]
        print(
            b,
            *(
                f"{statistics.mean(x[k] for x in r):.1f}"
                for k in ("quantized", "start", "simulated", "backend_after")
            ),
        )
    if args.out:
        Path(args.out).write_text(json.dumps({"rows": rows, "act_steps": steps}, indent=1))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
