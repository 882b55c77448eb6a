"""Clean accuracy at low bits under each activation-range choice of ``quantize``
(``QuantConfig.act_ranges``): results files of one plan, one per choice, paired seed by seed.

    python benchmarks/compare_ranges.py \
        search=benchmarks/results/lowbit_ptq_bncnn_mnist.json \
        percentile=benchmarks/results/lowbit_ptq_bncnn_mnist_percentile.json \
        least-error=benchmarks/results/lowbit_ptq_bncnn_mnist_least_error.json \
        min-max=benchmarks/results/lowbit_ptq_bncnn_mnist_min_max.json

Prints a markdown table: per (model, bits, PTQ, backend), the accuracy (100 - the cell's error)
under each choice, mean ± sd over the seeds, then the first choice minus each other one, paired by
seed, mean ± sd. Where the first file also holds a model's W8A8 cells without reconstruction, a
second table gives what each low-bit row of each file loses against them, paired by seed (the room
a low-bit model has to recover). Not a config: it reads results files, it runs nothing.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path

Key = tuple[str, str, str, str]


def _accuracies(path: Path) -> dict[Key, dict[int, float]]:
    cells = json.loads(path.read_text())["cells"]
    out: dict[Key, dict[int, float]] = defaultdict(dict)
    for c in cells.values() if isinstance(cells, dict) else cells:
        out[c["model"], c["bits"], c["reconstruct"], c["backend"]][c["seed"]] = 100.0 - c["error"]
    return out


def _ms(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else float("nan")
    return f"{statistics.mean(values):.1f} ± {sd:.1f}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("files", nargs="+", metavar="CHOICE=RESULTS.json")
    args = parser.parse_args(argv)
    named = [f.split("=", 1) for f in args.files]
    if any(len(n) != 2 for n in named):
        parser.error("each argument is CHOICE=RESULTS.json")
    runs = {name: _accuracies(Path(path)) for name, path in named}
    first, *others = runs
    head = " | ".join(runs) + "".join(f" | {first} - {o}, paired" for o in others)
    print(f"| model | bits | PTQ | backend | {head} |")
    print("|---" * (4 + len(runs) + len(others)) + "|")
    for key in sorted(runs[first], key=lambda k: (k[0], k[1], k[2] != "min-max", k[2], k[3])):
        if not all(key in r for r in runs.values()):
            continue
        seeds = sorted(set.intersection(*(set(r[key]) for r in runs.values())))
        cols = [_ms([r[key][s] for s in seeds]) for r in runs.values()]
        diffs = [_ms([runs[first][key][s] - runs[o][key][s] for s in seeds]) for o in others]
        label = (*key[:2], "quantize only" if key[2] == "min-max" else key[2], key[3])
        print(f"| {' | '.join(label)} | {' | '.join(cols + diffs)} |")
    print(
        f"\n(seeds {', '.join(map(str, seeds))}; " + ", ".join(f"{n}: {p}" for n, p in named) + ")"
    )
    _print_losses(runs)


def _print_losses(runs: dict[str, dict[Key, dict[int, float]]]) -> None:
    """Each low-bit row's accuracy loss against the W8A8 model of the first file, paired."""
    reference = runs[next(iter(runs))]
    rows = []
    for key in sorted(reference):
        model, bits, ptq, backend = key
        high = reference.get((model, "w8a8", "none", backend))
        if bits == "w8a8" or high is None:
            continue
        cols = []
        for r in runs.values():
            seeds = sorted(set(r.get(key, {})) & set(high))
            cols.append(_ms([high[s] - r[key][s] for s in seeds]) if seeds else "")
        rows.append(
            f"| {model} | {bits} | {ptq} | {backend} | {_ms(list(high.values()))} | "
            + " | ".join(cols)
            + " |"
        )
    if rows:
        print("\nAccuracy lost against W8A8 (same model, backend and seed), points, paired:\n")
        print(f"| model | bits | PTQ | backend | W8A8 | {' | '.join(runs)} |")
        print("|---" * (5 + len(runs)) + "|")
        print("\n".join(rows))


if __name__ == "__main__":
    main()
