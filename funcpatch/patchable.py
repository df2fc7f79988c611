"""``patchable``: a model paired with its patching graph. Building one changes nothing."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional, Tuple, Union

from torch import nn

from funcpatch.backends import Backend, MicroBackend, TransformersBackend, backend_for
from funcpatch.decoder import decoder_forward_for
from funcpatch.devices import check_not_offloaded, check_one_device
from funcpatch.forward import PatchForward
from funcpatch.graph import Graph, build_graph, micro_nodes, transformer_nodes
from funcpatch.hook_forward import HookForward
from funcpatch.own_forward import OwnForward
from funcpatch.runtime import activated

OutputSlice = Optional[Literal["last_seq", "not_first_seq"]]
OUTPUT_SLICES = (None, "last_seq", "not_first_seq")


@dataclass(frozen=True, eq=False)
class PatchableModel:
    """A model and the graph it is patched on. Immutable; the model is never modified.

    Attributes:
        model: the wrapped model (run it directly for an unpatched forward).
        graph: sources, destinations and edges.
        out_slice: index that selects the task's outputs from the model's output
            (``(slice(None), -1)`` for ``slice_output="last_seq"``).
        slice_output: the name it was built from.
        separate_qkv: whether attention destinations are split into Q, K and V.
        grouped_kv: one K and one V destination per key/value head (grouped-query attention).
        forward: how the model runs (:class:`funcpatch.forward.PatchForward`), chosen once:
            funcpatch's own forward where it covers the model, else the hooks.
    """

    model: nn.Module
    graph: Graph
    backend: Backend
    out_slice: Tuple[Union[slice, int], ...]
    slice_output: OutputSlice
    separate_qkv: Optional[bool]
    hook_flags: Tuple[str, ...]
    node_module_names: Tuple[str, ...]
    forward: PatchForward
    grouped_kv: bool = False

    # Conveniences mirroring the seed library's PatchableModel.
    @property
    def srcs(self):
        return self.graph.srcs

    @property
    def dests(self):
        return self.graph.dests

    @property
    def edges(self):
        return self.graph.edges

    @property
    def n_edges(self) -> int:
        return self.graph.n_edges

    @property
    def seq_len(self) -> Optional[int]:
        return self.graph.seq_len

    @property
    def is_factorized(self) -> bool:
        return self.graph.factorized

    @property
    def is_transformer(self) -> bool:
        return self.backend.is_transformer

    def __call__(self, *args, **kwargs):
        """The unpatched forward (logits for a transformers model given directly)."""
        return self.forward.plain(self, args, kwargs)

    def __repr__(self) -> str:
        g = self.graph
        return (f"PatchableModel({self.backend.name}, {type(self.forward).__name__}, "
                f"{'factorized' if g.factorized else 'residual'}, "
                f"srcs={len(g.srcs)}, dests={len(g.dests)}, edges={g.n_edges}, seq_len={g.seq_len})")


def _hook_flags(factorized: bool, separate_qkv: bool, attn_only: bool) -> Tuple[str, ...]:
    flags = ["use_attn_result"]
    if factorized:
        flags.append("use_split_qkv_input" if separate_qkv else "use_attn_in")
        if not attn_only:
            flags.append("use_hook_mlp_in")
    return tuple(flags)


def patchable(model: nn.Module, *, factorized: bool = True, separate_qkv: Optional[bool] = None,
              seq_len: Optional[int] = None, slice_output: OutputSlice = None, grouped_kv: bool = False,
              lean: bool = True) -> PatchableModel:
    """Pair ``model`` with its patching graph (the model itself is left untouched).

    Args:
        model: a transformers causal LM (GPT-2, GPT-NeoX/Pythia, Llama, Mistral,
            Qwen2/2.5, Qwen3, Gemma-2), its TransformerLens ``TransformerBridge`` (see
            :func:`funcpatch.models.from_hf`), a TransformerLens 3.x ``HookedTransformer``
            or a :class:`funcpatch.MicroModel`.
        factorized: every source feeds every later destination (edge patching); False
            gives the residual graph, where sources feed only the next residual.
        separate_qkv: split each head's input into Q, K and V destinations
            (transformers; default True).
        seq_len: make edges token-specific: each edge exists once per position.
        slice_output: None, "last_seq" or "not_first_seq": the outputs a task scores.
        grouped_kv: for grouped-query attention, one K and one V destination per
            key/value head (``A{l}.kv{g}.K/V``) instead of one per query head
            (``A{l}.{h}.K/V``, the default: MIB's and EAP-IG's graph).
        lean: run through funcpatch's own forward (:mod:`funcpatch.decoder`) where it
            covers the architecture: equal to the model's, about twice as fast as a
            bridge's hooks. False forces the hook path (bridges and HookedTransformer).
    """
    if slice_output not in OUTPUT_SLICES:
        raise ValueError(f"unknown slice_output {slice_output!r}; valid: {list(OUTPUT_SLICES)}")
    if seq_len is not None and (not isinstance(seq_len, int) or seq_len < 1):
        raise ValueError(f"seq_len must be a positive int or None, got {seq_len!r}")
    backend = backend_for(model)
    shape = backend.shape(model)
    check_not_offloaded(model)
    own = None
    if isinstance(backend, MicroBackend):
        if separate_qkv:
            raise ValueError("separate_qkv applies to transformers; MicroModel has no Q/K/V inputs")
        if grouped_kv:
            raise ValueError("grouped_kv applies to transformers with grouped-query attention, not MicroModel")
        srcs, dests = micro_nodes(shape.n_layers, factorized=factorized)
        flags: Tuple[str, ...] = ()
    else:
        separate_qkv = True if separate_qkv is None else bool(separate_qkv)
        own = decoder_forward_for(model, grouped_kv) if lean or isinstance(backend, TransformersBackend) else None
        grouped = shape.n_key_value_heads not in (None, shape.n_heads)
        if (grouped or grouped_kv) and own is None:
            raise ValueError(f"{type(model).__name__}: grouped-query attention ({shape.n_heads} query heads, "
                             f"{shape.n_key_value_heads} key/value heads) and grouped_kv need funcpatch's own forward, "
                             "which covers transformers models of the families GPT-2, GPT-NeoX, Llama, Mistral, "
                             "Qwen2, Qwen3, Gemma-2 (given directly or as a TransformerBridge, with lean=True)")
        if isinstance(backend, TransformersBackend) and own is None:
            raise ValueError(f"funcpatch has no forward of its own for {type(model).__name__} and a bare transformers "
                             "model has no hooks; wrap it with fp.models.from_hf to patch it through the bridge's hooks")
        srcs, dests = transformer_nodes(shape.n_layers, shape.n_heads, factorized=factorized,
                                        separate_qkv=separate_qkv, attn_only=shape.attn_only,
                                        parallel_attn_mlp=shape.parallel_attn_mlp,
                                        n_kv_heads=shape.n_key_value_heads, grouped_kv=grouped_kv)
        flags = _hook_flags(factorized, separate_qkv, shape.attn_only)
    graph = build_graph(srcs, dests, factorized, seq_len)
    names = [n.module_name for n in graph.srcs] + [n.module_name for n in graph.dests]
    names = tuple(dict.fromkeys(names + [c for c in map(backend.carry_to, names) if c]))
    out_slice: Tuple = (slice(None),) if slice_output is None else (
        (slice(None), -1) if slice_output == "last_seq" else (slice(None), slice(1, None)))
    # the hook path: the model's own forward, or the fallback for calls the own forward does not take
    hooks = None if isinstance(backend, TransformersBackend) or shape.n_key_value_heads not in (None, shape.n_heads) \
        else HookForward()
    if own is None:
        check_one_device(model, "the hook path (TransformerLens hooks on the model's modules)")
    forward = hooks if own is None else OwnForward(own, hooks)
    pm = PatchableModel(model, graph, backend, out_slice, slice_output, separate_qkv, flags, names, forward,
                        bool(grouped_kv))
    if hooks is not None:
        with activated(pm):  # fail now, clearly, if the model lacks a hook the graph needs
            pass
    return pm
