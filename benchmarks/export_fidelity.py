"""How closely each backend's own export computes what the quantized model computes (issue 13).

    python benchmarks/export_fidelity.py --archs resnet18        # trained models (cached)
    python benchmarks/export_fidelity.py --untrained --source digits --archs timm-vit

Per (architecture, backend), W8A8 by ``qtta_plugins.quantize`` (512 calibration images): the
relative logit difference between the export (torchao ``convert`` = ``convert_pt2e`` with our
corrections, NNCF ``strip``, Brevitas QCDQ ONNX run by onnxruntime) and the quantized model, their
top-1 agreement, what quantization itself changes (quantizers off), and the model's *rounding
sensitivity*: how far multiplying the input by ``1 + 1e-6 * noise`` moves the quantized model
(the float model moves by ~1e-6). An export's arithmetic flips rounding ties the way such noise
does, so it cannot be asked to agree more closely than that (docs/architectures.md).

Not a ``qtta bench`` config: a harness cell adapts a quantized model over a stream and measures
errors and cost, while this compares one model's logits with those of its exported deployment
form (an ONNX session, an integer graph), which no cell runs.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import tempfile
import warnings
from pathlib import Path

os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")
os.environ.setdefault("QTTA_QUIET", "1")
warnings.filterwarnings("ignore")

import torch  # noqa: E402

import qtta_plugins  # noqa: E402
from qtta_plugins.bench.cache import write_json_atomic  # noqa: E402
from qtta_plugins.data import load_source, to_channels  # noqa: E402
from qtta_plugins.models import build, train_source_model  # noqa: E402

RECIPES = {"timm-vit": {"lr": 1e-3}}  # as benchmarks/configs/architectures.yaml trains them


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def export_logits(backend: str, model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        if backend == "torchao":
            from qtta_torchao.export import convert

            return convert(model)(x)
        if backend == "nncf":
            from qtta_nncf.export import strip

            return strip(model, example_input=x)(x)
    import onnxruntime as ort
    from qtta_brevitas.export import export_onnx_qcdq

    with tempfile.TemporaryDirectory() as tmp:
        path = export_onnx_qcdq(model, x[:8], Path(tmp) / "model.onnx")
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])


def measure(qmodel: torch.nn.Module, backend: str, x: torch.Tensor) -> dict[str, float]:
    view = qtta_plugins.quant_view(qmodel)
    view.set_norm_mode("source")
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = qmodel(x)
        sensitivity = rel(qmodel(x * (1 + 1e-6 * noise)), ours)
        switched = [q for q in view.quantizers() if q.enabled]
        for q in switched:
            q.enabled = False
        unquantized = qmodel(x)
        for q in switched:
            q.enabled = True
    exported = export_logits(backend, qmodel, x)
    return {
        "export_vs_model": rel(exported, ours),
        "top1_agreement": float((exported.argmax(1) == ours.argmax(1)).float().mean()),
        "quantization_effect": rel(ours, unquantized),
        "rounding_sensitivity": sensitivity,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--archs", nargs="+", default=["resnet18", "mobilenet_v2", "timm-vit"])
    parser.add_argument("--backends", nargs="+", default=None)
    parser.add_argument("--source", default="fashion-mnist")
    parser.add_argument("--untrained", action="store_true", help="freshly initialised models")
    parser.add_argument("--max-train", type=int, default=20000)
    parser.add_argument("--n-test", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    backends = args.backends or [
        b for b in ("torchao", "brevitas", "nncf") if importlib.util.find_spec(b) is not None
    ]
    train, test = load_source(args.source, n_test=args.n_test, seed=0)
    x = to_channels(test.x, 3)
    calib_x = to_channels(train.x[:512], 3)
    calib = [calib_x[i : i + 64] for i in range(0, 512, 64)]
    results: dict[str, dict] = {}
    print(
        "| model | backend | export vs model | top-1 agreement | quantization effect | "
        "rounding sensitivity |\n|---|---|---|---|---|---|"
    )
    for arch in args.archs:
        if args.untrained:
            torch.manual_seed(0)
            model = build(arch).eval()
        else:
            model = train_source_model(
                arch, args.source, epochs=3, max_train=args.max_train, **RECIPES.get(arch, {})
            )
        for backend in backends:
            qmodel = qtta_plugins.quantize(model, backend, "w8a8", calib)
            row = measure(qmodel, backend, x)
            results.setdefault(arch, {})[backend] = row
            print(
                f"| {arch} | {backend} | {100 * row['export_vs_model']:.2f}% | "
                f"{100 * row['top1_agreement']:.1f}% | {100 * row['quantization_effect']:.2f}% | "
                f"{100 * row['rounding_sensitivity']:.2f}% |",
                flush=True,
            )
    if args.out:
        write_json_atomic(Path(args.out), {"setup": vars(args), "results": results})


if __name__ == "__main__":
    main()
