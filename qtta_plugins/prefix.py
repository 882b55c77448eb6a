"""Run a model twice on one batch without recomputing what cannot have changed.

A forward-only method evaluates the model on the same batch at two parameter settings. Every layer
that runs before the first use of an adapted parameter gives the same output in both passes, so the
second pass can start from there. :class:`PrefixCache` does that for any model, without knowing
the backend:

* an ``torch.fx.GraphModule`` (torchao's pt2e and ``convert_pt2e`` graphs) is split into a prefix
  graph, which returns every value the rest needs, and a suffix graph that takes them; both share
  the model's submodules and tensors, so the model itself is not changed;
* any other ``nn.Module`` (Brevitas, NNCF, plain torch) is probed once for the order in which its
  submodules run; in the second pass every submodule that ran to completion before the first
  module holding an adapted parameter returns what it returned in the first pass instead of
  computing (its forward is swapped for the pass, and put back after). Only the outputs that the
  second pass reads outside those submodules are kept (found by watching the torch calls of the
  first, full, second pass): the others are only ever read by the next replayed submodule, which
  does not compute in the second pass, so they come back as zero-memory stand-ins and pass 1
  frees them as plain inference does.

``run(x)`` is the full forward; ``rerun()`` recomputes the output for the same ``x`` after the
adapted parameters changed. When a first pass cannot be replayed safely (the model computed in a
different order, or changed a kept tensor in place after the prefix), ``rerun`` falls back to a full
forward and :attr:`PrefixCache.reusing` turns false.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode


class PrefixCache:
    """``run(x)`` then ``rerun()`` (any number of times): the model's output on ``x``, the second
    and later times computed from the first adapted parameter's layer on."""

    def __init__(self, model: nn.Module, params: Sequence[torch.Tensor]) -> None:
        self.model = model
        self.params = list(params)
        self._x: torch.Tensor | None = None

    #: whether ``rerun`` skips the prefix (False once a fallback was needed)
    reusing: bool = True
    #: share of the compute nodes / leaf modules the second pass skips, once known
    _fraction: float = 0.0

    def run(self, x: torch.Tensor) -> torch.Tensor:
        self._x = x
        return self.model(x)

    def rerun(self) -> torch.Tensor:
        if self._x is None:
            raise RuntimeError("PrefixCache.rerun() before run(x)")
        return self.model(self._x)

    def release(self) -> None:
        """Drop what the cache keeps of the last batch (``rerun`` then needs a new ``run``)."""
        self._x = None

    def close(self) -> None:
        """:meth:`release`, and take off any hooks the cache put on the model."""
        self.release()

    @property
    def reused_fraction(self) -> float:
        """The share of the model's compute nodes / modules the second pass skips (0 when none)."""
        return self._fraction if self.reusing else 0.0


def prefix_cache(model: nn.Module, params: Sequence[torch.Tensor]) -> PrefixCache:
    """The cache that suits ``model``: graph split for an fx graph, module replay otherwise."""
    if isinstance(model, torch.fx.GraphModule):
        return GraphPrefixCache(model, params)
    return ModulePrefixCache(model, params)


# --- fx graphs -------------------------------------------------------------------------------
class GraphPrefixCache(PrefixCache):
    """Split an fx graph into what does not depend on the adapted parameters and what does.

    The prefix graph takes the model's inputs, computes every node that cannot change with the
    adapted parameters, and returns the *frontier*: the prefix values the suffix uses. The suffix graph takes the frontier and returns the model's output. Both are
    ``GraphModule``s over the model's own submodules and tensors (shared, not copied), rebuilt when
    the model's graph is recompiled (a method inserting a feature tap, say).
    """

    #: keep batch-independent values the suffix uses (weights' fake-quantization) from the
    #: first pass instead of computing them again: faster second passes, more step memory
    keep_constants: bool = False

    def __init__(self, model: torch.fx.GraphModule, params: Sequence[torch.Tensor]) -> None:
        super().__init__(model, params)
        self._built_for: str | None = None
        self._frontier: tuple[torch.Tensor, ...] | None = None

    def _build(self) -> None:
        gm: torch.fx.GraphModule = self.model  # type: ignore[assignment]
        adapted = {id(p) for p in self.params}
        nodes = list(gm.graph.nodes)

        def holds_adapted(node: torch.fx.Node) -> bool:
            if node.op == "get_attr":
                return id(_resolve(gm, str(node.target))) in adapted
            if node.op == "call_module":
                module = gm.get_submodule(str(node.target))
                return any(id(t) in adapted for t in (*module.parameters(), *module.buffers()))
            return False

        # A node is dirty when its value can change with the adapted parameters. Every other node
        # (wherever it sits in the graph: a residual shortcut after the first adapted norm too)
        # computes once, in the prefix.
        dirty: set[torch.fx.Node] = set()
        for node in nodes:
            if node.op == "output":
                continue
            if holds_adapted(node) or any(a in dirty for a in node.all_input_nodes):
                dirty.add(node)
        prefix = [n for n in nodes if n not in dirty and n.op != "output"]
        in_prefix = set(prefix)
        # Values that do not depend on the batch (the weights' fake-quantization, say) are not
        # kept: the suffix computes them again, as plain inference would, instead of holding
        # every later layer's quantized weight through the step.
        batch: set[torch.fx.Node] = set()
        for node in nodes:
            if (
                node.op == "placeholder"
                or (self.keep_constants and node.op != "get_attr")
                or any(a in batch for a in node.all_input_nodes)
            ):
                batch.add(node)
        frontier = [
            n for n in prefix if n in batch and any(user not in in_prefix for user in n.users)
        ]
        # batch-independent prefix values the suffix uses
        constants = _with_inputs(
            a
            for n in nodes
            if n not in in_prefix
            for a in n.all_input_nodes
            if a in in_prefix and a not in batch
        )
        # ... and the prefix does not compute those of them that only the suffix uses
        head_uses = _with_inputs(a for n in prefix if n not in constants for a in n.all_input_nodes)

        head = torch.fx.Graph()
        env: dict[torch.fx.Node, torch.fx.Node] = {}
        for node in prefix:
            if node in constants and node not in head_uses:
                continue
            env[node] = head.node_copy(node, lambda a: env[a])
        head.output(tuple(env[n] for n in frontier))

        tail = torch.fx.Graph()
        tail_env: dict[torch.fx.Node, torch.fx.Node] = {}
        for i, node in enumerate(frontier):
            tail_env[node] = tail.placeholder(f"frontier_{i}")
        inputs = set(tail_env.values())
        for node in nodes:
            if node in tail_env:
                continue
            if node in in_prefix:
                if node in constants:
                    tail_env[node] = tail.node_copy(node, lambda a: tail_env[a])
                continue
            if _mutates_first_argument(node) and tail_env.get(node.args[0]) in inputs:
                # an in-place op on a kept value (converted graphs: aten.add_ of a residual)
                # would corrupt it for the next pass: give it a copy
                copy = tail.call_function(torch.ops.aten.clone.default, (tail_env[node.args[0]],))
                tail_env[node] = tail.node_copy(
                    node, lambda a, _c=copy, _n=node: _c if a is _n.args[0] else tail_env[a]
                )
                continue
            tail_env[node] = tail.node_copy(node, lambda a: tail_env[a])
        self._head = torch.fx.GraphModule(gm, head)
        self._tail = torch.fx.GraphModule(gm, tail)
        # torch.export's graphs return flat outputs that their codegen folds into the model's
        # output structure: the tail's output gets the same folding
        info = getattr(gm.graph._codegen, "pytree_info", None)
        self._out_spec = getattr(info, "out_spec", None)
        self._placeholders = [n for n in nodes if n.op == "placeholder"]
        computing = [n for n in nodes if n.op in ("call_function", "call_module", "call_method")]
        skipped = [
            n
            for n in prefix
            if n not in constants and n.op in ("call_function", "call_module", "call_method")
        ]
        self._fraction = len(skipped) / max(1, len(computing))
        self._built_for = gm.code

    def _current(self) -> None:
        if self._built_for is None or self._built_for != self.model.code:
            self._build()

    def run(self, x: torch.Tensor) -> torch.Tensor:
        self._current()
        self._x = x
        if len(self._placeholders) != 1:
            self.reusing = False
            return self.model(x)
        self._frontier = tuple(self._head(x))
        self._versions = _versions(self._frontier)
        return self._output(self._tail(*self._frontier))

    def _output(self, flat: Any) -> Any:
        if self._out_spec is None:
            return flat
        return torch.utils._pytree.tree_unflatten(list(flat), self._out_spec)

    def rerun(self) -> torch.Tensor:
        if self._frontier is None:
            return super().rerun()
        if _versions(self._frontier) != self._versions:
            self.reusing = False  # a kept value was changed in place: compute in full
            self._frontier = None
            return super().rerun()
        self._current()
        return self._output(self._tail(*self._frontier))

    def release(self) -> None:
        super().release()
        self._frontier = None


def _with_inputs(nodes: Iterable[torch.fx.Node]) -> set[torch.fx.Node]:
    """``nodes`` and every node they are computed from."""
    found: set[torch.fx.Node] = set()
    todo = list(nodes)
    while todo:
        node = todo.pop()
        if node not in found:
            found.add(node)
            todo.extend(node.all_input_nodes)
    return found


def _mutates_first_argument(node: torch.fx.Node) -> bool:
    schema = getattr(node.target, "_schema", None)
    if node.op != "call_function" or schema is None or not schema.arguments or not node.args:
        return False
    alias = schema.arguments[0].alias_info
    return bool(alias is not None and alias.is_write)


def _resolve(gm: nn.Module, target: str) -> Any:
    *path, name = target.split(".")
    owner = gm.get_submodule(".".join(path)) if path else gm
    return getattr(owner, name)


# --- eager modules ---------------------------------------------------------------------------
class ModulePrefixCache(PrefixCache):
    """Replay, in the second pass, every submodule that finished before the first module holding
    an adapted parameter started.

    The first ``run`` probes the call order (module entries and exits). The *replayed* modules
    are the outermost ones that were called once and returned before that first adapted module
    was entered. Each later ``run`` keeps their outputs (by reference); ``rerun`` swaps their
    ``forward`` for one returning the kept output, calls the model, and puts the forwards back.
    Hooks on the replayed modules still run; hooks on modules inside them do not (they would see
    the first pass's values again). A kept output changed in place after the prefix (by a later
    in-place op) cannot be replayed: detected by the tensor's version counter, it turns reuse off.
    """

    def __init__(self, model: nn.Module, params: Sequence[torch.Tensor]) -> None:
        super().__init__(model, params)
        adapted = {id(p) for p in self.params}
        self._owners = {
            id(m)
            for m in model.modules()
            if any(id(p) in adapted for p in m.parameters(recurse=False))
        }
        self._replayed: list[nn.Module] | None = None
        self._kept: dict[int, Any] = {}
        self._versions: dict[int, list[int]] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._boundary: nn.Module | None = None
        #: replayed modules whose outputs the second pass reads (None: not known yet)
        self._needed: set[int] | None = None

    def _probe(self, x: torch.Tensor) -> torch.Tensor:
        named = [(n, m) for n, m in self.model.named_modules() if m is not self.model]
        clock = [0]
        enter: dict[int, list[int]] = {}
        leave: dict[int, list[int]] = {}
        first_adapted = [None]

        def pre(module: nn.Module, args: Any) -> None:
            clock[0] += 1
            enter.setdefault(id(module), []).append(clock[0])
            if id(module) in self._owners and first_adapted[0] is None:
                first_adapted[0] = clock[0]
                self._boundary = module

        def post(module: nn.Module, args: Any, out: Any) -> None:
            clock[0] += 1
            leave.setdefault(id(module), []).append(clock[0])

        handles = [m.register_forward_pre_hook(pre) for _, m in named]
        handles += [m.register_forward_hook(post) for _, m in named]
        try:
            out = self.model(x)
        finally:
            for h in handles:
                h.remove()
        boundary = first_adapted[0]
        replayed: list[nn.Module] = []
        replayed_names: list[str] = []
        if boundary is not None:
            for name, module in named:
                calls, ends = enter.get(id(module), []), leave.get(id(module), [])
                if len(calls) != 1 or len(ends) != 1 or ends[0] > boundary:
                    continue
                if any(name.startswith(p + ".") for p in replayed_names):
                    continue  # inside a module already replayed whole
                replayed.append(module)
                replayed_names.append(name)
        self._replayed = replayed
        total = sum(1 for _, m in named if not list(m.children()) and id(m) in enter)
        inner = {
            id(m)
            for r in replayed
            for m in r.modules()
            if not list(m.children()) and id(m) in enter
        }
        self._fraction = len(inner) / max(1, total)
        return out

    def _find_needed(self) -> torch.Tensor:
        """A full second pass that finds which replayed outputs the second pass reads.

        An output is needed when a torch call outside every replayed module reads it: the
        parents' own code, hooks (as a second pass runs them: a hook acting in pass 1 only reads
        nothing here), the modules from the boundary on. The rest are read only by the next
        replayed module, which a replayed pass does not compute.
        """
        replayed = self._replayed or []
        clock = [0]
        spans: dict[int, list[int]] = {}
        outputs: dict[int, Any] = {}  # held for the pass, so that tensor ids stay unique

        def pre(module: nn.Module, args: Any) -> None:
            clock[0] += 1
            spans[id(module)] = [clock[0], clock[0]]

        def post(module: nn.Module, args: Any, out: Any) -> None:
            clock[0] += 1
            spans[id(module)][1] = clock[0]
            outputs[id(module)] = out

        # ``pre`` runs after the module's other pre-hooks and ``post`` before its other forward
        # hooks, so that what those hooks read counts as read outside the module
        handles = [m.register_forward_pre_hook(pre) for m in replayed]
        handles += [m.register_forward_hook(post, prepend=True) for m in replayed]
        reads = _ReadLog(clock)
        try:
            with reads:
                out = self.model(self._x)
        finally:
            for h in handles:
                h.remove()
        read_outside = reads.outside([tuple(s) for s in spans.values()])
        self._needed = {
            id(m)
            for m in replayed
            if not isinstance(outputs.get(id(m)), torch.Tensor)
            or id(outputs[id(m)]) in read_outside
        }
        return out

    def _keep_hooks(self) -> None:
        """Hooks that keep this batch's prefix outputs: on the model from ``run`` to
        ``release``, so that between steps the model carries none."""
        self._remove_hooks()
        if not self._replayed or self._boundary is None or self._needed is None:
            return

        def keep(mod: nn.Module, args: Any, out: Any) -> None:
            self._kept[id(mod)] = out

        def stand_in(mod: nn.Module, args: Any, out: Any) -> None:
            # read by no one in the second pass: a stand-in of the same shape, without memory
            self._kept[id(mod)] = torch.zeros((), dtype=out.dtype, device=out.device).expand(
                out.shape
            )

        def versions(mod: nn.Module, args: Any) -> None:
            # Versions as the prefix left them: an in-place op inside the prefix (a ReLU after a
            # replayed norm) is replayed too, one in the rest of the model would not be.
            if not self._versions:
                self._versions = {key: _versions(out) for key, out in self._kept.items()}

        for module in self._replayed:
            hook = keep if id(module) in self._needed else stand_in
            self._handles.append(module.register_forward_hook(hook))
        self._handles.append(self._boundary.register_forward_pre_hook(versions))

    def run(self, x: torch.Tensor) -> torch.Tensor:
        self._x = x
        self._kept.clear()
        self._versions = {}
        if self._replayed is None:
            return self._probe(x)  # this pass is not kept: rerun computes in full once
        self._keep_hooks()
        return self.model(x)

    def rerun(self) -> torch.Tensor:
        replayed = self._replayed or []
        if self._x is not None and replayed and self._needed is None and self.reusing:
            return self._find_needed()  # computes in full, once
        if (
            not self.reusing
            or not replayed
            or len(self._kept) != len(replayed)
            or len(self._versions) != len(replayed)
            or any(_versions(self._kept[id(m)]) != self._versions[id(m)] for m in replayed)
        ):
            if replayed and len(self._kept) == len(replayed) == len(self._versions):
                self.reusing = False  # a kept output was changed in place: not replayable
            return super().rerun()
        patched = []
        try:
            for module in replayed:
                out = self._kept[id(module)]
                module.forward = lambda *a, _out=out, **k: _out  # type: ignore[method-assign]
                patched.append(module)
            return self.model(self._x)
        finally:
            for module in patched:
                del module.forward  # back to the class's forward

    def release(self) -> None:
        super().release()
        self._kept.clear()
        self._versions = {}
        self._remove_hooks()

    def _remove_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


class _ReadLog(TorchFunctionMode):
    """The tensors each torch call reads, stamped with a clock (one tick per call)."""

    def __init__(self, clock: list[int]) -> None:
        super().__init__()
        self.clock = clock
        self.calls: list[tuple[int, list[int]]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.clock[0] += 1
        self.calls.append((self.clock[0], [id(t) for t in _tensors((args, kwargs))]))
        return func(*args, **kwargs)

    def outside(self, spans: list[tuple[int, int]]) -> set[int]:
        """Ids of the tensors read by calls outside every (enter, leave) span."""
        read: set[int] = set()
        for tick, ids in self.calls:
            if not any(start < tick < end for start, end in spans):
                read.update(ids)
        return read


def _versions(out: Any) -> list[int]:
    """The in-place version counters of the tensors in ``out`` (a tensor or nested containers)."""
    return [t._version for t in _tensors(out)]


def _tensors(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, tuple | list):
        return [t for o in out for t in _tensors(o)]
    if isinstance(out, dict):
        return [t for o in out.values() for t in _tensors(o)]
    return []
