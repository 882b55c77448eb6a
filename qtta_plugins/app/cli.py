"""The ``qtta`` command: ``qtta demo``, ``qtta plugins`` and ``qtta bench``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from types import ModuleType
from typing import Any

from ..data import SETTINGS


def _cmd_plugins(args: argparse.Namespace) -> int:
    from ..plugins import list_plugins

    rows = list_plugins()
    width = max(len(p.name) for p in rows)
    dist_w = max(len(p.distribution) for p in rows)
    for p in rows:
        provides = ", ".join(
            [f"method {m}" for m in p.methods] + [f"backend {b}" for b in p.backends]
        ) or ", ".join(p.hooks)
        print(f"{p.name:<{width}}  {p.distribution:<{dist_w}}  {provides}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    import os

    if args.cache_dir:
        os.environ["QTTA_CACHE_DIR"] = args.cache_dir
    from ..progress import quiet_env
    from .demo import run_demo

    progress = False if args.quiet else None
    stream_flags = [
        flag
        for flag, value in (
            ("--setting", args.setting),
            ("--reset-every", args.reset_every),
            ("--rounds", args.rounds),
        )
        if value is not None
    ]
    if args.methods is None and stream_flags:
        raise ValueError(
            f"{' and '.join(stream_flags)} choose the stream of the continual table: pass "
            "--methods too (e.g. --methods source norm tent); the tour has its own streams"
        )
    with quiet_env(args.quiet):  # -q silences the backends' own progress and INFO lines too
        if args.methods is None:
            from .tour import run_tour

            run_tour(
                args.backend,
                bits=args.bits,
                seed=args.seed,
                iters=args.iters,
                bank_steps=args.bank_steps,
                batch_size=args.batch_size,
                out_dir=None if args.no_plot else (args.out_dir or f"qtta_demo_{args.backend}"),
                progress=progress,
                threads=args.threads,
            )
            return 0
        run_demo(
            backend=args.backend,
            bits=args.bits,
            methods=args.methods,
            source=args.source,
            severity=args.severity,
            batch_size=args.batch_size,
            seed=args.seed,
            plot=None
            if args.no_plot
            else (args.plot or f"qtta_demo_{args.backend}_{args.bits}.png"),
            progress=progress,
            threads=args.threads,
            setting=args.setting or "continual",
            reset_every=args.reset_every,
            rounds=args.rounds,
        )
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    """``qtta bench CONFIG [KEY=VALUE ...]``: run a config's grid (cached cells are not run
    again), write its results, print its tables / draw its plot; CONFIG may also be a results
    file, whose tables and plot are then rendered."""
    from pathlib import Path

    from ..progress import quiet_env

    if args.cache_dir:
        import os

        os.environ["QTTA_CACHE_DIR"] = args.cache_dir
    from .. import bench

    if args.config.endswith(".json"):
        if args.overrides or args.dry_run or args.ray:
            raise ValueError(
                f"{args.config} is a results file: it is rendered (--render, --plot), not run; "
                "overrides, --dry-run and --ray apply to a config"
            )
        results = bench.merge([bench.Results.load(args.config)])
        _bench_output(results, args, bench, render=args.render or not args.plot)
        return 0
    config = bench.load_config(args.config, args.overrides)
    if args.dry_run:
        planned = bench.plan(config)
        _print_plan(planned, bench.missing_files(config))
        return 0
    with quiet_env(args.quiet):
        echo = None if args.quiet else print
        results = bench.run(
            config,
            out=args.out,
            progress=False if args.quiet else None,
            ray=args.ray,
            echo=echo,
        )
    out = Path(args.out) if args.out else bench.default_out(config)
    print(f"{len(results.cells)} cells" + (f" in {out}" if out else ""), file=sys.stderr)
    _bench_output(results, args, bench, render=args.render)
    return 0


def _bench_output(
    results: Any, args: argparse.Namespace, bench: ModuleType, *, render: bool
) -> None:
    if render:
        print(bench.markdown(results), end="")
    if args.plot:
        path = bench.plot(results, args.plot)
        print(f"wrote {path}", file=sys.stderr)


def _print_plan(planned: list[Any], missing: list[str]) -> None:
    from tabulate import tabulate

    rows = [
        [i, "cached" if p.cached else "to run", *p.cell.labels().values(), p.key]
        for i, p in enumerate(planned)
    ]
    # the labels' names: the grid's axes, and batch where the batch size is one
    labels = list(planned[0].cell.labels()) if planned else []
    headers = ["#", "status", *labels, "key"]
    print(tabulate(rows, headers, tablefmt="github", disable_numparse=True))
    cached = sum(p.cached for p in planned)
    print(f"\n{len(planned)} cells: {cached} cached, {len(planned) - cached} to run")
    for line in missing:
        print(f"missing: {line}")


class _BenchParser(argparse.ArgumentParser):
    """``qtta bench``'s parser: ``KEY=VALUE`` overrides may also follow the flags
    (``qtta bench cfg.yaml --dry-run seeds=[0,1]``), where argparse alone would take the
    positional list only in one run and refuse the rest."""

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        namespace, extra = super().parse_known_args(args, namespace)
        later = [a for a in extra if "=" in a and not a.startswith("-")]
        namespace.overrides = [*(getattr(namespace, "overrides", None) or []), *later]
        return namespace, [a for a in extra if not ("=" in a and not a.startswith("-"))]


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qtta", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "plugins", help="list installed plugins and the distributions they come from"
    )
    p.set_defaults(func=_cmd_plugins)

    d = sub.add_parser(
        "demo",
        help="the tour of TTAQ, ZOA and RTF-Q on a quantized CNN (with --methods: the continual "
        "corruption stream, method by method)",
        description="Without --methods: TTAQ (reconstruction + Tent + ABL), ZOA (forward-only, "
        "against FOA and BN-adapt) and RTF-Q (a subnet bank, select_subnet under three budgets) on "
        "scikit-learn's digits, one summary table, plots in --out-dir. With --methods: each "
        "method along the 15-corruption continual stream, error per domain (--setting: another "
        "stream setting; --reset-every N: the periodic-reset baseline).",
    )
    d.add_argument("--backend", default="torchao")
    d.add_argument("--bits", default="w4a4", help="w8a8, w4a4, w2a4, ...")
    d.add_argument(
        "--methods",
        nargs="+",
        default=None,
        help="run the continual-stream table for these adapt methods instead of the tour "
        "(e.g. source norm tent)",
    )
    d.add_argument(
        "--iters", type=int, default=40, help="tour: reconstruction iterations per block"
    )
    d.add_argument("--bank-steps", type=int, default=40, help="tour: RTF-Q bank training steps")
    d.add_argument(
        "--out-dir", default=None, help="tour: summary and plots (default qtta_demo_<backend>)"
    )
    d.add_argument("--source", default="digits", choices=["digits", "fashion-mnist"])
    d.add_argument(
        "--setting",
        default=None,
        choices=SETTINGS,
        help="--methods: the stream setting (default continual): continual, reset (reset at each "
        "domain), gradual (severity 1..5..1 per corruption), mixed (batches mix all "
        "corruptions), dirichlet (class-imbalanced labels), long (several rounds)",
    )
    d.add_argument(
        "--reset-every",
        type=_positive_int,
        default=None,
        metavar="N",
        help="--methods: every method restarts from the source model every N batches (RDumb)",
    )
    d.add_argument(
        "--rounds",
        type=_positive_int,
        default=None,
        help="--methods: rounds of the stream (default 1; 10 for --setting long)",
    )
    d.add_argument(
        "--severity",
        type=int,
        default=None,
        choices=range(1, 6),
        help="--methods: corruption severity (default 5; not with --setting gradual)",
    )
    d.add_argument("--batch-size", type=int, default=50)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    d.add_argument(
        "--plot",
        default=None,
        help="--methods: PNG path (default qtta_demo_<backend>_<bits>.png)",
    )
    d.add_argument("--no-plot", action="store_true", help="write no plot (nor the tour's summary)")
    d.add_argument(
        "--cache-dir", default=None, help="cache directory (default $QTTA_CACHE_DIR or ~/.cache)"
    )
    d.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        help="no progress bars (ours or the backend's) and no backend INFO lines",
    )
    d.set_defaults(func=_cmd_demo)

    b = sub.add_parser(
        "bench",
        help="run a benchmark grid from a config file (cached cell by cell), write its results "
        "and render its tables",
        description="Run the grid of a YAML config (data x model x backend x bits x "
        "reconstruction x method x setting x seed): each cell cached under a key of everything "
        "that determines it, so a stopped run resumes and a rerun computes nothing. KEY=VALUE "
        "overrides the config (OmegaConf dotted keys: seeds=[0,1] methods.tent.lr=1e-3 "
        "data.root=/data). CONFIG may also be a results JSON file: its tables / plot are "
        "rendered. Needs the bench extra (pip install 'qtta-plugins[bench]'). See "
        "docs/benchmarks.md.",
    )
    b.__class__ = _BenchParser  # add_parser builds every subcommand's parser with one class
    b.add_argument("config", help="a YAML config (benchmarks/configs/) or a results JSON file")
    b.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    b.add_argument(
        "--out",
        default=None,
        help="results JSON (default: the config's out, else <name>.results.json)",
    )
    b.add_argument("--render", action="store_true", help="print the Markdown tables")
    b.add_argument("--plot", default=None, metavar="PATH", help="draw the error along the stream")
    b.add_argument(
        "--ray",
        default=None,
        metavar="ADDRESS",
        help="run the cells on Ray, one task each: 'local' (start Ray here), 'auto' (this "
        "machine's cluster) or ray://host:port (needs the ray extra)",
    )
    b.add_argument(
        "--dry-run", action="store_true", help="list the cells and which are cached; run nothing"
    )
    b.add_argument(
        "--cache-dir", default=None, help="cache directory (default $QTTA_CACHE_DIR or ~/.cache)"
    )
    b.add_argument("-q", "--quiet", action="store_true", help="no progress bar, no line per cell")
    b.set_defaults(func=_cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, ImportError, FileNotFoundError) as exc:
        print(f"qtta: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
