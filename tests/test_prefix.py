"""ZOA's second pass from the first adapted layer on (qtta_plugins.prefix) computes exactly what a
full second pass computes, on every backend, for graph models (split) and module models (replay)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

import qtta_plugins
from qtta_plugins.models import build
from qtta_plugins.prefix import GraphPrefixCache, ModulePrefixCache

BACKENDS = [b for b in ("torchao", "brevitas", "nncf") if importlib.util.find_spec(b) is not None]


@pytest.mark.parametrize("backend", BACKENDS)
def test_zoa_reusing_the_prefix_changes_nothing_but_work(backend, digits, calib):
    _, test = digits
    torch.manual_seed(0)
    qmodel = qtta_plugins.quantize(build("bncnn").eval(), backend, "w8a8", calib)
    x = test.x[:128]
    outputs = {}
    for reuse in (False, True):
        run = qtta_plugins.adapt(qmodel, None, "zoa", reuse_prefix=reuse, progress=False)
        outputs[reuse] = [run.step(x[i : i + 32]) for i in range(0, 128, 32)]
        if reuse:
            cache = run.method.prefix
            expected = GraphPrefixCache if backend == "torchao" else ModulePrefixCache
            assert isinstance(cache, expected)
            assert cache.reusing and 0 < cache.reused_fraction < 1
        else:
            assert run.method.prefix is None
    for full, reused in zip(outputs[False], outputs[True], strict=True):
        assert torch.equal(full, reused)


def test_a_kept_value_changed_in_place_turns_reuse_off():
    class Model(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.first = torch.nn.Linear(4, 4)
            self.norm = torch.nn.LayerNorm(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.first(x)
            out = self.norm(h)
            h.mul_(2)  # after the adapted norm: the kept output of `first` changes
            return out + h

    model = Model()
    cache = ModulePrefixCache(model, [model.norm.weight])
    x = torch.randn(3, 4)
    with torch.no_grad():
        cache.run(x)  # the probe
        cache.rerun()
        cache.run(x)
        model.norm.weight.add_(1.0)
        assert torch.equal(cache.rerun(), model(x))
    assert not cache.reusing


class _Skip(torch.nn.Module):
    """A chain whose parent reads an early output again after the adapted norm (a skip)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(4, 4)
        self.b = torch.nn.Linear(4, 4)
        self.c = torch.nn.Linear(4, 4)
        self.norm = torch.nn.LayerNorm(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h1 = self.a(x)
        h2 = self.b(h1)
        h3 = self.c(h2)
        return self.norm(h3) + h1  # h1 is read outside every replayed module


def _kept_storage(cache: ModulePrefixCache, module: torch.nn.Module) -> bool:
    kept = cache._kept[id(module)]
    return all(s != 0 for s in kept.stride())  # a stand-in is a zero-stride expanded scalar


def test_replay_keeps_only_the_outputs_read_outside_replayed_modules():
    torch.manual_seed(0)
    model = _Skip()
    cache = ModulePrefixCache(model, [model.norm.weight])
    x = torch.randn(5, 4)
    with torch.no_grad():
        cache.run(x)  # the probe: the call order
        cache.rerun()  # a full second pass: what it reads
        cache.run(x)
        # a: read by the parent's skip; c: read by the adapted norm; b: only by c
        assert _kept_storage(cache, model.a) and _kept_storage(cache, model.c)
        assert not _kept_storage(cache, model.b)
        model.norm.weight.add_(1.0)
        assert torch.equal(cache.rerun(), model(x))
    assert cache.reusing


def test_an_output_a_hook_reads_is_kept():
    torch.manual_seed(0)
    model = _Skip()
    seen = []
    model.b.register_forward_hook(lambda m, a, out: seen.append(out.sum()))
    cache = ModulePrefixCache(model, [model.norm.weight])
    x = torch.randn(5, 4)
    with torch.no_grad():
        cache.run(x)
        cache.rerun()
        cache.run(x)
        assert _kept_storage(cache, model.b)
        cache.rerun()
    assert torch.equal(seen[-1], seen[-2])  # the hook saw pass 1's value again, not a stand-in


def test_a_hook_that_acts_in_the_first_pass_only_keeps_nothing_alive():
    """ZOA's detector reads the first norm's input in pass 1 only: pass 2 does not need it."""
    torch.manual_seed(0)
    model = _Skip()
    first_pass = [True]
    seen = []

    def record(module: torch.nn.Module, args: tuple, out: torch.Tensor) -> None:
        if first_pass[0]:
            seen.append(out.sum())

    model.b.register_forward_hook(record)
    cache = ModulePrefixCache(model, [model.norm.weight])
    x = torch.randn(5, 4)
    with torch.no_grad():
        cache.run(x)
        first_pass[0] = False
        cache.rerun()
        first_pass[0] = True
        cache.run(x)
        assert not _kept_storage(cache, model.b)
        first_pass[0] = False
        model.norm.weight.add_(1.0)
        assert torch.equal(cache.rerun(), model(x))


@pytest.mark.skipif("torchao" not in BACKENDS, reason="torchao not installed")
def test_the_graph_split_keeps_only_batch_values(calib):
    """Weights' fake-quantization does not depend on the batch: the suffix recomputes it rather
    than holding every later layer's quantized weight through the step."""
    torch.manual_seed(0)
    qmodel = qtta_plugins.quantize(build("bncnn").eval(), "torchao", "w8a8", calib)
    run = qtta_plugins.adapt(qmodel, None, "zoa", skip_converged=False, progress=False)
    x = calib[0][:24]
    run.step(x)
    cache = run.method.prefix
    frontier = tuple(cache._head(x))
    assert frontier and all(t.shape[0] == 24 for t in frontier)
    with torch.no_grad():
        cache.run(x)
        assert torch.equal(cache.rerun(), run.method.view.model(x))
