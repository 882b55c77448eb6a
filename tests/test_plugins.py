"""Hookspecs, plugin discovery (built-in and through a real entry point), and the core's imports."""

from __future__ import annotations

import inspect
import subprocess
import sys
import textwrap

import pytest
import torch

import qtta_plugins
from qtta_plugins import hookspecs
from qtta_plugins.app.cli import main
from qtta_plugins.plugins import available_backends, available_methods, list_plugins, reload_plugins

HOOKS = ("qtta_quantize", "qtta_reconstruct", "qtta_adapt", "qtta_select_subnet", "qtta_quant_view")


def test_every_hookspec_states_its_contract():
    for name in HOOKS:
        spec = getattr(hookspecs, name)
        doc = inspect.getdoc(spec) or ""
        assert len(doc.split()) >= 20, f"{name} needs a docstring that states the contract"
        assert name in qtta_plugins.plugins.plugin_manager().hook.__dict__


def test_the_public_face_is_verbs_configs_errors_and_user_types():
    import warnings

    face = set(qtta_plugins.__all__)
    assert set(dir(qtta_plugins)) == face
    # the names the docs use are there; the internals are not
    for name in ("TTAQConfig", "RTFQConfig", "SubnetBank", "train_bank", "make_stream"):
        assert name in face
    for name in ("QttaError", "UnsupportedExportError", "SmallBatchError"):
        assert name in face and issubclass(getattr(qtta_plugins, name), qtta_plugins.QttaError)
    internals = {"Grid", "QuantizerHandle", "fake_quantize", "copy_model", "plugin_manager"}
    assert not face & internals
    # an internal still resolves for old code, with a warning naming where it lives now
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        from qtta_plugins.view import copy_model

        assert qtta_plugins.copy_model is copy_model
    assert any("qtta_plugins.view" in str(w.message) for w in caught)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        qtta_plugins.nope  # noqa: B018


def test_each_baseline_config_lives_with_its_method_and_still_resolves_from_config():
    # issue 36: the seven baselines' configs moved from qtta_plugins.config into their method
    # modules; the old import path and pickles naming it keep working
    import importlib
    import pickle

    from qtta_plugins import config

    moved = {
        "SourceConfig": "source",
        "NormConfig": "norm",
        "TentConfig": "tent",
        "EATAConfig": "eata",
        "SARConfig": "sar",
        "CoTTAConfig": "cotta",
        "RoTTAConfig": "rotta",
    }
    for name, method in moved.items():
        module = f"qtta_plugins.methods.{method}"
        cls = getattr(importlib.import_module(module), name)
        assert cls.__module__ == module
        assert getattr(config, name) is cls is getattr(qtta_plugins, name)
        assert cls().method == method
    tent = qtta_plugins.TentConfig(lr=1e-3, abl=True)
    old = pickle.dumps(tent, protocol=0).replace(
        b"qtta_plugins.methods.tent\n", b"qtta_plugins.config\n"
    )
    assert b"qtta_plugins.config\n" in old and pickle.loads(old) == tent
    with pytest.raises(AttributeError, match="has no attribute 'ZOAConfig'"):
        config.ZOAConfig  # noqa: B018 (never lived there)


def test_builtin_methods_and_torchao_adapter_are_registered():
    methods = available_methods("adapt")
    assert {"source", "norm", "tent"} <= set(methods)
    assert methods["tent"].needs_backward and not methods["norm"].needs_backward
    assert "torchao" in available_backends()
    by_name = {p.name: p for p in list_plugins()}
    assert by_name["torchao"].distribution.startswith(
        "qtta-plugins "
    )  # came through an entry point
    assert by_name["qtta_plugins.methods.tent"].distribution == "qtta-plugins (built-in)"


def test_qtta_plugins_command_lists_adapter_and_baselines(capsys):
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    for expected in (
        "backend torchao",
        "method source",
        "method norm",
        "method tent",
        "qtta-plugins",
    ):
        assert expected in out


THIRD_PARTY_PLUGIN = '''
import torch
from qtta_plugins import hookimpl
from qtta_plugins.config import AdaptConfig
from qtta_plugins.methods.base import MethodInfo, TestTimeMethod


class Flip(TestTimeMethod):
    """Predicts the source model's output with the logits negated: easy to recognise."""

    @torch.no_grad()
    def forward_and_adapt(self, x):
        return -self.view.model(x)


@hookimpl
def qtta_methods():
    return [MethodInfo("flip", "adapt", "a throwaway third-party method")]


@hookimpl
def qtta_adapt(view, config):
    return Flip(view, config) if config.method == "flip" else None
'''


@pytest.fixture
def third_party_plugin(tmp_path, monkeypatch):
    """A distribution installed on sys.path the way pip would: a module plus a .dist-info with an
    entry point in the ``qtta_plugins`` group."""
    (tmp_path / "qtta_flip_plugin.py").write_text(THIRD_PARTY_PLUGIN)
    dist = tmp_path / "qtta_flip-1.2.3.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: qtta-flip\nVersion: 1.2.3\n")
    (dist / "entry_points.txt").write_text("[qtta_plugins]\nflip = qtta_flip_plugin\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib

    importlib.invalidate_caches()
    reload_plugins()
    yield
    monkeypatch.undo()
    sys.modules.pop("qtta_flip_plugin", None)
    importlib.invalidate_caches()
    reload_plugins()


def test_third_party_plugin_found_through_entry_point(third_party_plugin, qcnn, digits, capsys):
    assert "flip" in available_methods("adapt")
    by_name = {p.name: p for p in list_plugins()}
    assert by_name["flip"].distribution == "qtta-flip 1.2.3"
    assert main(["plugins"]) == 0
    assert "qtta-flip 1.2.3" in capsys.readouterr().out
    # ... and the core drives it like a built-in method.
    _, test = digits
    x = test.x[:32]
    run = qtta_plugins.adapt(qcnn["w8a8"], [x], "flip")
    source = qtta_plugins.adapt(qcnn["w8a8"], [x], "source")
    assert torch.equal(run.predictions, (-source.model(x)).argmax(1))


def test_entry_points_can_be_switched_off(monkeypatch):
    monkeypatch.setenv("QTTA_PLUGINS_NO_ENTRYPOINTS", "1")
    try:
        reload_plugins()
        assert available_backends() == []
        assert "tent" in available_methods()
    finally:
        monkeypatch.delenv("QTTA_PLUGINS_NO_ENTRYPOINTS")
        reload_plugins()


def test_importing_the_core_imports_no_backend():
    code = textwrap.dedent(
        """
        import sys, qtta_plugins
        qtta_plugins.plugins.plugin_manager()
        qtta_plugins.list_plugins()
        bad = [m for m in sys.modules if m.split('.')[0] in ('torchao', 'brevitas', 'nncf')]
        assert not bad, bad
        """
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_reconstruct_and_select_subnet_name_the_missing_plugin(float_cnn, calib):
    with pytest.raises(
        qtta_plugins.UnknownMethodError,
        match=r"no installed plugin provides reconstruction method 'adaround'; available: .*ttaq",
    ):
        qtta_plugins.reconstruct(float_cnn, float_cnn, calib, "adaround")
    with pytest.raises(qtta_plugins.UnknownBackendError, match="quantize it first"):
        qtta_plugins.reconstruct(float_cnn, float_cnn, calib, "ttaq")
    with pytest.raises(
        qtta_plugins.UnknownMethodError, match=r"no installed plugin provides subnet selection"
    ):
        qtta_plugins.select_subnet(object(), macs=1e6)
    with pytest.raises(ValueError, match=r"unknown budget keys"):
        qtta_plugins.select_subnet(object(), flops=1)
