"""The conformance kit as a pytest plugin (``pytest11`` entry point ``qtta``).

A throwaway distribution (modules plus a ``.dist-info`` with ``qtta_plugins`` entry points, on
``PYTHONPATH``, as pip would install it) brings two fake backend adapters: ``fakeq`` conforms (it
has no export path, and declares so), ``brokenq`` is the same adapter whose quantizers ignore being
switched off and which leaves the export hook out without a word. ``pytest --qtta-backend=...`` in a
subprocess must run the kit's checks on both and report exactly that.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from qtta_plugins import conformance

FAKE_ADAPTER = '''
"""A throwaway backend adapter: per-channel symmetric weight and per-tensor symmetric input
fake-quantizers with learnable (LSQ-style) scales, swapped into conv / linear layers."""
import copy

import torch
import torch.nn.functional as F
from torch import nn

from qtta_plugins import hookimpl
from qtta_plugins.exporting import UnsupportedExportError
from qtta_plugins.view import (
    Grid, QuantizerHandle, QuantLayer, QuantView, module_norms, round_ste, set_module_norm_mode,
)


class FakeQuant(nn.Module):
    def __init__(self, bits, amax, broken):
        super().__init__()
        self.bits, self.enabled, self.broken = bits, True, broken
        self.register_buffer("amax", amax.detach().clone())
        self.scale = nn.Parameter(self.amax / self.qmax, requires_grad=False)

    @property
    def qmax(self):
        return 2 ** (self.bits - 1) - 1

    def forward(self, x):
        if not self.enabled:
            return x
        s = self.scale.reshape(-1, *[1] * (x.ndim - 1)) if self.scale.ndim else self.scale
        return torch.clamp(round_ste(x / s), -self.qmax, self.qmax) * s


class QConv2d(nn.Conv2d):
    def forward(self, x):
        return self._conv_forward(self.xq(x), self.wq(self.weight), self.bias)


class QLinear(nn.Linear):
    def forward(self, x):
        return F.linear(self.xq(x), self.wq(self.weight), self.bias)


class Handle(QuantizerHandle):
    def __init__(self, name, module, role):
        self.name, self.module, self.role = name, module, role

    @property
    def bits(self):
        return self.module.bits

    @bits.setter
    def bits(self, value):
        self.module.bits = int(value)
        with torch.no_grad():
            self.module.scale.copy_(self.module.amax / self.module.qmax)

    @property
    def enabled(self):
        return self.module.enabled

    @enabled.setter
    def enabled(self, value):
        if not self.module.broken:  # the defect: switching a quantizer off does nothing
            self.module.enabled = bool(value)

    @property
    def qrange(self):
        return -self.module.qmax, self.module.qmax

    @property
    def ch_axis(self):
        return 0 if self.role == "weight" else None

    def params(self):
        return {"scale": self.module.scale}

    def grid(self):
        scale = self.module.scale.detach().clone()
        return Grid(scale, torch.zeros_like(scale), -self.module.qmax, self.module.qmax, self.ch_axis)

    def set_trainable(self, flag=True):
        self.module.scale.requires_grad_(flag)
        return [self.module.scale]


def make_plugin(backend, broken):
    class FakeView(QuantView):
        def layers(self):
            layers = []
            for name in self.model.__dict__["_fake_order"]:
                m = self.model.get_submodule(name)
                kind = "conv" if isinstance(m, nn.Conv2d) else "linear"
                wq = Handle(f"{name}.weight_quantizer", m.wq, "weight")
                layers.append(QuantLayer(name, kind, m.weight, wq, Handle(f"{name}.input_quantizer", m.xq, "act")))
            return layers

        def norms(self):
            return module_norms(self.model.named_modules())

        @property
        def can_backprop(self):
            return True

        def _apply_norm_mode(self, mode):
            set_module_norm_mode(self.model, mode)

    FakeView.backend = backend

    @hookimpl
    def qtta_backends():
        return [backend]

    @hookimpl
    def qtta_quant_view(model):
        return FakeView(model) if model.__dict__.get("_fake_backend") == backend else None

    @hookimpl
    def qtta_quantize(model, config, calib):
        if config.backend != backend:
            return None
        model = copy.deepcopy(model).eval()
        amax, order = {}, []

        def record(name):
            def hook(module, args):
                order.append(name)
                value = args[0].detach().abs().max()
                amax[name] = torch.maximum(amax.get(name, value), value)
            return hook

        layers = {n: m for n, m in model.named_modules() if type(m) in (nn.Conv2d, nn.Linear)}
        hooks = [m.register_forward_pre_hook(record(n)) for n, m in layers.items()]
        with torch.no_grad():
            for x in calib:
                model(x)
        for h in hooks:
            h.remove()
        order = list(dict.fromkeys(order))
        for i, name in enumerate(order):
            edge = i in (0, len(order) - 1) and config.first_last_bits is not None
            w, a = (config.first_last_bits,) * 2 if edge else (config.weight_bits, config.act_bits)
            m = layers[name]
            m.__class__ = QConv2d if isinstance(m, nn.Conv2d) else QLinear
            w_amax = m.weight.detach().abs().flatten(1).amax(1)
            m.wq, m.xq = FakeQuant(w, w_amax, broken), FakeQuant(a, amax[name], broken)
        model.__dict__["_fake_order"], model.__dict__["_fake_backend"] = order, backend
        return model

    @hookimpl
    def qtta_export(model, backend, path, options):
        if backend != FakeView.backend:
            return None
        # the declaration: this backend has no export path
        raise UnsupportedExportError(f"{backend} has no export path: its models deploy as they are")

    return qtta_backends, qtta_quant_view, qtta_quantize, qtta_export


qtta_backends, qtta_quant_view, qtta_quantize, qtta_export = make_plugin("fakeq", broken=False)
'''

BROKEN_ADAPTER = """
from qtta_fakeq_plugin import make_plugin

# no qtta_export here: the export is left out, not declared impossible
qtta_backends, qtta_quant_view, qtta_quantize, _ = make_plugin("brokenq", broken=True)
"""


def _env(path: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(path), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.pop("PYTEST_ADDOPTS", None)
    return env


@pytest.fixture
def fake_distribution(tmp_path: Path) -> Path:
    """A directory holding the two adapters and the dist-info that declares them."""
    (tmp_path / "qtta_fakeq_plugin.py").write_text(FAKE_ADAPTER)
    (tmp_path / "qtta_brokenq_plugin.py").write_text(BROKEN_ADAPTER)
    dist = tmp_path / "qtta_fakeq-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: qtta-fakeq\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(
        "[qtta_plugins]\nfakeq = qtta_fakeq_plugin\nbrokenq = qtta_brokenq_plugin\n"
    )
    return tmp_path


def run_pytest(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args],
        cwd=cwd,
        env=_env(cwd),
        capture_output=True,
        text=True,
        timeout=600,
    )


def outcomes(report: Path) -> dict[str, str]:
    """Test name -> "passed" / "failed" / "skipped" / "error", from a JUnit XML report."""
    found = {}
    for case in ET.parse(report).getroot().iter("testcase"):
        kinds = [child.tag for child in case if child.tag in ("failure", "error", "skipped")]
        found[case.get("name")] = (
            {"failure": "failed"}.get(kinds[0], kinds[0]) if kinds else "passed"
        )
    return found


def test_the_kit_passes_a_conforming_adapter_and_fails_a_broken_one(fake_distribution):
    report = fake_distribution / "report.xml"
    proc = run_pytest(
        fake_distribution,
        "--qtta-backend=fakeq",
        "--qtta-backend=brokenq",
        "--qtta-family=bncnn",
        # every check on the conforming adapter; on the broken one, the checks its defects break
        # and one they do not (the rest would only repeat the conforming adapter's run)
        "-k",
        "fakeq or quantization_off or snapshot or export",
        f"--junitxml={report}",
    )
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]  # some test failed
    checks = [c.__name__.removeprefix("check_") for c in conformance.CHECKS]
    found: dict[str, dict[str, str]] = {"fakeq": {}, "brokenq": {}}
    for name, outcome in outcomes(report).items():
        backend = next(b for b in found if f"{b}-" in name)
        check = next(c for c in checks if name.endswith(f"-{c}]"))
        found[backend][check] = outcome
    expected = dict.fromkeys(checks, "passed")
    expected["export_keeps_predictions"] = "skipped"  # fakeq declares it has no export
    assert found["fakeq"] == expected, proc.stdout[-3000:]
    assert found["brokenq"] == {
        "quantization_off_reproduces_the_float_model": "failed",
        "snapshot_and_restore_are_exact": "passed",
        "export_keeps_predictions": "failed",  # no export, and no word that there is none
    }, proc.stdout[-3000:]
    assert "every quantizer off, the output differs from float" in proc.stdout
    assert "the 'brokenq' adapter implements no qtta_export hook" in proc.stdout
    skips = [c for c in ET.parse(report).getroot().iter("testcase") if "fakeq" in c.get("name")]
    reasons = [s.get("message", "") for c in skips for s in c.iter("skipped")]
    assert any("fakeq has no export path" in r for r in reasons), reasons


def test_an_unknown_backend_fails_with_the_installed_ones_named(fake_distribution):
    proc = run_pytest(fake_distribution, "-q", "--qtta-backend=nosuch", "--qtta-family=bncnn", "-x")
    assert proc.returncode == 1
    assert "no installed qtta_plugins adapter provides backend 'nosuch'" in proc.stdout
    assert "fakeq" in proc.stdout and "brokenq" in proc.stdout


PROBE = """
import sys


def test_probe(request):
    assert request.config.pluginmanager.get_plugin("qtta") is not None  # loaded, by entry point
    assert not [f for f in request.fixturenames if f.startswith("qtta")]  # none autouse
    loaded = [m for m in sys.modules if m.split(".")[0] in ("torchao", "brevitas", "nncf")]
    assert not loaded, loaded
    assert "qtta_plugins.conformance" not in sys.modules
"""


def test_a_session_that_does_not_ask_is_left_alone(tmp_path):
    (tmp_path / "test_probe.py").write_text(PROBE)
    proc = run_pytest(tmp_path, "-q")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "1 passed" in proc.stdout
    assert "qtta" not in proc.stdout.lower() + proc.stderr.lower()  # no header, no output
    # the plugin module itself imports nothing beyond qtta_plugins and pytest
    code = textwrap.dedent(
        """
        import sys
        import pytest, qtta_plugins
        before = set(sys.modules)
        import qtta_plugins.pytest_plugin
        print(sorted(set(sys.modules) - before))
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "['qtta_plugins.pytest_plugin']"
