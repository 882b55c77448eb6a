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
        cache.run(x)
        model.norm.weight.add_(1.0)
        assert torch.equal(cache.rerun(), model(x))
    assert not cache.reusing
