"""A lean forward for GPT-2 ``TransformerBridge``s: the hook path's computation, written
directly over the block weights in per-head layout.

Patching needs per-head inputs (Q/K/V) and per-head outputs (each head's contribution to
the residual). The bridge provides them through hook flags, but its per-head path costs
about twice its plain forward (forked residual copies, per-head einsums and hook
wrappers around every submodule). Here the same computation runs as plain tensor code:
one layer norm over all Q/K/V inputs of a layer, one batched matmul for their
projections, one for the per-head results. At every node hook point it hands the
activation to the call's visitor by hook name, exactly where the bridge's hook would
fire, in source-major layout (``[heads, batch, pos, d]``; the visitors that patch and
record are in :mod:`funcpatch.forward`). It can also resume from a checkpoint of a
clean forward and compute only the last positions of the last block (ACDC uses both).

It is used when the model qualifies (a GPT-2 bridge in eval mode, not in compatibility
mode) and the call is one this module understands (token ids, optional
``attention_mask``, ``logits_to_keep`` and ``return_type="logits"``); otherwise the
hook path runs. ``fp.patchable(model, lean=False)`` forces the hook path. Equality with
the hook path (outputs and gradients, all graph kinds) is tested in
``tests/test_lean.py``.

The forward is pure: weights are looked up per call, from ``params`` where given (the
same names as ``model.named_parameters()``/``named_buffers()``, aliases included) and
from the model otherwise; nothing is stored on any module.
"""

from __future__ import annotations

from typing import Dict, Mapping, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn


def _alias_names(model: nn.Module) -> Dict[int, Tuple[str, ...]]:
    """id(tensor) -> every name under which the model exposes it (tied weights, wrappers)."""
    names: Dict[int, list] = {}
    for n, t in list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False)):
        names.setdefault(id(t), []).append(n)
    return {k: tuple(v) for k, v in names.items()}


class LeanGPT2:
    """The per-head forward of a GPT-2 bridge (see the module docstring).

    ``bind(args, kwargs, params)`` checks a call and returns ``run(visitor) -> logits``;
    see :meth:`forward` for what the visitor sees.
    """

    def __init__(self, bridge: nn.Module):
        hf = bridge.original_model
        cfg = hf.config
        self.model = bridge
        self.n_layers, self.n_heads = cfg.n_layer, cfg.n_head
        self.d_head = cfg.n_embd // cfg.n_head
        self.eps = cfg.layer_norm_epsilon
        self.inverse_layer_scale = bool(cfg.scale_attn_by_inverse_layer_idx)
        t = hf.transformer
        self.acts = [_one_kernel(blk.mlp.act) for blk in t.h]
        # canonical key -> (module, attribute): looked up on every call, so the forward sees
        # the model's current weights; bridge wrappers expose the wrapped module as
        # ``original_component``
        def inner(m):
            return getattr(m, "original_component", None) or m

        src = {"wte": (inner(t.wte), "weight"), "wpe": (inner(t.wpe), "weight"),
               "ln_f.w": (inner(t.ln_f), "weight"), "ln_f.b": (inner(t.ln_f), "bias"),
               "unembed.w": (inner(hf.lm_head), "weight"), "unembed.b": (inner(hf.lm_head), "bias")}
        for i, blk in enumerate(bridge.blocks):
            for x in "qkv":  # nn.Linear: [out, in]
                src[f"{i}.{x}.w"], src[f"{i}.{x}.b"] = (inner(getattr(blk.attn, x)), "weight"), \
                    (inner(getattr(blk.attn, x)), "bias")
            hblk = t.h[i]
            for key, mod in (("o", blk.attn.o), ("ln1", hblk.ln_1), ("ln2", hblk.ln_2), ("fc", hblk.mlp.c_fc),
                             ("proj", hblk.mlp.c_proj)):  # o, fc, proj: Conv1D [in, out]
                src[f"{i}.{key}.w"], src[f"{i}.{key}.b"] = (inner(mod), "weight"), (inner(mod), "bias")
        self.sources = src

    def weights(self, params: Optional[Mapping[str, torch.Tensor]] = None) -> Dict[str, torch.Tensor]:
        """The weights by canonical key: ``params`` (model parameter/buffer names, any alias
        of a tensor) where given, else the model's own."""
        w = {k: getattr(m, a) for k, (m, a) in self.sources.items()}
        w = {k: v for k, v in w.items() if v is not None}
        if params:
            aliases = _alias_names(self.model)
            for k, v in list(w.items()):
                given = [params[n] for n in aliases.get(id(v), ()) if n in params]
                if given:
                    w[k] = given[0]
        return w

    @staticmethod
    def qualifies(bridge: nn.Module) -> bool:
        hf = getattr(bridge, "original_model", None)
        cfg = getattr(hf, "config", None)
        return (type(hf).__name__ == "GPT2LMHeadModel" and not getattr(bridge, "compatibility_mode", True)
                and not getattr(cfg, "reorder_and_upcast_attn", False) and not getattr(cfg, "add_cross_attention", False)
                and hasattr(bridge, "blocks") and len(bridge.blocks) == cfg.n_layer)

    def bind(self, args, kwargs, params: Optional[Mapping[str, torch.Tensor]], resume=None):
        """``run(visitor) -> logits`` for this call, or None when the call is not one this
        forward reproduces (then the hook path runs)."""
        if self.model.training or len(args) != 1 or not isinstance(args[0], torch.Tensor):
            return None
        tokens = args[0]
        if tokens.dtype not in (torch.long, torch.int) or tokens.dim() != 2:
            return None
        kwargs = dict(kwargs)
        attention_mask = kwargs.pop("attention_mask", None)
        keep = kwargs.pop("logits_to_keep", 0)
        if kwargs.pop("return_type", "logits") != "logits" or kwargs or not isinstance(keep, int):
            return None
        w = self.weights(params)
        return lambda visitor: self.forward(w, tokens, visitor, attention_mask, keep, resume)

    def forward(self, w: Mapping[str, torch.Tensor], tokens: torch.Tensor, visitor,
                attention_mask: Optional[torch.Tensor] = None, logits_to_keep: int = 0,
                resume: Optional[Tuple[Tuple[int, int], torch.Tensor]] = None) -> torch.Tensor:
        """Logits ``[batch, pos, vocab]`` (the last ``logits_to_keep`` positions if > 0).

        ``visitor`` sees the nodes in source-major layout: ``visitor.src(hook, out)``
        with ``out [k, batch, pos, d]`` (k heads, or 1) and ``visitor.dest(hooks, x)``
        with the residual ``x [batch, pos, d]`` read by destinations ``hooks``, which
        returns their patched inputs ``[heads_total, batch, pos, d]`` or None (unpatched).
        A visitor with ``checkpoint(point, resid)`` also sees the residual at each point
        a forward can resume from: ``(i, 0)`` entering block ``i``, ``(i, 1)`` entering
        its MLP, ``(n_layers, 0)`` after the last block (before its output node).
        With ``logits_to_keep`` and a visitor whose ``narrow(k)`` returns True, everything
        after the last block's attention runs on the last ``k`` positions only (nothing
        there reads other positions); the visitor then sees ``pos = k``.

        ``resume=(point, resid)`` starts at ``point`` from the residual there (the visitor
        must already hold the sources before it); nothing before it runs.
        """
        p = tokens.shape[1]
        (start, stage), resid = resume or ((0, 0), None)
        if resid is None:
            pos = _positions(attention_mask, p, tokens.device)
            resid = _node(visitor, "blocks.0.hook_resid_pre", F.embedding(tokens, w["wte"]) + F.embedding(pos, w["wpe"]))
        add_mask = _additive_mask(attention_mask, p, resid.dtype)
        checkpoint = getattr(visitor, "checkpoint", None)
        for i in range(start, self.n_layers):
            pre = f"blocks.{i}."
            tail = logits_to_keep if i == self.n_layers - 1 and 0 < logits_to_keep < p else 0
            if i > start or stage == 0:
                if checkpoint is not None:
                    checkpoint((i, 0), resid)
                attn = self._attention(w, i, resid, visitor, add_mask, tail)
                if attn.shape[1] < resid.shape[1]:
                    resid = resid[:, -tail:]
                resid = _node(visitor, pre + "hook_resid_mid", resid + attn)
            elif tail and visitor.narrow(tail):  # resumed at the last block's MLP
                resid = resid[:, -tail:]
            if checkpoint is not None:
                checkpoint((i, 1), resid)
            x = visitor.dest([pre + "hook_mlp_in"], resid)
            x = resid if x is None else x[0]
            x = F.layer_norm(x, x.shape[-1:], w[f"{i}.ln2.w"], w[f"{i}.ln2.b"], self.eps)
            x = torch.addmm(w[f"{i}.fc.b"], x.reshape(-1, x.shape[-1]), w[f"{i}.fc.w"])
            x = torch.addmm(w[f"{i}.proj.b"], self.acts[i](x), w[f"{i}.proj.w"]).view_as(resid)
            visitor.src(pre + "hook_mlp_out", x.unsqueeze(0))
            resid = resid + x
            if checkpoint is not None and i == self.n_layers - 1:
                checkpoint((self.n_layers, 0), resid)
            resid = _node(visitor, pre + "hook_resid_post", resid)
        if start == self.n_layers:  # resumed after the last block: only its output node runs
            if 0 < logits_to_keep < p and visitor.narrow(logits_to_keep):
                resid = resid[:, -logits_to_keep:]
            resid = _node(visitor, f"blocks.{self.n_layers - 1}.hook_resid_post", resid)
        if logits_to_keep > 0:
            resid = resid[:, -logits_to_keep:]  # (already so when the visitor narrowed)
        x = F.layer_norm(resid, resid.shape[-1:], w["ln_f.w"], w["ln_f.b"], self.eps)
        return F.linear(x, w["unembed.w"], w.get("unembed.b"))

    def qkv_weights(self, w: Mapping[str, torch.Tensor], i: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """Block ``i``'s joined Q, K, V projection ``[3 * d, d]`` (as ``nn.Linear``) and bias
        ``[3 * d]``: rows in slot order (Q of each head, then K, then V)."""
        return torch.cat([w[f"{i}.{x}.w"] for x in "qkv"]), torch.cat([w[f"{i}.{x}.b"] for x in "qkv"])

    def _attention(self, w, i: int, resid: torch.Tensor, visitor, add_mask, tail: int = 0) -> torch.Tensor:
        """Attention block ``i``'s output ``[batch, pos, d]`` (per-head results go to the visitor);
        with ``tail`` and a visitor that narrows, the last ``tail`` query positions only."""
        b, p, d = resid.shape
        H, dh = self.n_heads, self.d_head
        pre = f"blocks.{i}."
        w_qkv, b_qkv = self.qkv_weights(w, i)  # [3d, d], [3d]: the Q, K, V slots of every head, in order
        ln = (w[f"{i}.ln1.w"], w[f"{i}.ln1.b"], self.eps)
        got = visitor.dest_slots([pre + f"hook_{n}_input" for n in "qkv"], resid)  # each its own copy
        if got is not None:
            w_in, b_in = w_qkv.view(3 * H, dh, d).transpose(1, 2), b_qkv.view(3 * H, 1, dh)  # per slot
            slots, x = got
            if slots is None:
                qkv = _project_per_head(x, ln, w_in, b_in)  # [3H, b, p, dh]
            else:  # only some slots are patched: the others project the residual itself
                qkv = F.linear(F.layer_norm(resid, (d,), *ln), w_qkv, b_qkv).view(b, p, 3 * H, dh).permute(2, 0, 1, 3)
                if len(slots):
                    qkv = qkv.index_copy(0, slots, _project_per_head(x, ln, w_in[slots], b_in[slots]))
            q, k, v = qkv.reshape(3, H, b, p, dh).unbind(0)  # [H, b, p, dh]
        else:
            x = visitor.dest([pre + "hook_attn_in"], resid)  # [H, b, p, d]: Q, K and V share a head's copy
            if x is not None:
                x = F.layer_norm(x, (d,), *ln).view(H, b * p, d)
                # per head: its Q, K and V rows side by side, [H, d, 3 * dh]
                w_head = w_qkv.view(3, H, dh, d).transpose(0, 1).reshape(H, 3 * dh, d).transpose(1, 2)
                b_head = b_qkv.view(3, H, 1, dh).permute(1, 2, 0, 3).reshape(H, 1, 3 * dh)
                qkv = torch.baddbmm(b_head, x, w_head)
                q, k, v = qkv.view(H, b, p, 3, dh).permute(3, 0, 1, 2, 4).unbind(0)
            else:
                x = F.layer_norm(resid, (d,), *ln)
                qkv = F.linear(x, w_qkv, b_qkv)
                seen = getattr(visitor, "plain_qkv", None)  # funcpatch.zero_grads: gradients per head slot
                if seen is not None:
                    qkv = seen(i, qkv.view(b, p, 3 * H, dh).permute(2, 0, 1, 3))  # [3H, b, p, dh]
                    q, k, v = qkv.reshape(3, H, b, p, dh).unbind(0)
                else:
                    q, k, v = qkv.view(b, p, 3, H, dh).permute(2, 3, 0, 1, 4).unbind(0)
        scale = dh ** -0.5 / (i + 1 if self.inverse_layer_scale else 1)
        rows = tail if tail and visitor.narrow(tail) else p  # query positions computed
        if add_mask is None:
            allowed = torch.ones(p, p, dtype=torch.bool, device=q.device).tril()[p - rows:]
        else:
            allowed = add_mask[:, p - rows:]  # [b, rows, p]: broadcasts over the heads
        z = _attend(q[:, :, p - rows:], k, v, allowed, scale).reshape(H, b * rows, dh)
        per_head = torch.bmm(z, w[f"{i}.o.w"].view(H, dh, d)).view(H, b, rows, d)
        visitor.src(pre + "attn.hook_result", per_head)
        return per_head.sum(0) + w[f"{i}.o.b"]


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor, scale: float) -> torch.Tensor:
    """``softmax(q k^T * scale) v`` over the keys ``allowed`` (a bool mask, or an additive
    float mask); ``q [..., rows, dh]``, ``k``/``v [..., p, dh]``. One fused kernel,
    except under torch.func transforms (it has no batching rule there: vmap would loop)."""
    if not torch._C._are_functorch_transforms_active():
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if allowed.dtype == torch.bool:
        scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
    else:
        scores = scores + allowed
    return torch.matmul(scores.softmax(-1), v)


def _project_per_head(x: torch.Tensor, ln, w: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Layer norm then each slot's own projection: ``x [m, b, p, d]`` -> ``[m, b, p, dh]``
    (``w [m, d, dh]``, ``bias [m, 1, dh]``). ``x`` may be batch-major underneath (a
    transposed ``[b, m, p, d]``, as per-row masks give): then it stays so, uncopied."""
    m, b, p, d = x.shape
    if x.is_contiguous():  # head-major: one product per slot over all rows
        return torch.baddbmm(bias, F.layer_norm(x, (d,), *ln).view(m, b * p, d), w).view(m, b, p, -1)
    x = F.layer_norm(x.transpose(0, 1), (d,), *ln)  # [b, m, p, d]
    return (torch.matmul(x, w) + bias).transpose(0, 1)


def _one_kernel(act: nn.Module):
    """``act`` as one kernel where torch has one for its formula: transformers'
    ``NewGELUActivation`` (GPT-2's ``gelu_new``) spells torch's tanh-approximate GELU out
    in six elementwise operations (measured: 4-8% of the patched forward's time on the
    benchmark workload)."""
    if type(act).__name__ == "NewGELUActivation":
        return _tanh_gelu
    return act


def _tanh_gelu(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def _node(visitor, name: str, x: torch.Tensor) -> torch.Tensor:
    """A residual-stream node: patched if it is a destination, recorded if a source."""
    patched = visitor.dest([name], x)
    x = x if patched is None else patched[0]
    visitor.src(name, x.unsqueeze(0))
    return x


def _positions(attention_mask: Optional[torch.Tensor], p: int, device) -> torch.Tensor:
    """Position ids as the bridge derives them: ``arange``, except in rows where padding
    precedes a real token; there, count real tokens only (pads get 0). ``[batch | 1, p]``."""
    arange = torch.arange(p, device=device)
    if attention_mask is None:
        return arange.unsqueeze(0)
    mask = attention_mask.long()
    derived = (mask.cumsum(-1) - 1).clamp(min=0)
    needs = ((derived != arange) & (mask != 0)).any(-1, keepdim=True)
    return torch.where(needs, derived, arange)


def _additive_mask(attention_mask: Optional[torch.Tensor], p: int, dtype) -> Optional[torch.Tensor]:
    """transformers' 4-D float mask for a 2-D padding mask: 0 where a query may attend
    (causal and not padding), the dtype's minimum elsewhere; ``[batch, p, p]`` (broadcasts
    over the heads of ``[heads, batch, p, p]`` scores)."""
    if attention_mask is None:
        return None
    causal = torch.ones(p, p, dtype=torch.bool, device=attention_mask.device).tril()
    allowed = causal & attention_mask[:, None, :].bool()
    return torch.where(allowed, 0.0, torch.finfo(dtype).min).to(dtype)


def lean_forward_for(model: nn.Module):
    """The lean forward for ``model``, or None when it has none (the hook path is used)."""
    try:
        from transformer_lens.model_bridge import TransformerBridge
    except ImportError:
        return None
    if isinstance(model, TransformerBridge) and LeanGPT2.qualifies(model):
        return LeanGPT2(model)
    return None
