"""Node-level interventions, functional: ``out, records = intervene(model, patches, *args)``.

Targets
-------
A target is a string naming one activation:

* a **TransformerLens hook name** (a key of ``model.hook_dict``, on ``HookedTransformer``
  or ``TransformerBridge``), e.g. ``"blocks.0.hook_resid_pre"`` (``[batch, pos,
  d_model]``) or ``"blocks.0.attn.hook_z"`` (``[batch, pos, head, d_head]``). The value
  is the one a TransformerLens hook sees (the bridge's head reshaping applied).
* for **any** ``torch.nn.Module``: ``"{module path}.output"`` (what the submodule
  returned) or ``"{module path}.input"``; the root module is ``"output"`` / ``"input"``.
  ``.input`` is the module's argument when it was called with exactly one; otherwise
  pick one with ``.input.{i}`` (i-th positional argument) or ``.input.{name}``
  (parameter name, whether it was passed positionally or by keyword).
* further ``.{step}`` parts go into containers: an integer indexes a tuple or list, a
  name is a dict / ``ModelOutput`` key, a namedtuple or dataclass field. Examples:
  ``"layer.output.0"``, ``"attn.output.attn_weights"``, ``"output.logits"``.
  If a module path itself has a submodule called ``input``/``output`` (BERT's
  ``attention.output``), the longest module path wins:
  ``"attention.output.output"`` is the output of the module ``attention.output``.

:func:`targets` lists the targets a model reaches on an example input, with shapes.

Purity and threads
------------------
The model is never changed: while at least one call is active, each hooked
``(module, input|output)`` carries one stateless hook, shared by all calls
(reference-counted under a lock and removed when the last call leaves, also on error).
The hook dispatches through a ``contextvars.ContextVar`` holding the current call's
patches, so concurrent calls in different threads never see each other's patches and a
thread with no active call runs the model unchanged. Hooks fire under
``torch.func.functional_call``, ``vmap`` and ``grad``; records are returned, never kept.
(Context does not follow work into other threads: a model that runs submodules in its
own worker threads, or recomputes them in backward via checkpointing, is not patched
there.)
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import dataclasses
import difflib
import inspect
import re
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Optional, Union

import torch
from torch import Tensor, nn

from funcpatch.patches import Patch, PatchError, ProbePatch, RecordPatch

__all__ = ["intervene", "targets", "TargetError"]

Step = Union[int, str]
PatchSpec = Mapping[str, Union[Patch, Sequence[Patch]]]


class TargetError(KeyError):
    """A target that does not exist, cannot be reached, or whose path does not fit its value."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


# ------------------------------------------------------------------ target resolution


@dataclasses.dataclass(frozen=True)
class _Site:
    """One resolved target of one call, with its patches in order."""

    name: str
    module: nn.Module
    kind: str  # "input" | "output"
    path: tuple[Step, ...]  # steps into the value (for "input": first step picks the argument)
    conversion: Any  # TransformerLens hook_conversion (convert/revert) or None
    patches: tuple[Patch, ...] = ()
    keys: tuple[Optional[str], ...] = ()  # records key per patch (None for modifying patches)


def _hook_points(model: nn.Module) -> Mapping[str, nn.Module]:
    hooks = getattr(model, "hook_dict", None)
    return hooks if isinstance(hooks, Mapping) else {}


def _parse_steps(tokens: Sequence[str], name: str) -> tuple[Step, ...]:
    steps = []
    for tok in tokens:
        if not tok:
            raise TargetError(f"target {name!r} has an empty part (two dots in a row or a trailing dot)")
        steps.append(int(tok) if re.fullmatch(r"-?\d+", tok) else tok)
    return tuple(steps)


def _module_target_names(model: nn.Module) -> list[str]:
    names = []
    for path, _ in model.named_modules(remove_duplicate=False):
        names += [f"{path}.output", f"{path}.input"] if path else ["output", "input"]
    return names


def _resolve(model: nn.Module, name: str, hooks: Mapping[str, nn.Module]) -> _Site:
    if not isinstance(name, str):
        raise TypeError(f"targets are strings, got {type(name).__name__}: {name!r}")
    if name in hooks:
        hook = hooks[name]
        return _Site(name, hook, "output", (), getattr(hook, "hook_conversion", None))
    tokens = name.split(".")
    for i in range(len(tokens) - 1, -1, -1):  # longest module path first
        if tokens[i] not in ("input", "output"):
            continue
        try:
            module = model.get_submodule(".".join(tokens[:i]))
        except AttributeError:
            continue
        return _Site(name, module, tokens[i], _parse_steps(tokens[i + 1 :], name), None)
    candidates = list(hooks) + _module_target_names(model)
    close = difflib.get_close_matches(name, candidates, n=5, cutoff=0.6)
    hint = f" Did you mean: {', '.join(repr(c) for c in close)}?" if close else ""
    raise TargetError(
        f"unknown target {name!r}.{hint} Valid targets are TransformerLens hook names "
        f"(model.hook_dict) and '<module path>.output' / '<module path>.input' (root: "
        f"'output' / 'input'), optionally followed by '.<index or key>'; "
        f"funcpatch.targets(model, *example_inputs) lists them."
    )


def _sites(model: nn.Module, patches: PatchSpec) -> list[_Site]:
    if not isinstance(patches, Mapping):
        raise TypeError(
            f"patches must be a dict {{target: patch or list of patches}}, got {type(patches).__name__}"
        )
    hooks = _hook_points(model)
    sites = []
    for name, spec in patches.items():
        plist = tuple(spec) if isinstance(spec, (list, tuple)) else (spec,)
        for p in plist:
            if not isinstance(p, Patch):
                raise TypeError(
                    f"patches[{name!r}] must be a Patch (ZeroPatch, AddPatch, ReplacePatch, "
                    f"CustomPatch, ProbePatch, RecordPatch) or a list of them, got {type(p).__name__}"
                )
        observers = [i for i, p in enumerate(plist) if isinstance(p, (ProbePatch, RecordPatch))]
        keys = tuple(
            (name if len(observers) == 1 else f"{name}#{i}") if i in observers else None
            for i in range(len(plist))
        )
        sites.append(dataclasses.replace(_resolve(model, name, hooks), patches=plist, keys=keys))
    return sites


# ------------------------------------------------------------ stepping into containers


def _is_namedtuple(obj: Any) -> bool:
    return isinstance(obj, tuple) and hasattr(obj, "_fields")


def _children(obj: Any) -> Optional[list[tuple[Step, Any]]]:
    """(step, child) pairs of a container, or None if ``obj`` is not one."""
    if isinstance(obj, Mapping):
        return [(k, v) for k, v in obj.items() if isinstance(k, (str, int))]
    if _is_namedtuple(obj):
        return list(zip(obj._fields, obj))
    if isinstance(obj, (tuple, list)):
        return list(enumerate(obj))
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return [(f.name, getattr(obj, f.name)) for f in dataclasses.fields(obj)]
    return None


def _child(obj: Any, step: Step, where: str) -> Any:
    if isinstance(obj, Mapping):
        for key in (step, str(step)):
            if key in obj:
                return obj[key]
        raise TargetError(f"{where}: no key {step!r}; the {type(obj).__name__} has keys {list(obj)}")
    if _is_namedtuple(obj) and isinstance(step, str):
        if step in obj._fields:
            return getattr(obj, step)
        raise TargetError(f"{where}: no field {step!r}; fields are {list(obj._fields)}")
    if isinstance(obj, (tuple, list)):
        if isinstance(step, int) and -len(obj) <= step < len(obj):
            return obj[step]
        raise TargetError(
            f"{where}: step {step!r} does not index a {type(obj).__name__} of length "
            f"{len(obj)}; use 0..{len(obj) - 1}"
        )
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        names = [f.name for f in dataclasses.fields(obj)]
        if step in names:
            return getattr(obj, step)
        raise TargetError(f"{where}: no field {step!r}; fields are {names}")
    raise TargetError(f"{where}: cannot step into a {type(obj).__name__} with {step!r}")


def _with_child(obj: Any, step: Step, new: Any) -> Any:
    """A copy of container ``obj`` whose child at ``step`` is ``new`` (``obj`` untouched)."""
    if isinstance(obj, Mapping):
        key = step if step in obj else str(step)
        try:
            out = copy.copy(obj)
            out[key] = new
        except TypeError:  # read-only mapping
            out = {**obj, key: new}
        return out
    if _is_namedtuple(obj):
        i = obj._fields.index(step) if isinstance(step, str) else step % len(obj)
        return type(obj)(*(new if j == i else v for j, v in enumerate(obj)))
    if isinstance(obj, (tuple, list)):
        i = step % len(obj)
        items = [new if j == i else v for j, v in enumerate(obj)]
        return items if isinstance(obj, list) else tuple(items)
    return dataclasses.replace(obj, **{step: new})


def _get_at(obj: Any, path: tuple[Step, ...], where: str) -> Any:
    for step in path:
        obj = _child(obj, step, where)
    return obj


def _update_at(obj: Any, path: tuple[Step, ...], fn: Callable[[Any], Any], where: str) -> Any:
    if not path:
        return fn(obj)
    new = _update_at(_child(obj, path[0], where), path[1:], fn, where)
    return _with_child(obj, path[0], new)


def _clone(obj: Any) -> Any:
    """Copy the tensors of a recorded value, so later in-place ops in the model can't alter it."""
    if isinstance(obj, Tensor):
        return obj.clone()
    if isinstance(obj, (tuple, list)) and not _is_namedtuple(obj):
        return type(obj)(_clone(v) for v in obj) if type(obj) in (tuple, list) else obj
    if type(obj) is dict:
        return {k: _clone(v) for k, v in obj.items()}
    return obj


# ------------------------------------------------------------------- module arguments


def _positional_names(module: nn.Module) -> list[str]:
    names = []
    try:
        params = inspect.signature(module.forward).parameters.values()
    except (TypeError, ValueError):
        return names
    for p in params:
        if p.kind not in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            break
        names.append(p.name)
    return names


def _arg_names(module: nn.Module, args: tuple, kwargs: Mapping) -> list[str]:
    pos = _positional_names(module)
    return [pos[i] if i < len(pos) else str(i) for i in range(len(args))] + list(kwargs)


def _pick_arg(module: nn.Module, args: tuple, kwargs: Mapping, path: tuple, where: str):
    """Which argument an input target means: (("arg", i) | ("kw", name), remaining path)."""
    if not path:
        if len(args) + len(kwargs) == 1:
            return (("arg", 0) if args else ("kw", next(iter(kwargs)))), ()
        raise TargetError(
            f"{where}: the module was called with {len(args) + len(kwargs)} arguments "
            f"{_arg_names(module, args, kwargs)}; pick one with '.input.<index or name>'"
        )
    head, rest = path[0], path[1:]
    if isinstance(head, int):
        if -len(args) <= head < len(args):
            return ("arg", head % len(args)), rest
    elif head in kwargs:
        return ("kw", head), rest
    else:
        pos = _positional_names(module)
        if head in pos and pos.index(head) < len(args):
            return ("arg", pos.index(head)), rest
    raise TargetError(
        f"{where}: the module was not called with argument {head!r}; it got "
        f"{len(args)} positional {_arg_names(module, args, {})} and keywords {list(kwargs)}"
    )


# ---------------------------------------------------------------- per-call dispatch


class _Call:
    """The state of one ``intervene`` call: its sites, what was reached, its records."""

    def __init__(self, sites: list[_Site]):
        self.sites = sites
        self.by_hook: dict[tuple[int, str], list[_Site]] = {}
        for site in sites:
            self.by_hook.setdefault((id(site.module), site.kind), []).append(site)
        self.reached: set[str] = set()
        self.records: dict[str, Any] = {}
        for site in sites:
            for p, key in zip(site.patches, site.keys):
                if key is not None:
                    self.records[key] = [] if isinstance(p, RecordPatch) else None

    def hook_sites(self) -> list[tuple[nn.Module, str]]:
        return [(sites[0].module, kind) for (_, kind), sites in self.by_hook.items()]

    def _apply(self, site: _Site, value: Any, path: tuple[Step, ...]) -> tuple[Any, bool]:
        """Run ``site``'s patches on ``value`` at ``path``: (new value, whether it changed)."""
        self.reached.add(site.name)
        where = f"target {site.name!r}"
        conv = site.conversion
        view = conv.convert(value) if conv is not None else value
        changed = any(not isinstance(p, (ProbePatch, RecordPatch)) for p in site.patches)

        def run(leaf: Any) -> Any:
            for p, key in zip(site.patches, site.keys):
                if isinstance(p, RecordPatch):
                    self.records[key].append(_clone(leaf))
                elif isinstance(p, ProbePatch):
                    self.records[key] = _clone(leaf)
                else:
                    leaf = p.op(leaf, where)
            return leaf

        if not changed:
            run(_get_at(view, path, where))
            return value, False
        view = _update_at(view, path, run, where)
        return (conv.revert(view) if conv is not None else view), True

    def on_output(self, module: nn.Module, output: Any) -> Any:
        changed = False
        for site in self.by_hook.get((id(module), "output"), ()):
            output, ch = self._apply(site, output, site.path)
            changed |= ch
        return output if changed else None

    def on_input(self, module: nn.Module, args: tuple, kwargs: dict) -> Any:
        changed = False
        for site in self.by_hook.get((id(module), "input"), ()):
            (place, key), rest = _pick_arg(module, args, kwargs, site.path, f"target {site.name!r}")
            value = args[key] if place == "arg" else kwargs[key]
            new, ch = self._apply(site, value, rest)
            if ch:
                changed = True
                if place == "arg":
                    args = args[:key] + (new,) + args[key + 1 :]
                else:
                    kwargs = {**kwargs, key: new}
        return (args, kwargs) if changed else None


_ACTIVE: contextvars.ContextVar[Optional[Any]] = contextvars.ContextVar("funcpatch_node_patches", default=None)


def _output_hook(module: nn.Module, args: tuple, output: Any) -> Any:
    call = _ACTIVE.get()
    return None if call is None else call.on_output(module, output)


def _input_hook(module: nn.Module, args: tuple, kwargs: dict) -> Any:
    call = _ACTIVE.get()
    return None if call is None else call.on_input(module, args, kwargs)


_LOCK = threading.Lock()
_REGISTERED: dict[tuple[int, str], list] = {}  # (id(module), kind) -> [module, handle, active calls]


@contextlib.contextmanager
def _active(call: Any, sites: list[tuple[nn.Module, str]]) -> Iterator[None]:
    """Make ``call`` this context's intervention while the shared hooks are registered."""
    held = []
    try:
        with _LOCK:
            for module, kind in sites:
                key = (id(module), kind)
                entry = _REGISTERED.get(key)
                if entry is None:
                    if kind == "output":
                        handle = module.register_forward_hook(_output_hook)
                    else:
                        handle = module.register_forward_pre_hook(_input_hook, with_kwargs=True)
                    entry = _REGISTERED[key] = [module, handle, 0]
                entry[2] += 1
                held.append(key)
        token = _ACTIVE.set(call)
        try:
            yield
        finally:
            _ACTIVE.reset(token)
    finally:
        with _LOCK:
            for key in held:
                entry = _REGISTERED[key]
                entry[2] -= 1
                if entry[2] == 0:
                    entry[1].remove()
                    del _REGISTERED[key]


# ---------------------------------------------------------------------- public API


def intervene(
    model: nn.Module,
    patches: PatchSpec,
    *args: Any,
    forward: Optional[Callable[..., Any]] = None,
    **kwargs: Any,
) -> tuple[Any, dict[str, Any]]:
    """Run ``model(*args, **kwargs)`` with node patches applied; return ``(out, records)``.

    Args:
        model: any ``nn.Module`` (TransformerLens ``HookedTransformer`` /
            ``TransformerBridge`` also accept hook names as targets).
        patches: ``{target: patch or [patch, ...]}``. Patches at one target apply in list
            order (a ``ProbePatch`` before a ``ZeroPatch`` sees the unzeroed value);
            targets apply in dict order where several share one activation. See the
            module docstring for target syntax.
        *args, **kwargs: the model's inputs.
        forward: optional callable run as ``forward(*args, **kwargs)`` instead of
            ``model(...)`` (e.g. ``torch.func.functional_call`` of the same model, or an
            edge-patched forward); the patches apply to ``model``'s modules it runs.

    Returns:
        ``out``: what the forward returned. ``records``: for each ``ProbePatch`` its
        target's last value (None if never reached), for each ``RecordPatch`` the list
        of every value in call order; keyed by target, or ``"{target}#{i}"`` (``i`` = the
        patch's index in the target's list) when one target holds several of them.

    Raises:
        TargetError: unknown target (with close matches), a container path that does not
            fit, or a modifying patch whose target the forward never reached.
        PatchError: bad slice or value (before running where it can be known, else when
            the target is reached, naming it).

    The model is left exactly as it was (no hooks stay registered, also on error); safe
    to call from several threads at once; composes with ``torch.func.grad``/``vmap``
    (e.g. ``grad`` w.r.t. an ``AddPatch`` value, ``vmap`` over patch values).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    call = _Call(_sites(model, patches))
    with _active(call, call.hook_sites()):
        out = (model if forward is None else forward)(*args, **kwargs)
    missed = [
        s.name
        for s in call.sites
        if s.name not in call.reached and not all(isinstance(p, (ProbePatch, RecordPatch)) for p in s.patches)
    ]
    if missed:
        raise TargetError(
            f"targets {missed} were never reached during the forward pass, so their "
            f"patches did not apply; funcpatch.targets(model, *inputs) lists reachable targets"
        )
    return out, call.records


class _Listing:
    """A call that applies nothing and notes every target reached, with its shape."""

    def __init__(self, model: nn.Module):
        self.found: dict[str, Optional[torch.Size]] = {}
        hooks = _hook_points(model)
        self.hook_names: dict[int, list[str]] = {}
        self.conversions: dict[int, Any] = {}
        for name, hook in hooks.items():
            self.hook_names.setdefault(id(hook), []).append(name)
            self.conversions[id(hook)] = getattr(hook, "hook_conversion", None)
        self.paths: dict[int, str] = {}
        self.modules: dict[int, nn.Module] = {}
        for path, module in model.named_modules(remove_duplicate=False):
            best = self.paths.get(id(module))
            if best is None or (path.count("."), len(path)) < (best.count("."), len(best)):
                self.paths[id(module)] = path
                self.modules[id(module)] = module

    def hook_sites(self) -> list[tuple[nn.Module, str]]:
        sites = []
        for key, module in self.modules.items():
            sites.append((module, "output"))
            if key not in self.hook_names:
                sites.append((module, "input"))
        return sites

    def _note(self, prefix: str, value: Any, depth: int = 0) -> None:
        if isinstance(value, Tensor):
            self.found.setdefault(prefix, value.shape)
            return
        children = _children(value)
        if children is None or depth > 4:
            return
        self.found.setdefault(prefix, None)
        for step, child in children:
            self._note(f"{prefix}.{step}", child, depth + 1)

    def on_output(self, module: nn.Module, output: Any) -> None:
        if id(module) in self.hook_names:
            conv = self.conversions[id(module)]
            value = conv.convert(output) if conv is not None else output
            for name in self.hook_names[id(module)]:
                self._note(name, value)
        elif id(module) in self.paths:
            path = self.paths[id(module)]
            self._note(f"{path}.output" if path else "output", output)

    def on_input(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if id(module) in self.hook_names or id(module) not in self.paths:
            return  # hook points are listed by hook name
        path = self.paths[id(module)]
        prefix = f"{path}.input" if path else "input"
        if len(args) + len(kwargs) == 1:
            self._note(prefix, args[0] if args else next(iter(kwargs.values())))
            return
        values = list(args) + list(kwargs.values())
        for name, value in zip(_arg_names(module, args, kwargs), values):
            self._note(f"{prefix}.{name}", value)


def targets(model: nn.Module, *args: Any, **kwargs: Any) -> dict[str, Optional[torch.Size]]:
    """Every target reached by ``model(*args, **kwargs)``, in the order first reached.

    Runs the model once with recording hooks (removed afterwards). Maps each target to
    the shape of its value (the first time it is reached), or to ``None`` for a
    container (tuple, dict, ModelOutput ...) whose elements are listed after it as
    ``"{target}.{index or key}"``. TransformerLens hook points are listed by hook name
    (all aliases); other modules by their shortest path, as ``"{path}.input"`` /
    ``"{path}.output"`` (``.input.{name}`` when a module got several arguments).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    listing = _Listing(model)
    with _active(listing, listing.hook_sites()), torch.no_grad():
        model(*args, **kwargs)
    return listing.found
