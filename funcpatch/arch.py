"""What a decoder-only transformer computes, read from a transformers model (or the
transformers model inside a TransformerLens ``TransformerBridge``): the architecture
description that drives funcpatch's own forward (:mod:`funcpatch.decoder`), and where
each of its weights lives.

Supported families (``config.model_type``): ``gpt2``, ``gpt_neox`` (Pythia), ``llama``
(Llama 1/2/3, any rope scaling transformers implements), ``mistral``, ``qwen2``,
``qwen3``, ``gemma2``. Everything the forward needs is read once here; nothing is
copied: weights are looked up on every call (:meth:`WeightRefs.tensors`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Mapping, Optional, Tuple

import torch
from torch import nn

SUPPORTED = ("gpt2", "gpt_neox", "llama", "mistral", "qwen2", "qwen3", "gemma2")


@dataclass(frozen=True)
class DecoderArch:
    """A decoder's computation, per family (see the module docstring).

    Attributes:
        norm: ``"layer"`` (LayerNorm with bias), ``"rms"`` (``w * x / rms(x)``) or
            ``"rms_offset"`` (Gemma: ``(1 + w) * x / rms(x)``).
        post_norms: Gemma-2's sandwich: each sublayer's output is normalized again
            before it joins the residual.
        positions: ``"learned"`` (an embedding added to the tokens) or ``"rotary"``.
        rotary_dims: how many of each head's dims rotate (GPT-NeoX: a fraction).
        qk_norm: Qwen3: an RMSNorm over each head's query and key.
        scales: per layer, the factor on ``q . k``.
        softcap: attention logits ``cap * tanh(s / cap)`` (Gemma-2), or None.
        final_softcap: the same on the output logits.
        windows: per layer, the sliding window (a query sees keys ``q - w < k <= q``) or None.
        gated_mlp: ``down(act(gate(x)) * up(x))`` rather than ``down(act(up(x)))``.
        parallel: attention and MLP read the same residual (GPT-NeoX, GPT-J style).
        embed_scale: the token embedding is multiplied by this (Gemma: sqrt(d_model)).
    """

    model_type: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_model: int
    d_head: int
    norm: str
    eps: float
    post_norms: bool
    positions: str
    rotary_dims: int
    qk_norm: bool
    scales: Tuple[float, ...]
    softcap: Optional[float]
    final_softcap: Optional[float]
    windows: Tuple[Optional[int], ...]
    gated_mlp: bool
    parallel: bool
    embed_scale: Optional[float]


class UnsupportedArchitecture(ValueError):
    """funcpatch's own forward does not cover this model."""


def _unwrap(m: nn.Module) -> nn.Module:
    """The transformers module inside a TransformerLens bridge wrapper (or ``m`` itself)."""
    return getattr(m, "original_component", None) or m


def _get(root: nn.Module, path: str) -> Optional[nn.Module]:
    """``root.<path>``, unwrapping bridge wrappers at every step; None if absent."""
    m = _unwrap(root)
    for part in path.split("."):
        m = getattr(m, part, None)
        if m is None:
            return None
        m = _unwrap(m)
    return m


def transformers_model(model: nn.Module) -> Optional[nn.Module]:
    """The transformers causal LM that ``model`` is or wraps (a bridge's ``original_model``)."""
    hf = getattr(model, "original_model", model)
    config = getattr(hf, "config", None)
    return hf if config is not None and hasattr(config, "model_type") and hasattr(config, "vocab_size") else None


def _attn_scale(cfg, d_head: int, layer: int) -> float:
    t = cfg.model_type
    if t == "gemma2":
        return cfg.query_pre_attn_scalar ** -0.5
    if t == "gpt2":
        s = d_head ** -0.5 if getattr(cfg, "scale_attn_weights", True) else 1.0
        return s / (layer + 1) if getattr(cfg, "scale_attn_by_inverse_layer_idx", False) else s
    return d_head ** -0.5


def _windows(cfg, n_layers: int) -> Tuple[Optional[int], ...]:
    window = getattr(cfg, "sliding_window", None)
    types = getattr(cfg, "layer_types", None)
    if types is not None:  # Gemma-2, Qwen2/3: per layer
        return tuple(window if t == "sliding_attention" else None for t in types[:n_layers])
    if cfg.model_type == "mistral":  # every layer, when set
        return (window,) * n_layers
    return (None,) * n_layers


def read_arch(model: nn.Module) -> DecoderArch:
    """The :class:`DecoderArch` of a transformers causal LM or its bridge.

    Raises :class:`UnsupportedArchitecture` naming the reason and the supported families.
    """
    hf = transformers_model(model)
    if hf is None:
        raise UnsupportedArchitecture(f"{type(model).__name__} is not a transformers causal LM or its bridge")
    cfg = hf.config
    t = cfg.model_type
    if t not in SUPPORTED:
        raise UnsupportedArchitecture(f"model_type {t!r} has no funcpatch forward; supported: {list(SUPPORTED)}")
    if t == "gpt2":
        if getattr(cfg, "reorder_and_upcast_attn", False) or getattr(cfg, "add_cross_attention", False):
            raise UnsupportedArchitecture("GPT-2 with reorder_and_upcast_attn or cross attention is not supported")
        n_layers, n_heads, d = cfg.n_layer, cfg.n_head, cfg.n_embd
        n_kv, d_head = n_heads, d // n_heads
    else:
        n_layers, n_heads, d = cfg.num_hidden_layers, cfg.num_attention_heads, cfg.hidden_size
        n_kv = getattr(cfg, "num_key_value_heads", None) or n_heads
        d_head = getattr(cfg, "head_dim", None) or d // n_heads
    if n_heads % n_kv:
        raise UnsupportedArchitecture(f"{n_heads} query heads cannot share {n_kv} key/value heads evenly")
    norm = {"gpt2": "layer", "gpt_neox": "layer", "gemma2": "rms_offset"}.get(t, "rms")
    eps = {"gpt2": "layer_norm_epsilon", "gpt_neox": "layer_norm_eps"}.get(t, "rms_norm_eps")
    rotary_dims = 0
    if t != "gpt2":
        rope = getattr(cfg, "rope_parameters", None) or {}
        factor = rope.get("partial_rotary_factor", getattr(cfg, "partial_rotary_factor", None) or
                          getattr(cfg, "rotary_pct", None) or 1.0)
        rotary_dims = int(d_head * factor)
    return DecoderArch(
        model_type=t, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv, d_model=d, d_head=d_head,
        norm=norm, eps=float(getattr(cfg, eps)), post_norms=t == "gemma2",
        positions="learned" if t == "gpt2" else "rotary", rotary_dims=rotary_dims, qk_norm=t == "qwen3",
        scales=tuple(_attn_scale(cfg, d_head, i) for i in range(n_layers)),
        softcap=getattr(cfg, "attn_logit_softcapping", None) if t == "gemma2" else None,
        final_softcap=getattr(cfg, "final_logit_softcapping", None) if t == "gemma2" else None,
        windows=_windows(cfg, n_layers), gated_mlp=t not in ("gpt2", "gpt_neox"),
        parallel=t == "gpt_neox" and bool(getattr(cfg, "use_parallel_residual", True)),
        embed_scale=float(d) ** 0.5 if t == "gemma2" else None,
    )


# ---------------------------------------------------------------------------------------
# Where the weights live. Every key maps to (module, attribute, view): the view turns the
# stored tensor into the canonical layout (``nn.Linear``'s ``[out, in]``; Q/K/V split).

Ref = Tuple[nn.Module, str, Optional[Callable[[torch.Tensor], torch.Tensor]]]

# per family: embeddings, final norm, layer, attention, MLP and norms, by transformers names
_PATHS = {
    "gpt2": dict(embed="transformer.wte", pos="transformer.wpe", final="transformer.ln_f",
                 layers="transformer.h", attn="attn", ln1="ln_1", ln2="ln_2", o="c_proj", fused_qkv="c_attn",
                 up="mlp.c_fc", down="mlp.c_proj"),
    "gpt_neox": dict(embed="gpt_neox.embed_in", final="gpt_neox.final_layer_norm", layers="gpt_neox.layers",
                     attn="attention", ln1="input_layernorm", ln2="post_attention_layernorm", o="dense",
                     fused_qkv="query_key_value", up="mlp.dense_h_to_4h", down="mlp.dense_4h_to_h",
                     rotary="gpt_neox.rotary_emb"),
    "llama": dict(embed="model.embed_tokens", final="model.norm", layers="model.layers", attn="self_attn",
                  ln1="input_layernorm", ln2="post_attention_layernorm", o="o_proj", q="q_proj", k="k_proj",
                  v="v_proj", up="mlp.up_proj", gate="mlp.gate_proj", down="mlp.down_proj", rotary="model.rotary_emb"),
}
_PATHS["mistral"] = _PATHS["qwen2"] = _PATHS["llama"]
_PATHS["qwen3"] = dict(_PATHS["llama"], q_norm="q_norm", k_norm="k_norm")
_PATHS["gemma2"] = dict(_PATHS["llama"], ln2="pre_feedforward_layernorm", post1="post_attention_layernorm",
                        post2="post_feedforward_layernorm")


def _linear(module: nn.Module) -> Optional[Callable]:
    """transformers' GPT-2 ``Conv1D`` stores ``[in, out]``: viewed as ``[out, in]``."""
    return (lambda w: w.t()) if type(module).__name__ == "Conv1D" else None


def _add(refs: Dict[str, Ref], key: str, module: Optional[nn.Module]) -> None:
    if module is None:
        refs[key + ".w"] = (None, "weight", None)  # reported as missing
        return
    refs[key + ".w"] = (module, "weight", _linear(module))
    if getattr(module, "bias", None) is not None:
        refs[key + ".b"] = (module, "bias", None)


def _fused_qkv(refs: Dict[str, Ref], i: int, module: nn.Module, arch: DecoderArch) -> None:
    """Q, K, V rows of one fused projection: GPT-2 ``[q | k | v]``, GPT-NeoX per head ``[h, (q k v), dh]``."""
    H, dh = arch.n_heads, arch.d_head
    conv = _linear(module)

    def part(j: int, t: torch.Tensor) -> torch.Tensor:
        t = conv(t) if conv is not None and t.dim() == 2 else t  # [3 * H * dh, (in)]
        if arch.model_type == "gpt_neox":
            return t.reshape(H, 3, dh, *t.shape[1:])[:, j].reshape(H * dh, *t.shape[1:])
        return t.reshape(3, H * dh, *t.shape[1:])[j]

    for j, x in enumerate("qkv"):
        refs[f"{i}.{x}.w"] = (module, "weight", lambda t, j=j: part(j, t))
        if getattr(module, "bias", None) is not None:
            refs[f"{i}.{x}.b"] = (module, "bias", lambda t, j=j: part(j, t))


def weight_refs(model: nn.Module, arch: DecoderArch) -> Tuple[Dict[str, Ref], list, Optional[nn.Module]]:
    """``(refs, activations, rotary)``: canonical key -> :data:`Ref`, each layer's MLP
    activation module, and the model's rotary-embedding module (None for learned positions).

    Keys: ``embed``, ``pos``, ``final.w/b``, ``unembed.w/b``; per layer ``i``:
    ``{i}.{q,k,v,o}.w/b`` (``[out, in]``), ``{i}.{ln1,ln2,post1,post2,q_norm,k_norm}.w/b``,
    ``{i}.{up,gate,down}.w/b``. A TransformerLens bridge splits fused Q/K/V projections
    into ``q``/``k``/``v`` modules; those are read where present (the bridge runs them).
    """
    hf = transformers_model(model)
    p = _PATHS[arch.model_type]
    refs: Dict[str, Ref] = {}
    refs["embed"] = (_get(hf, p["embed"]), "weight", None)
    if "pos" in p:
        refs["pos"] = (_get(hf, p["pos"]), "weight", None)
    _add(refs, "final", _get(hf, p["final"]))
    _add(refs, "unembed", _get(hf, p.get("unembed", "lm_head")))
    layers = _get(hf, p["layers"])
    acts = []
    for i in range(arch.n_layers):
        layer = _unwrap(layers[i])
        wrapper = getattr(layer, p["attn"])
        attn = _unwrap(wrapper)
        if wrapper is not attn and all(hasattr(wrapper, x) for x in "qkvo"):  # a bridge: the Q/K/V/O it runs
            qkv, o = [_unwrap(getattr(wrapper, x)) for x in "qkv"], _unwrap(getattr(wrapper, "o"))
        else:
            qkv, o = [_get(attn, p[x]) if x in p else None for x in "qkv"], _get(attn, p["o"])
        if None in qkv:
            _fused_qkv(refs, i, _get(attn, p["fused_qkv"]), arch)
        else:
            for x, m in zip("qkv", qkv):
                _add(refs, f"{i}.{x}", m)
        _add(refs, f"{i}.o", o)
        for key in ("ln1", "ln2", "post1", "post2"):
            if key in p:
                _add(refs, f"{i}.{key}", _get(layer, p[key]))
        for key in ("q_norm", "k_norm"):
            if key in p:
                _add(refs, f"{i}.{key}", _get(attn, p[key]))
        for key in ("up", "gate", "down"):
            if key in p:
                _add(refs, f"{i}.{key}", _get(layer, p[key]))
        mlp = _get(layer, "mlp")
        acts.append(getattr(mlp, "act", None) or getattr(mlp, "act_fn", None))
    missing = [k for k, (m, _, _) in refs.items() if m is None]
    if missing or any(a is None for a in acts):
        raise UnsupportedArchitecture(f"{type(hf).__name__}: could not find {missing or 'the MLP activation'}")
    rotary = _get(hf, p["rotary"]) if arch.positions == "rotary" else None
    return refs, acts, rotary


def alias_names(model: nn.Module) -> Dict[int, Tuple[str, ...]]:
    """id(tensor) -> every name under which ``model`` exposes it (tied weights, wrappers)."""
    names: Dict[int, list] = {}
    for n, t in list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False)):
        names.setdefault(id(t), []).append(n)
    return {k: tuple(v) for k, v in names.items()}


def resolve(model: nn.Module, refs: Mapping[str, Ref],
            params: Optional[Mapping[str, torch.Tensor]] = None) -> Dict[str, torch.Tensor]:
    """The weights by canonical key: from ``params`` (``model``'s parameter/buffer names,
    any alias of a tensor) where given, else the model's own, each in canonical layout."""
    aliases = alias_names(model) if params else {}
    out = {}
    for key, (module, attr, view) in refs.items():
        t = getattr(module, attr)
        if t is None:
            continue
        if params:
            given = [params[n] for n in aliases.get(id(t), ()) if n in params]
            if given:
                t = given[0]
        out[key] = t if view is None else view(t)
    return out
