"""Models from files: an architecture by name (torchvision, timm, or the user's own factory) and a
local checkpoint, in one call, :func:`load_model` (re-exported as ``qtta_plugins.models.load_model``).

Nothing is downloaded: torchvision models are built with ``weights=None``, timm models with
``pretrained=False``, and the weights come only from the file given. Checkpoints are read with
``torch.load(..., weights_only=True)``, which unpickles tensors and plain containers only; a file
that holds more (a whole pickled ``nn.Module``, as some RobustBench files are, or a training
checkpoint with arbitrary objects) needs a full unpickling, which runs code stored in the file, and
is read only when the caller says ``trusted=True``.

torchvision and timm are imported on first use, through :mod:`qtta_plugins.models.zoo` (the ``vision``
extra).
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import os
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

#: Where a classifier keeps its last layer, in the libraries' naming (tried before the fallback:
#: the last weight of two or more dimensions in the state dict).
HEAD_KEYS: tuple[str, ...] = (
    "fc.weight",
    "head.weight",
    "head.fc.weight",
    "classifier.weight",
    "last_linear.weight",
    "linear.weight",
    "logits.weight",
)

#: Prefixes that wrappers put before every key: DistributedDataParallel / DataParallel, and
#: ``torch.compile``'s wrapper module.
WRAPPER_PREFIXES: tuple[str, ...] = ("module.", "_orig_mod.")


class UntrustedCheckpointError(ValueError):
    """A checkpoint that ``torch.load(weights_only=True)`` cannot read: it needs a full unpickling,
    which runs code from the file (``load_model(..., trusted=True)`` allows it)."""


def load_model(
    spec: str | os.PathLike[str],
    weights: str | os.PathLike[str] | None = None,
    num_classes: int | None = None,
    *,
    trusted: bool = False,
    **kwargs: Any,
) -> nn.Module:
    """A model built from ``spec`` with the weights of the local file ``weights``, in eval mode.

    Args:
        spec: what to build:

            * ``"torchvision:<name>"``: any torchvision classification model
              (``torchvision.models.get_model(name, weights=None, ...)``);
            * ``"timm:<name>"``: ``timm.create_model(name, pretrained=False, ...)``;
            * ``"package.module:factory"``: the user's own callable (``num_classes`` passed when
              it takes one);
            * a checkpoint file holding a whole pickled ``nn.Module`` (``weights`` then unused;
              needs ``trusted=True``).
        weights: a state dict file (``torch.save(model.state_dict())``); or a checkpoint dict with
            it under ``"state_dict"`` / ``"model_state_dict"`` / ``"model"`` (RobustBench's and
            most training scripts'); or a whole pickled module (``trusted=True``). ``"module."``
            prefixes of DistributedDataParallel saves are stripped. ``None``: random weights.
        num_classes: the head size; default: the checkpoint's (the shape of its last layer's
            weight: ``fc`` / ``head`` / ``classifier``...), else the library's default.
        trusted: allow a full unpickling of ``weights`` (or ``spec``) when ``weights_only=True``
            cannot read it. Unpickling runs code stored in the file: only for files you trust.
        kwargs: passed to the model's constructor (e.g. timm's ``img_size=32``); never
            ``pretrained`` or torchvision's ``weights``: nothing is downloaded.

    Raises:
        FileNotFoundError: ``weights`` (or the ``spec`` file) does not exist.
        UntrustedCheckpointError: the file needs a full unpickling and ``trusted`` is False (the
            message says why, and how to allow it).
        ValueError: an unknown model name or spec, a file that is no checkpoint, ``num_classes``
            against the checkpoint's head, or a state dict that does not fit the model (missing
            or unexpected keys, shapes), named with the file.
    """
    if num_classes is not None and (
        isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1
    ):
        raise ValueError(f"num_classes must be a positive int or None, got {num_classes!r}")
    for key in ("pretrained", "weights"):
        if key in kwargs:
            raise ValueError(
                f"{key}= is not taken: nothing is downloaded; pass a local file as weights="
            )
    kind, name = _parse(spec)
    if kind == "file":
        if weights is not None:
            raise ValueError(f"spec {spec!r} is a checkpoint file: there is no other weights file")
        return _whole_module(Path(name), num_classes, trusted)
    state, path, given = None, None, num_classes
    if weights is not None:
        path = Path(weights).expanduser()
        state = state_dict_of(_read(path, trusted), path)
        head = head_size(state)
        if num_classes is None:
            num_classes = head
        elif head is not None and head != num_classes:
            raise ValueError(
                f"{path}: its last layer has {head} classes, but num_classes={num_classes}"
            )
    model = _build(kind, name, num_classes, given is not None, kwargs)
    if state is not None and path is not None:
        load_state(model, state, path)
    return model.eval()


# --------------------------------------------------------------------------------------------
# checkpoints
# --------------------------------------------------------------------------------------------


def _read(path: Path, trusted: bool) -> Any:
    """``torch.load`` of ``path`` on the CPU: ``weights_only=True``, or in full when ``trusted``."""
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        reason = next(
            (line.strip() for line in str(err).splitlines() if "Unsupported" in line),
            "it holds objects other than tensors and plain containers",
        )
        if "Weights only load failed" not in str(err) or "Unsupported operand" in reason:
            # not a pickle at all: no unpickling would read it
            raise ValueError(f"{path} is not a checkpoint torch.load can read ({reason})") from err
        if not trusted:
            raise UntrustedCheckpointError(
                f"{path} cannot be read with torch.load(weights_only=True) ({reason}): it needs a "
                "full unpickling, and unpickling runs code stored in the file. If you trust "
                "where the file comes from, pass trusted=True; otherwise re-save its state dict "
                "(torch.save(model.state_dict(), path)) where you can run it safely."
            ) from err
    except Exception as err:  # a zip that is not one, a truncated file, text...
        raise ValueError(f"{path} is not a checkpoint torch.load can read: {err!r}") from err
    return torch.load(path, map_location="cpu", weights_only=False)


def state_dict_of(obj: Any, path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """The state dict in a loaded checkpoint: the object itself, its ``"state_dict"`` /
    ``"model_state_dict"`` / ``"model"`` entry, or a whole module's; wrapper prefixes
    (:data:`WRAPPER_PREFIXES`) stripped."""
    if isinstance(obj, nn.Module):
        obj = obj.state_dict()
    if isinstance(obj, Mapping) and not _is_state_dict(obj):
        for key in ("state_dict", "model_state_dict", "model", "net"):
            inner = obj.get(key)
            inner = inner.state_dict() if isinstance(inner, nn.Module) else inner
            if isinstance(inner, Mapping) and _is_state_dict(inner):
                obj = inner
                break
    if not isinstance(obj, Mapping) or not _is_state_dict(obj):
        found = (
            f"a dict with keys {', '.join(map(str, list(obj)[:6]))}"
            if isinstance(obj, Mapping)
            else f"a {type(obj).__name__}"
        )
        raise ValueError(
            f"{path} holds no state dict: expected parameter names -> tensors, or a dict with it "
            f"under 'state_dict' / 'model_state_dict' / 'model'; found {found}"
        )
    state = dict(obj)
    for prefix in WRAPPER_PREFIXES:
        if all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


def _is_state_dict(obj: Mapping[Any, Any]) -> bool:
    return (
        bool(obj)
        and all(isinstance(k, str) for k in obj)
        and any(isinstance(v, torch.Tensor) for v in obj.values())
    )


def head_size(state: Mapping[str, Any]) -> int | None:
    """The number of classes of a classifier's state dict: the first dimension of its last
    layer's weight (:data:`HEAD_KEYS`, then the last weight of two or more dimensions)."""
    weights = {
        k: v
        for k, v in state.items()
        if k.endswith("weight") and isinstance(v, torch.Tensor) and v.ndim >= 2
    }
    for key in HEAD_KEYS:
        if key in weights:
            return int(weights[key].shape[0])
    numbered = [k for k in weights if k.startswith("classifier.") and k.count(".") == 2]
    if numbered:
        return int(weights[max(numbered, key=lambda k: int(k.split(".")[1]))].shape[0])
    return int(weights[list(weights)[-1]].shape[0]) if weights else None


def load_state(model: nn.Module, state: Mapping[str, Any], path: str | os.PathLike[str]) -> None:
    """``model.load_state_dict(state)``, after checking that it fits: no missing key (a batch
    norm's ``num_batches_tracked``, absent from older saves, excepted), no unexpected key, no
    shape that differs. A misfit is a ``ValueError`` naming ``path`` and what did not match,
    raised before the model is changed."""
    own = model.state_dict()
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k} (file {tuple(state[k].shape)}, model {tuple(own[k].shape)})"
        for k in own
        if k in state
        and isinstance(state[k], torch.Tensor)
        and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    problems = [
        f"{what}: {_few(keys)}"
        for what, keys in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shapes that differ", shapes),
        )
        if keys
    ]
    if problems:
        raise ValueError(
            f"{path} does not fit {type(model).__name__}: {'; '.join(problems)}. Is it the "
            "checkpoint of this architecture (and of this num_classes)?"
        )
    model.load_state_dict(state, strict=False)


def _few(items: list[str], n: int = 5) -> str:
    more = f" and {len(items) - n} more" if len(items) > n else ""
    return ", ".join(items[:n]) + more


def _whole_module(path: Path, num_classes: int | None, trusted: bool) -> nn.Module:
    obj = _read(path.expanduser(), trusted)
    if not isinstance(obj, nn.Module):
        raise ValueError(
            f"{path} holds no whole model but a {type(obj).__name__}: name its architecture, "
            f"e.g. load_model('torchvision:resnet18', weights={str(path)!r})"
        )
    head = head_size(obj.state_dict())
    if num_classes is not None and head is not None and head != num_classes:
        raise ValueError(
            f"{path}: its last layer has {head} classes, not num_classes={num_classes}"
        )
    return obj.eval()


# --------------------------------------------------------------------------------------------
# architectures
# --------------------------------------------------------------------------------------------


def _parse(spec: str | os.PathLike[str]) -> tuple[str, str]:
    """``(kind, name)``: ``torchvision`` / ``timm`` / ``factory`` (``"pkg.mod:attr"``) / ``file``."""
    if isinstance(spec, os.PathLike) or (isinstance(spec, str) and Path(spec).is_file()):
        return "file", os.fspath(spec)
    if not isinstance(spec, str) or ":" not in spec:
        raise ValueError(
            f"unknown model spec {spec!r}: expected 'torchvision:<name>', 'timm:<name>', "
            "'package.module:factory' or an existing checkpoint file"
        )
    prefix, name = spec.split(":", 1)
    if not prefix or not name:
        raise ValueError(f"model spec {spec!r} lacks a name on one side of ':'")
    if prefix in ("torchvision", "timm"):
        return prefix, name
    return "factory", spec


def _build(
    kind: str, name: str, num_classes: int | None, explicit: bool, kwargs: dict[str, Any]
) -> nn.Module:
    head = {} if num_classes is None else {"num_classes": num_classes}
    if kind == "torchvision":
        from .zoo import import_torchvision

        models = import_torchvision().models
        known = models.list_models(module=models)
        if name not in known:
            raise ValueError(
                f"torchvision has no classification model {name!r}"
                f"{_close(name, known)} ({len(known)} models: torchvision.models.list_models())"
            )
        return models.get_model(name, weights=None, **head, **kwargs)
    if kind == "timm":
        from .zoo import import_timm

        timm = import_timm()
        if not timm.is_model(name):
            raise ValueError(
                f"timm has no model {name!r}{_close(name, timm.list_models())} (timm.list_models())"
            )
        return timm.create_model(name, pretrained=False, **head, **kwargs)
    factory = _factory(name)
    if head and not _takes_num_classes(factory):
        if explicit:
            raise ValueError(f"{name} takes no num_classes argument: leave num_classes out")
        head = {}  # the checkpoint's head size is then checked against the model's, key by key
    model = factory(**head, **kwargs)
    if not isinstance(model, nn.Module):
        raise TypeError(f"{name} returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def _factory(spec: str) -> Any:
    module_name, attr = spec.split(":", 1)
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"model spec {spec!r}: cannot import {module_name!r} ({err})") from err
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"model spec {spec!r}: {module_name} has no {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"model spec {spec!r}: {attr} is not callable")
    return obj


def _takes_num_classes(factory: Any) -> bool:
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == "num_classes" or p.kind is p.VAR_KEYWORD for p in params)


def _close(name: str, known: list[str]) -> str:
    matches = difflib.get_close_matches(name, known, n=3)
    return f"; did you mean {', '.join(matches)}?" if matches else ""
