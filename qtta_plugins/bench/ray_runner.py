"""A grid's cells on Ray: one task per cell, results written into the same cache by the driver.

``qtta bench CONFIG --ray ADDRESS`` (or ``ray: {address: ...}`` in the config) runs each missing
cell as a ``ray.remote`` task (``num_cpus`` from ``ray.num_cpus``; ``num_gpus`` from
``ray.num_gpus``, default 1 when ``device: cuda``), so a grid spreads over a cluster with the
command that runs it locally plus an address. ``ADDRESS``: ``local`` starts a Ray instance on this
machine; ``auto`` joins the cluster this machine belongs to (``ray start --head`` / ``--address``);
``ray://host:10001`` goes through Ray Client. When the calling process has already called
``ray.init`` (a notebook, a test), that session is used as it is.

Each task returns its cell's record to the driver, which writes it to the cache as it arrives:
the cache need not be on a shared file system, a stopped run keeps every cell that finished, and
the next run (on Ray or not) computes only the rest. What a task needs on its node: this package
and the backends installed, and the data, checkpoints and calibration images at the paths the
config names (a cluster's shared storage, or the same paths on every node).

A task that fails does not stop the others: every task runs to its end, the finished ones are
cached, then the first failure is raised.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from tqdm.auto import tqdm

from ..progress import show_progress
from .cache import CellCache
from .config import Bench
from .grid import Cell

#: environment variables the tasks get from the driver (when set there): quiet backends, the
#: same cache of source models and corrupted sets, torchao's CPU-only build
_FORWARDED_ENV = (
    "QTTA_QUIET",
    "QTTA_CACHE_DIR",
    "TORCHAO_FORCE_SKIP_LOADING_SO_FILES",
    "NNCF_EXTENSION_LOAD_TIMEOUT",
    "QTTA_PLUGINS_NO_ENTRYPOINTS",
)


def import_ray() -> Any:
    """``ray``, or an ImportError that names the extra to install."""
    try:
        import ray
    except ImportError as err:
        raise ImportError(
            "running a grid on Ray needs ray, which is not installed: pip install "
            "'qtta-plugins[ray]' (or pip install ray), or leave out --ray / ray.address to run "
            "the cells here in sequence"
        ) from err
    return ray


def _task(bench: Bench, cell: Cell, spec: dict[str, Any], threads: int) -> dict[str, Any]:
    """One cell, in a Ray worker (which may keep its models for its next cells)."""
    import warnings

    import torch

    from . import runner

    warnings.filterwarnings("ignore", category=FutureWarning)
    torch.set_num_threads(threads)
    return runner.run_cell(bench, cell, spec)


def run_cells(
    bench: Bench,
    todo: list[Any],
    cache: CellCache,
    address: str,
    *,
    progress: bool | None = None,
    echo: Callable[[str], None] | None = None,
) -> None:
    """Run the :class:`~qtta_plugins.bench.harness.Planned` cells ``todo`` on Ray at ``address``
    and put each record in ``cache`` as it arrives (see the module doc)."""
    ray = import_ray()
    config = bench.config
    started = False
    if not ray.is_initialized():
        ray.init(
            address=None if address == "local" else address,
            include_dashboard=False,
            log_to_driver=False,
        )
        started = True
    num_gpus = config.ray.num_gpus
    if num_gpus is None:
        num_gpus = 1 if config.device.startswith("cuda") else 0
    threads = config.threads or max(1, int(config.ray.num_cpus))
    env = {k: os.environ[k] for k in _FORWARDED_ENV if os.environ.get(k)}
    task = ray.remote(_task).options(
        num_cpus=config.ray.num_cpus,
        num_gpus=num_gpus,
        runtime_env={"env_vars": env} if env else None,
        max_retries=0,  # a cell that failed once fails again: report it instead
    )
    from .harness import describe

    bench_ref = ray.put(bench)
    pending = {task.remote(bench_ref, p.cell, p.spec, threads): p for p in todo}
    bar = tqdm(
        total=len(todo),
        desc=f"qtta bench {config.name} (ray)",
        unit="cell",
        disable=not show_progress(progress),
    )
    failures: list[tuple[Any, BaseException]] = []
    try:
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                p = pending.pop(ref)
                try:
                    record = ray.get(ref)
                except Exception as err:  # collected: the other cells still finish
                    failures.append((p, err))
                    continue
                cache.put(p.key, record)
                bar.update()
                if echo is not None:
                    echo(describe(p.cell, record))
    except BaseException:
        for ref in pending:  # interrupted: stop what is still queued or running
            ray.cancel(ref, force=True)
        raise
    finally:
        bar.close()
        if started:
            ray.shutdown()
    if failures:
        p, err = failures[0]
        raise RuntimeError(
            f"{len(failures)} of {len(todo)} cells failed on Ray (the others are cached); the "
            f"first, {p.cell}: {err}"
        ) from err


__all__ = ["import_ray", "run_cells"]
