"""Issue 36's renames: one name per idea across the configs, the old names still accepted.

Each old option name must (1) still build the config, with a DeprecationWarning that names the new
option, (2) give the config the new name gives (value converted where the old one was the fraction
an EMA updates), so the run is the same; the new names build without a warning; an adaptation
state saved before the rename (its config record in the old names) loads and continues exactly;
and the harness accepts the old names in a method row and keys an embedded ABL config by its
fields.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict
from typing import Any

import pytest
import torch

import qtta_plugins
from qtta_plugins import (
    ABLConfig,
    CoTTAConfig,
    EATAConfig,
    FOAConfig,
    RoTTAConfig,
    RTFQConfig,
    SARConfig,
    TentConfig,
    ZOAConfig,
)
from qtta_plugins.config import upgrade_options

# config class, old option, old value, new option, new value
RENAMES = [
    (CoTTAConfig, "ema_alpha", 0.99, "teacher_decay", 0.99),
    (RoTTAConfig, "ema_nu", 0.001, "teacher_decay", 0.999),  # the fraction updated -> kept
    (RoTTAConfig, "ema_nu", 0.25, "teacher_decay", 0.75),
    (RoTTAConfig, "rbn_momentum", 0.05, "rbn_decay", 0.95),  # the fraction updated -> kept
    (RoTTAConfig, "rbn_momentum", 0.5, "rbn_decay", 0.5),
    (SARConfig, "ema_momentum", 0.8, "loss_decay", 0.8),
    (EATAConfig, "probs_momentum", 0.8, "probs_decay", 0.8),
    (ZOAConfig, "shift_momentum", 0.7, "shift_decay", 0.7),
    (ZOAConfig, "detector_momentum", 0.6, "detector_decay", 0.6),
    (ZOAConfig, "bank", False, "memory", False),
    (ZOAConfig, "bank_size", 5, "memory_size", 5),
    (FOAConfig, "shift_momentum", 0.7, "shift_decay", 0.7),
    (RTFQConfig, "steps", 7, "train_steps", 7),
]


def _ids(row: tuple) -> str:
    return f"{row[0].__name__}.{row[1]}={row[2]}"


@pytest.mark.parametrize("row", RENAMES, ids=_ids)
def test_an_old_option_name_warns_naming_the_new_one_and_builds_the_same_config(row):
    cls, old, old_value, new, new_value = row
    with pytest.warns(DeprecationWarning, match=rf"'{old}' was renamed '{new}'.*{new}="):
        built = cls(**{old: old_value})
    assert getattr(built, new) == new_value
    assert built == cls(**{new: new_value})
    assert not hasattr(built, old)


@pytest.mark.parametrize("row", RENAMES, ids=_ids)
def test_the_new_option_name_builds_without_a_warning(row):
    cls, _, _, new, new_value = row
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert getattr(cls(**{new: new_value}), new) == new_value


@pytest.mark.parametrize("row", RENAMES, ids=_ids)
def test_old_and_new_name_together_are_refused(row):
    cls, old, old_value, new, new_value = row
    with pytest.raises(TypeError, match=rf"both '{old}' and its new name '{new}'"):
        cls(**{old: old_value, new: new_value})


def test_the_defaults_are_the_old_defaults_converted():
    """Behaviour unchanged at the defaults: each new default is the old default, as the method
    uses it (RoTTA's updated fractions 0.001 / 0.05 turned into the kept 0.999 / 0.95)."""
    with pytest.warns(DeprecationWarning):
        assert RoTTAConfig(ema_nu=0.001, rbn_momentum=0.05) == RoTTAConfig()
    assert RoTTAConfig().teacher_decay == 1 - 0.001  # what RoTTA kept before: exactly
    # RBN gets 1 - rbn_decay: the old 0.05 to the last bit of a float32 computation
    assert torch.tensor(1 - RoTTAConfig().rbn_decay) == torch.tensor(0.05)
    with pytest.warns(DeprecationWarning):
        assert CoTTAConfig(ema_alpha=0.999) == CoTTAConfig()
        assert SARConfig(ema_momentum=0.9) == SARConfig()
        assert EATAConfig(probs_momentum=0.9) == EATAConfig()
        assert ZOAConfig(shift_momentum=0.9, detector_momentum=0.8) == ZOAConfig()
        assert FOAConfig(shift_momentum=0.9) == FOAConfig()
        assert RTFQConfig(steps=300) == RTFQConfig()
    assert ABLConfig() == ABLConfig(tau_f=1.0, tau_g=0.25, decay=0.9)


def test_validation_errors_name_the_new_option_for_an_old_name():
    with pytest.warns(DeprecationWarning), pytest.raises(ValueError, match=r"rbn_decay"):
        RoTTAConfig(rbn_momentum=1.5)
    with pytest.warns(DeprecationWarning), pytest.raises(ValueError, match=r"loss_decay"):
        SARConfig(ema_momentum=1.0)
    with pytest.warns(DeprecationWarning), pytest.raises(ValueError, match=r"ABLConfig.decay"):
        TentConfig(abl=True, abl_momentum=1.0)
    with pytest.warns(DeprecationWarning), pytest.raises(ValueError, match=r"train_steps"):
        RTFQConfig(steps=0)


# --- ABL: one config embedded, the flat names at the edge ---------------------------------------
@pytest.mark.parametrize("cls", [TentConfig, EATAConfig, CoTTAConfig])
def test_the_flat_abl_options_fold_into_the_embedded_config(cls):
    with pytest.warns(DeprecationWarning) as caught:
        built = cls(abl=True, abl_tau_f=0.5, abl_tau_g=0.0, abl_momentum=0.8)
    assert built.abl == ABLConfig(tau_f=0.5, tau_g=0.0, decay=0.8)
    assert built == cls(abl=ABLConfig(tau_f=0.5, tau_g=0.0, decay=0.8))
    messages = " ".join(str(w.message) for w in caught)
    for old, new in (("abl_tau_f", "abl.tau_f"), ("abl_tau_g", "abl.tau_g")):
        assert f"'{old}' was renamed '{new}'" in messages
    assert "'abl_momentum' was renamed 'abl.decay'" in messages
    # into a dict or a config given for abl, too; without abl switched on, ABL stays off as before
    with pytest.warns(DeprecationWarning):
        assert cls(abl={"tau_g": 0.1}, abl_tau_f=2.0).abl == ABLConfig(tau_f=2.0, tau_g=0.1)
        assert cls(abl=ABLConfig(decay=0.5), abl_tau_f=2.0).abl == ABLConfig(2.0, 0.25, 0.5)
        assert cls(abl_tau_f=2.0).abl is None and cls(abl=False, abl_tau_f=2.0).abl is None
    with pytest.raises(TypeError, match=r"both 'abl_tau_f' and its new name 'abl.tau_f'"):
        cls(abl={"tau_f": 1.0}, abl_tau_f=2.0)
    assert cls(abl=True).abl == ABLConfig() and cls().abl is None


def test_the_old_abl_options_reach_the_method_through_adapt(qcnn):
    with pytest.warns(DeprecationWarning, match=r"'abl_tau_f' was renamed 'abl.tau_f'"):
        run = qtta_plugins.adapt(qcnn["w4a4"], None, "tent", abl=True, abl_tau_f=0.5)
    assert run.config.abl == ABLConfig(tau_f=0.5)
    assert run.method.abl is not None and (run.method.abl.tau_f, run.method.abl.decay) == (0.5, 0.9)


def test_an_old_option_name_through_adapt_runs_the_same(qcnn, short_stream):
    with pytest.warns(DeprecationWarning, match=r"'probs_momentum' was renamed 'probs_decay'"):
        old = qtta_plugins.adapt(
            qcnn["w4a4"], short_stream[:3], "eata", fisher=False, probs_momentum=0.5
        )
    new = qtta_plugins.adapt(qcnn["w4a4"], short_stream[:3], "eata", fisher=False, probs_decay=0.5)
    assert old.config == new.config
    assert torch.equal(old.predictions, new.predictions)
    assert torch.equal(old.method.probs, new.method.probs)


# --- stored states -----------------------------------------------------------------------------
def _old_record(config: Any, renames: dict[str, tuple[str, Any]]) -> dict[str, Any]:
    """``asdict(config)`` as a run saved it before the rename: ``renames`` maps a new field to
    its old name and old value; an embedded ABL config goes back to the four flat fields."""
    record = asdict(config)
    if "abl" in record:
        abl = record.pop("abl")
        record["abl"] = abl is not None
        for field, old in (
            ("tau_f", "abl_tau_f"),
            ("tau_g", "abl_tau_g"),
            ("decay", "abl_momentum"),
        ):
            record[old] = (abl or asdict(ABLConfig()))[field]
    for new, (old, value) in renames.items():
        record.pop(new)
        record[old] = value
    return record


@pytest.mark.parametrize(
    ("method", "options", "renames"),
    [
        ("tent", {"abl": True}, {}),
        (
            "rotta",
            {"update_frequency": 16},
            {"teacher_decay": ("ema_nu", 0.001), "rbn_decay": ("rbn_momentum", 0.05)},
        ),
    ],
)
def test_a_state_saved_with_the_old_names_loads_and_continues_exactly(
    qcnn, short_stream, tmp_path, method, options, renames
):
    """A state from before the rename holds its config record in the old names (built here by
    hand: the flat ABL fields, RoTTA's updated fractions). It loads (``weights_only``, the
    default) into a run built with the new names, and the run continues bit for bit as the run
    that saved it."""
    batches = [b.x[:16] for b in short_stream[:4]]
    first = qtta_plugins.adapt(qcnn["w4a4"], None, method, **options)
    for x in batches[:2]:
        first.step(x)
    state = first.state_dict()
    state["config"] = _old_record(first.config, renames)
    assert set(state["config"]) & ({"abl_tau_f", "abl_momentum"} | {o for o, _ in renames.values()})
    path = tmp_path / "old.pt"
    torch.save(state, path)

    resumed = qtta_plugins.adapt(qcnn["w4a4"], None, method, **options)
    resumed.load(path)
    for x in batches[2:]:
        assert torch.equal(resumed.step(x), first.step(x))
    assert resumed.batches == first.batches == 4

    # and what a run saves now records the new names, ABL as its own fields
    saved = resumed.state_dict()["config"]
    assert not set(saved) & {"abl_tau_f", "abl_tau_g", "abl_momentum", "ema_nu", "rbn_momentum"}
    if method == "tent":
        assert saved["abl"] == {"tau_f": 1.0, "tau_g": 0.25, "decay": 0.9}
    else:
        assert (saved["teacher_decay"], saved["rbn_decay"]) == (0.999, 0.95)


def test_a_zoa_state_saved_before_the_memory_rename_loads_and_continues_exactly(
    qcnn, short_stream, tmp_path
):
    """ZOA's store of domains was its "bank" (config ``bank_size``, state ``bank_deltas``): a
    state saved then loads into a run built now and continues bit for bit."""
    batches = [b.x[:16] for b in short_stream[:4]]
    # a domain stored every batch, so that the state holds one under its old key
    options = {"memory_size": 4, "detector": False, "store_period": 1, "min_domain_batches": 0}
    first = qtta_plugins.adapt(qcnn["w4a4"], None, "zoa", **options)
    for x in batches[:2]:
        first.step(x)
    assert first.method.memory_deltas.shape[0] > 0  # something stored, so the key matters
    state = first.state_dict()
    state["config"] = _old_record(
        first.config, {"memory_size": ("bank_size", 4), "memory": ("bank", True)}
    )
    state["method_state"]["bank_deltas"] = state["method_state"].pop("memory_deltas")
    path = tmp_path / "old_zoa.pt"
    torch.save(state, path)

    resumed = qtta_plugins.adapt(qcnn["w4a4"], None, "zoa", **options)
    resumed.load(path)
    assert torch.equal(resumed.method.memory_deltas, first.method.memory_deltas)
    for x in batches[2:]:
        assert torch.equal(resumed.step(x), first.step(x))


def test_a_stored_config_record_in_the_old_names_rebuilds_the_config():
    """A config record from an old state rebuilds the same config through the constructor (with
    the warnings) or :func:`upgrade_options` (silently)."""
    old = {"method": "rotta", "seed": 0, "ema_nu": 0.001, "rbn_momentum": 0.05}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert RoTTAConfig(**upgrade_options(RoTTAConfig, old, warn=False)) == RoTTAConfig()
    flat = {"abl": True, "abl_tau_f": 1.0, "abl_tau_g": 0.25, "abl_momentum": 0.9, "steps": 1}
    with pytest.warns(DeprecationWarning):
        assert TentConfig(**flat) == TentConfig(abl=True)


# --- the harness ---------------------------------------------------------------------------------
def test_the_harness_takes_old_names_and_keys_abl_by_its_fields(tmp_path):
    from test_bench import digits_config

    from qtta_plugins import bench
    from qtta_plugins.bench.grid import method_spec

    methods = {
        "tent + abl": {"method": "tent", "abl": True},
        "tent + abl 0.5": {"method": "tent", "abl": {"tau_f": 0.5}},
        "rotta old": {"method": "rotta", "ema_nu": 0.25},
    }
    with pytest.warns(DeprecationWarning, match=r"'ema_nu' was renamed 'teacher_decay'"):
        config = bench.load_config(digits_config(tmp_path, methods=methods, seeds=[0]))
        cells = {c.method: c for c in bench.expand(config)}
        specs = {name: method_spec(config, cell)["config"] for name, cell in cells.items()}
    assert specs["tent + abl"]["abl"] == {"tau_f": 1.0, "tau_g": 0.25, "decay": 0.9}
    assert specs["tent + abl 0.5"]["abl"] == {"tau_f": 0.5, "tau_g": 0.25, "decay": 0.9}
    assert specs["rotta old"]["teacher_decay"] == 0.75 and "ema_nu" not in specs["rotta old"]
