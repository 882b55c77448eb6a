"""Why NNCF fell behind torchao and Brevitas on a weakly trained MobileNetV2, and the fix (issue 13).

    python benchmarks/nncf_batch_ranges.py

A torchvision MobileNetV2 trained for 3 epochs on the digits (32 px, gray replicated to RGB): its
running statistics lag far behind its weights, so clean accuracy on them is ~10%, as under a strong
shift. W8A8 on each backend; norm (BN-adapt) and tent on digits-C (gaussian noise, fog, contrast,
pixelate; severity 5; continual; batch 50). NNCF's rows: with the adapter's correction switched
off (its ranges as calibrated under running statistics), and as ``adapt`` runs now (activation
ranges recalibrated on the source sample in batch-statistics mode, see
``qtta_nncf.view.recalibrate_activations``). Also: how far the batch-mode tensors exceed NNCF's
calibrated ranges. Accuracy in %, one seed (the point is the gap between backends on one model).
"""

from __future__ import annotations

import os
import warnings

os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")
os.environ.setdefault("QTTA_QUIET", "1")
warnings.filterwarnings("ignore")

import torch  # noqa: E402

import qtta_plugins  # noqa: E402
from qtta_plugins.data import continual_stream, load_source, to_channels  # noqa: E402
from qtta_plugins.models import accuracy, train_source_model  # noqa: E402

CORRUPTIONS = ["gaussian_noise", "fog", "contrast", "pixelate"]


def main() -> None:
    torch.set_num_threads(2)
    from qtta_nncf.view import NNCFView, batch_mode_overflow

    model = train_source_model("mobilenet_v2", "digits", epochs=3)
    train, test = load_source("digits")
    calib = [to_channels(train.x[i : i + 64], 3) for i in range(0, 512, 64)]
    stream = continual_stream(
        "digits", severity=5, batch_size=50, corruptions=CORRUPTIONS, channels=3
    )
    print(
        f"float, clean, running statistics: {accuracy(model, to_channels(test.x, 3), test.y):.1f}"
    )
    rows = {}
    for backend in ("torchao", "brevitas", "nncf"):
        qmodel = qtta_plugins.quantize(model, backend, "w8a8", calib)
        variants = [("", None)]
        if backend == "nncf":
            print(
                f"NNCF ranges batch statistics overflow: {len(batch_mode_overflow(qmodel, calib[:4]))}"
            )
            variants = [(" (ranges as calibrated)", "off"), (" (as adapt runs now)", None)]
        for label, switch in variants:
            original = NNCFView.prepare_adaptation
            if switch == "off":
                NNCFView.prepare_adaptation = lambda self: []  # the correction switched off
            try:
                row = {}
                for method in ("norm", "tent"):
                    run = qtta_plugins.adapt(qmodel, stream, method)
                    row[method] = 100 - run.errors()["mean"]
            finally:
                NNCFView.prepare_adaptation = original
            rows[backend + label] = row
            print(f"{backend + label}: norm {row['norm']:.1f}  tent {row['tent']:.1f}", flush=True)
    print("\n| backend | norm | tent |\n|---|---|---|")
    for name, row in rows.items():
        print(f"| {name} | {row['norm']:.1f} | {row['tent']:.1f} |")


if __name__ == "__main__":
    main()
