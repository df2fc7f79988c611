"""funcpatch's own forward for decoder-only transformers: one computation, driven by the
architecture description of :mod:`funcpatch.arch` (GPT-2, GPT-NeoX/Pythia, Llama,
Mistral, Qwen2/2.5, Qwen3, Gemma-2), written over the weights in per-head layout.

Patching needs per-head inputs (Q/K/V) and per-head outputs (each head's contribution to
the residual). Here they are plain tensor code: one norm over all Q/K/V inputs of a
layer, one batched matmul for their projections, one for the per-head results. At every
node hook point the activation goes to the call's visitor by TransformerLens hook name,
in source-major layout (``[heads, batch, pos, d]``; the visitors that patch and record
are in :mod:`funcpatch.source_major`). It can also resume from a checkpoint of a clean
forward and compute only the last positions of the last block (ACDC uses both). Where
nothing records the forward, on float32 CPU tensors, compiled kernels
(:mod:`funcpatch.kernels`) fuse a layer's slot-input mixing, norm and projection, and
the heads' differences with the attention output; elsewhere the same values come from
plain torch.

Grouped-query attention: Q/K/V destinations come in *slots*. The per-query-head graph
(the default, MIB's) has ``3 * n_heads`` slots per layer: query head ``h``'s K and V slots
hold its own copy of the input, projected with its group's shared weights. The grouped
graph (``grouped_kv=True``) has ``n_heads + 2 * n_kv_heads`` slots: one K and one V per
key/value head. Unpatched, both compute exactly the model's grouped attention.

Gemma-2 normalizes the *sum* of a layer's head outputs (its post-attention norm), so a
head's contribution is not additive. Here a head's edge is defined as EAP-IG's
evaluation defines it: a destination receives the change in the layer's normalized
output, ``post_norm(S + sum_h m_h (patch_h - out_h)) - post_norm(S)`` with ``S`` the
layer's pre-norm sum in this forward (heads' outputs are recorded before the norm).
This departs from DESIGN.md's additive rule for those sources only; with every edge
patched it still gives the patched run exactly.

Used when the model is a transformers causal LM of a supported family, or its
``TransformerBridge`` (not in compatibility mode), in eval mode, and the call is one
this module understands (token ids, optional ``attention_mask``, ``position_ids``,
``logits_to_keep``, ``return_type="logits"``). ``fp.patchable(model, lean=False)``
forces the bridge's hooks. Equality with transformers' forward and with the hook path
(outputs and gradients, all graph kinds) is tested in ``tests/test_lean.py`` and
``tests/test_architectures.py``.

Pure: weights are looked up per call, from ``params`` where given (the model's parameter
and buffer names, aliases included) and from the model otherwise.
"""

from __future__ import annotations

from typing import Mapping, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from funcpatch.arch import (DecoderArch, UnsupportedArchitecture, read_arch, resolve, transformers_model,
                            weight_refs)
from funcpatch import kernels
from funcpatch.devices import block_devices
from funcpatch.scratch import recording, scratch


class DecoderForward:
    """The per-head forward of one model (see the module docstring).

    ``bind(args, kwargs, params)`` checks a call and returns ``run(visitor) -> logits``;
    see :meth:`forward` for what the visitor sees.
    """

    def __init__(self, model: nn.Module, grouped_kv: bool = False, arch: Optional[DecoderArch] = None):
        self.model = model
        self.arch = a = arch or read_arch(model)
        self.refs, acts, self.rotary = weight_refs(model, a)
        self.acts = [_one_kernel(m) for m in acts]
        self.acts_in_place = [_in_place(m) for m in acts]  # or None where not known
        self.n_layers, self.n_heads, self.d_head = a.n_layers, a.n_heads, a.d_head
        self.eps = a.eps
        self.grouped_kv = grouped_kv
        # the bridge derives learned positions from padding (GPT-2); transformers counts from 0
        self.positions_from_mask = getattr(model, "original_model", None) is not None
        H, G = a.n_heads, a.n_kv_heads
        kv = torch.arange(G) if grouped_kv else torch.arange(H) // (H // G)
        # slot -> row of the joined per-head projection [H + 2G, dh, d] (Q heads, K heads, V heads)
        self.slot_rows = torch.cat([torch.arange(H), H + kv, H + G + kv])
        self.n_kv_slots = len(kv)
        # Rotary models keep each Q/K head's rotated dims in pairs, (x_i, x_{i + half}) of the
        # rotate-half convention side by side: their weight rows are permuted (qkv_rows), a
        # rotation is then one complex product (_rotate), and q . k is unchanged (the same
        # order on both). None: no rotary.
        self.pair_order = None
        if a.positions == "rotary":
            half = a.rotary_dims // 2
            order = torch.arange(self.d_head)
            order[:2 * half] = torch.stack([torch.arange(half), half + torch.arange(half)], dim=1).flatten()
            self.pair_order = order
            qk = (torch.arange(H + G)[:, None] * self.d_head + order).flatten()
            self._qkv_order = torch.cat([qk, torch.arange((H + G) * self.d_head, (H + 2 * G) * self.d_head)])
        self._derived: dict = {}  # name -> (what it was made from, value): see derived()

    def weights(self, params: Optional[Mapping[str, torch.Tensor]] = None):
        """The weights by canonical key (:func:`funcpatch.arch.resolve`)."""
        return resolve(self.model, self.refs, params)

    def bind(self, args, kwargs, params: Optional[Mapping[str, torch.Tensor]], resume=None):
        """``run(visitor) -> logits`` for this call, or None when the call is not one this
        forward reproduces (then the hook path runs, where the model has one)."""
        if self.model.training or len(args) != 1 or not isinstance(args[0], torch.Tensor):
            return None
        tokens = args[0]
        if tokens.dtype not in (torch.long, torch.int) or tokens.dim() != 2:
            return None
        kwargs = dict(kwargs)
        attention_mask = kwargs.pop("attention_mask", None)
        position_ids = kwargs.pop("position_ids", None)
        keep = kwargs.pop("logits_to_keep", 0)
        if kwargs.pop("return_type", "logits") != "logits" or kwargs or not isinstance(keep, int):
            return None
        w = self.weights(params)
        return lambda visitor: self.forward(w, tokens, visitor, attention_mask, keep, resume, position_ids)

    def derived(self, name: str, sources, make):
        """``make()``, a value computed from the weight tensors ``sources`` only, reused
        while each of them is the same tensor object, storage and version (no in-place
        write since) and nothing records the forward (under autograd or torch.func the
        weights may be traced or batched: computed afresh). Saves rebuilding per-layer
        weight layouts on every call (measured: ~0.4 ms of a 30 ms forward)."""
        if recording():
            return make()
        try:
            key = tuple((id(t), t.data_ptr(), t._version) for t in sources)
        except RuntimeError:  # a tensor with no storage to key on (a wrapper, a fake tensor): not cached
            return make()
        hit = self._derived.get(name)
        # the tensors themselves are held (hit[2]): an id is not reused while they live
        if hit is not None and hit[0] == key:
            return hit[1]
        value = make()
        self._derived[name] = (key, value, tuple(sources))
        return value

    def norm(self, w, key: str, x: torch.Tensor) -> torch.Tensor:
        """The model's norm ``key`` (``ln1``, ``final``, ...) over the last dim of ``x``."""
        kind = self.arch.norm
        if kind == "layer":
            return F.layer_norm(x, x.shape[-1:], w[key + ".w"], w.get(key + ".b"), self.eps)
        weight = w[key + ".w"]
        if kind == "rms_offset":
            weight = 1.0 + weight.float()
        return F.rms_norm(x, x.shape[-1:], weight, self.eps).to(x.dtype)

    def norm_gain(self, w, key: str) -> torch.Tensor:
        """The norm ``key``'s per-feature scale ``[d]``, for folding it into the weights that
        read its output: its weight, or ``1 + weight`` (Gemma's offset RMSNorm)."""
        weight = w[key + ".w"]
        return 1.0 + weight if self.arch.norm == "rms_offset" else weight

    def forward(self, w: Mapping[str, torch.Tensor], tokens: torch.Tensor, visitor,
                attention_mask: Optional[torch.Tensor] = None, logits_to_keep: int = 0,
                resume: Optional[Tuple[Tuple[int, int], torch.Tensor]] = None,
                position_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Logits ``[batch, pos, vocab]`` (the last ``logits_to_keep`` positions if > 0).

        ``visitor`` sees the nodes in source-major layout: ``visitor.src(hook, out)``
        with ``out [k, batch, pos, d]`` (k heads, or 1), or, for the heads' outputs,
        ``visitor.src_product(hook, z, w, shape)`` with ``out = bmm(z, w).view(shape)`` (which
        may return the heads' sum, the attention output before its bias);
        and ``visitor.dest(hooks, x)`` with the residual ``x [batch, pos, d]`` read by destinations ``hooks``, which
        returns their patched inputs ``[slots, batch, pos, d]`` or None (unpatched).
        A visitor with ``checkpoint(point, resid)`` also sees the residual at each point
        a forward can resume from: ``(i, 0)`` entering block ``i``, ``(i, 1)`` entering
        its MLP (in parallel blocks, the block's input again: the block runs whole),
        ``(n_layers, 0)`` after the last block.
        With ``logits_to_keep`` and a visitor whose ``narrow(k)`` returns True, everything
        after the last block's attention runs on the last ``k`` positions only; the
        visitor then sees ``pos = k``. A visitor with ``post_norm(hook, summed, norm)``
        is told, for post-normalized attention (Gemma-2), each layer's pre-norm sum and
        its norm (see the module docstring).

        ``resume=(point, resid)`` starts at ``point`` from the residual there (the visitor
        must already hold the sources before it); nothing before it runs.
        """
        a = self.arch
        b, p = tokens.shape
        (start, stage), resid = resume or ((0, 0), None)
        devices = block_devices(w, self.n_layers)  # None: one device, nothing moves
        enter = None if devices is None else getattr(visitor, "enter", None)
        here = None  # with several devices: where the residual stream is now
        if devices is not None:  # the inputs go where the embedding is
            home = w["embed"].device
            tokens = tokens.to(home)
            attention_mask = None if attention_mask is None else attention_mask.to(home)
            position_ids = None if position_ids is None else position_ids.to(home)
        pos = self._positions(attention_mask, position_ids, b, p, tokens.device)
        if resid is None:
            if devices is not None:
                here = home
                if enter is not None:
                    enter(here)
            x = F.embedding(tokens, w["embed"])
            if a.embed_scale is not None:
                x = x * torch.tensor(a.embed_scale, dtype=x.dtype)
            if a.positions == "learned":
                x = x + F.embedding(pos, w["pos"])
            resid = _node(visitor, "blocks.0.hook_resid_pre", x)
        elif devices is not None and resid.device != here:  # resumed: the visitor joins where the stream is
            here = resid.device
            if enter is not None:
                enter(here)
        rotary = None
        if a.positions == "rotary":
            cos, sin = self.rotary(resid, (pos.expand(b, p) if pos.shape[0] != b else pos).to(resid.device))
            half = sin.shape[-1] // 2  # each pair's angle (rotate-half repeats it in both halves): see _rotate
            cos, sin = cos[..., :half].to(resid.dtype), sin[..., :half].to(resid.dtype)
            # where nothing records the forward, rotations are complex products in place
            turn = None if recording() or resid.dtype not in (torch.float32, torch.float64) else torch.complex(cos, sin)
            rotary = (cos, sin, turn)
        rotaries = {} if rotary is None else {rotary[0].device: rotary}  # device -> the rotary tables there
        masks = {}  # (window, device) -> the keys each query may see
        checkpoint = getattr(visitor, "checkpoint", None)
        for i in range(start, self.n_layers):
            pre = f"blocks.{i}."
            tail = logits_to_keep if i == self.n_layers - 1 and 0 < logits_to_keep < p else 0
            if devices is not None:
                if devices[i] != here:  # a block on another device: the stream follows
                    here = devices[i]
                    resid = resid.to(here)
                    if enter is not None:
                        enter(here)
                if rotary is not None and rotary[0].device != here:  # (accelerate may run the rotary module elsewhere)
                    if here not in rotaries:
                        rotaries[here] = tuple(None if t is None else t.to(here) for t in rotary)
                    rotary = rotaries[here]
            window = (a.windows[i], here)
            if window not in masks:
                padding = attention_mask if here is None or attention_mask is None else attention_mask.to(here)
                masks[window] = _allowed(padding, p, a.windows[i], tokens.device if here is None else here)
            if a.parallel:  # resuming anywhere in the block runs all of it
                if checkpoint is not None:
                    checkpoint((i, 0), resid)
                    checkpoint((i, 1), resid)
                x = visitor.dest([pre + "hook_mlp_in"], resid)  # before the heads' differences fill the buffer
                mlp_in = resid if x is None else x[0]
                attn = self._attention(w, i, resid, visitor, masks[window], rotary, tail)
                if attn.shape[1] < resid.shape[1]:
                    resid, mlp_in = resid[:, -tail:], mlp_in[:, -tail:]
                resid = resid + attn + self._mlp(w, i, mlp_in, visitor)
            else:
                if i > start or stage == 0:
                    if checkpoint is not None:
                        checkpoint((i, 0), resid)
                    attn = self._attention(w, i, resid, visitor, masks[window], rotary, tail)
                    if attn.shape[1] < resid.shape[1]:
                        resid = resid[:, -tail:]
                    resid = _node(visitor, pre + "hook_resid_mid", resid + attn)
                elif tail and visitor.narrow(tail):  # resumed at the last block's MLP
                    resid = resid[:, -tail:]
                if checkpoint is not None:
                    checkpoint((i, 1), resid)
                x = visitor.dest([pre + "hook_mlp_in"], resid)
                resid = resid + self._mlp(w, i, resid if x is None else x[0], visitor)
            if checkpoint is not None and i == self.n_layers - 1:
                checkpoint((self.n_layers, 0), resid)
            resid = _node(visitor, pre + "hook_resid_post", resid)
        if start == self.n_layers:  # resumed after the last block: only its output node runs
            if 0 < logits_to_keep < p and visitor.narrow(logits_to_keep):
                resid = resid[:, -logits_to_keep:]
            resid = _node(visitor, f"blocks.{self.n_layers - 1}.hook_resid_post", resid)
        if logits_to_keep > 0:
            resid = resid[:, -logits_to_keep:]  # (already so when the visitor narrowed)
        if devices is not None:  # the final norm and the unembedding may each be on a device of their own
            resid = resid.to(w["final.w"].device)
        normed = self.norm(w, "final", resid)
        if devices is not None:
            normed = normed.to(w["unembed.w"].device)
        logits = F.linear(normed, w["unembed.w"], w.get("unembed.b"))
        if a.final_softcap is not None:
            logits = torch.tanh(logits / a.final_softcap) * a.final_softcap
        return logits

    def _positions(self, attention_mask, position_ids, b: int, p: int, device) -> torch.Tensor:
        """Position ids ``[batch | 1, p]``: given ones; else ``arange`` (transformers), or as
        a bridge derives them: in rows where padding precedes a real token, count real
        tokens only (pads get 0)."""
        if position_ids is not None:
            return position_ids.reshape(-1, p)
        arange = torch.arange(p, device=device)
        if attention_mask is None or not self.positions_from_mask:
            return arange.unsqueeze(0)
        mask = attention_mask.long()
        derived = (mask.cumsum(-1) - 1).clamp(min=0)
        needs = ((derived != arange) & (mask != 0)).any(-1, keepdim=True)
        return torch.where(needs, derived, arange)

    def _mlp(self, w, i: int, x: torch.Tensor, visitor) -> torch.Tensor:
        """MLP block ``i`` on its input ``x [batch, pos, d]`` (its output goes to the visitor)."""
        a = self.arch
        folded = a.gated_mlp and a.norm != "layer"  # the RMSNorm's scale is folded into the gate/up weights
        x = F.rms_norm(x, x.shape[-1:], None, self.eps) if folded else self.norm(w, f"{i}.ln2", x)
        flat = x.reshape(-1, x.shape[-1])
        # where nothing records the forward: the hidden layer in this thread's scratch memory,
        # the activation in place (a fresh 1-3 MB per block made most of its page faults)
        own = not recording()
        act = self.acts_in_place[i] if own and self.acts_in_place[i] is not None else self.acts[i]
        if a.gated_mlp:  # gate and up in one product
            weight, bias = self.derived(f"gate-up {i}", [w[k] for k in (f"{i}.gate.w", f"{i}.up.w", f"{i}.gate.b",
                                                                       f"{i}.up.b", f"{i}.ln2.w") if k in w],
                                        lambda: self._gate_up(w, i))
            gate, up = _linear(flat, weight, bias, "mlp hidden" if own else None).split(weight.shape[0] // 2, dim=-1)
            gate = act(gate)
            up = gate.mul_(up) if own else gate * up
        else:
            up = act(_linear(flat, w[f"{i}.up.w"], w.get(f"{i}.up.b"), "mlp hidden" if own else None))
        out = F.linear(up, w[f"{i}.down.w"], w.get(f"{i}.down.b")).view_as(x)
        if a.post_norms:
            out = self.norm(w, f"{i}.post2", out)
        visitor.src(f"blocks.{i}.hook_mlp_out", out.unsqueeze(0))
        return out

    def _gate_up(self, w, i: int):
        """Block ``i``'s gate and up projections joined, ``[2 * d_mlp, d]``, with the scale of
        the RMSNorm before them folded in, and bias (or None)."""
        weight = torch.cat([w[f"{i}.gate.w"], w[f"{i}.up.w"]]) * self.norm_gain(w, f"{i}.ln2")
        return weight, torch.cat([w[f"{i}.gate.b"], w[f"{i}.up.b"]]) if f"{i}.gate.b" in w else None

    def qkv_rows(self, w: Mapping[str, torch.Tensor], i: int) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Block ``i``'s joined Q, K, V projection ``[(H + 2G) * dh, d]`` (as ``nn.Linear``)
        and bias (or None): rows per head, Q heads then K heads then V heads; with rotary
        positions, a Q/K head's rows in rotation pairs (:attr:`pair_order`)."""
        weight = torch.cat([w[f"{i}.{x}.w"] for x in "qkv"])
        bias = torch.cat([w[f"{i}.{x}.b"] for x in "qkv"]) if f"{i}.q.b" in w else None
        if self.pair_order is None:
            return weight, bias
        order = self._qkv_order.to(weight.device)  # Q/K rows in rotation pairs (see __init__)
        return weight.index_select(0, order), None if bias is None else bias.index_select(0, order)

    def slot_weights(self, w: Mapping[str, torch.Tensor], i: int):
        """Block ``i``'s projection per Q/K/V slot: ``[slots, dh, d]`` and bias ``[slots, 1, dh]``
        (or None); see :attr:`slot_rows`."""
        weight, bias = self.qkv_rows(w, i)
        rows = self.slot_rows.to(weight.device)
        weight = weight.view(-1, self.d_head, weight.shape[-1]).index_select(0, rows)
        return weight, None if bias is None else bias.view(-1, 1, self.d_head).index_select(0, rows)

    def _patched_slots(self, w, i: int, resid: torch.Tensor, visitor) -> Optional[torch.Tensor]:
        """Block ``i``'s Q/K/V slots ``[slots, b, p, dh]`` from their patched inputs, or None
        when the graph has no Q/K/V destinations."""
        names = [f"blocks.{i}.hook_{n}_input" for n in "qkv"]
        fused = self._fused_slots(w, i, resid, visitor, names)
        if fused is not None:
            return fused
        got = visitor.dest_slots(names, resid)
        if got is None:
            return None
        w_in, b_slots = self._slot_projection(w, i)  # [slots, d, dh], [slots, 1, dh]
        slots, x = got
        ln = f"{i}.ln1"
        if slots is None:
            return self._project(w, ln, x, w_in, b_slots)
        qkv = self._plain_slots(w, i, resid)  # only some slots are patched: the others project the residual itself
        if len(slots):
            qkv = qkv.index_copy(0, slots, self._project(w, ln, x, w_in[slots],
                                                         None if b_slots is None else b_slots[slots]))
        return qkv

    def _fused_slots(self, w, i: int, resid: torch.Tensor, visitor, names) -> Optional[torch.Tensor]:
        """:meth:`_patched_slots` by the compiled kernel (:func:`funcpatch.kernels.slot_projection`:
        inputs mixed, RMS-normed and projected tile by tile, never stored whole), where it
        applies: an RMS norm before the heads, float32 on the CPU, nothing recording, a
        small model, and inputs the visitor gives as one product; else None."""
        if (self.arch.norm == "layer" or resid.dtype != torch.float32 or resid.device.type != "cpu" or recording()
                or not kernels.available()):
            return None
        w_in, b_slots = self._slot_projection(w, i)  # [slots, d, dh], [slots, 1, dh]
        if not kernels.fits(*w_in.shape):
            return None
        terms = visitor.slot_terms(names, resid)
        if terms is None or terms[1].dtype != torch.float32:  # (other mask dtypes: the plain path says what is wrong)
            return None
        rows, mix = terms
        b, p, _ = resid.shape
        out = scratch("slot projections", (w_in.shape[0], b * p, w_in.shape[-1]), resid)
        if not kernels.slot_projection(rows, mix, w_in, self.eps, out):
            return None  # (sizes past 32-bit BLAS: the plain path forms the inputs again, from the same buffer)
        if b_slots is not None:
            out.add_(b_slots)
        return out.view(w_in.shape[0], b, p, -1)

    def _attention(self, w, i: int, resid: torch.Tensor, visitor, allowed, rotary, tail: int = 0) -> torch.Tensor:
        """Attention block ``i``'s output ``[batch, pos, d]`` (per-head results go to the
        visitor); with ``tail`` and a visitor that narrows, the last ``tail`` query positions only."""
        a = self.arch
        b, p, d = resid.shape
        H, G, dh = a.n_heads, a.n_kv_heads, self.d_head
        pre = f"blocks.{i}."
        ln = f"{i}.ln1"
        qkv = self._patched_slots(w, i, resid, visitor)  # [slots, b, p, dh], or None: no slot is a destination
        if qkv is not None:
            n_k = self.n_kv_slots
        else:
            x = visitor.dest([pre + "hook_attn_in"], resid)  # [H, b, p, d]: Q, K and V share a head's copy
            if x is not None:
                if G != H:
                    raise ValueError("graphs without Q/K/V split (separate_qkv=False) need n_kv_heads == n_heads")
                weight, bias = self.qkv_rows(w, i)
                # per head: its Q, K and V rows side by side, [H, d, 3 * dh]
                w_head = weight.view(3, H, dh, d).transpose(0, 1).reshape(H, 3 * dh, d).transpose(1, 2)
                b_head = None if bias is None else bias.view(3, H, 1, dh).permute(1, 2, 0, 3).reshape(H, 1, 3 * dh)
                x = self.norm(w, ln, x).view(H, b * p, d)
                per_head = torch.bmm(x, w_head) if b_head is None else torch.baddbmm(b_head, x, w_head)
                q, k, v = per_head.view(H, b, p, 3, dh).permute(3, 0, 1, 2, 4).unbind(0)
            else:
                seen = getattr(visitor, "plain_qkv", None)  # funcpatch.zero_grads: gradients per head slot
                if seen is not None:
                    qkv, n_k = seen(i, self._plain_slots(w, i, resid)), self.n_kv_slots  # [slots, b, p, dh]
                else:
                    qkv, n_k = self._plain_rows(w, i, resid), G  # [H + 2G, b, p, dh]: K/V per key/value head
        if qkv is not None:  # Q, K and V joined, [H + 2 n_k, b, p, dh]
            if rotary is not None and not a.qk_norm:  # Q and K rotated in one pass
                qk = _rotate(qkv[:H + n_k], *rotary, a.rotary_dims)
                q, k, v, rotary = qk[:H], qk[H:], qkv[H + n_k:], None
            else:
                q, k, v = qkv[:H], qkv[H:H + n_k], qkv[H + n_k:]
        if a.qk_norm:
            q, k = self._head_norm(w, f"{i}.q_norm", q), self._head_norm(w, f"{i}.k_norm", k)
        if rotary is not None:
            q, k = _rotate(q, *rotary, a.rotary_dims), _rotate(k, *rotary, a.rotary_dims)
        if k.shape[0] != H:  # grouped keys/values: each query head reads its group's
            k, v = (t.repeat_interleave(H // k.shape[0], dim=0) for t in (k, v))
        rows = tail if tail and visitor.narrow(tail) else p  # query positions computed
        z = _attend(q[:, :, p - rows:], k, v, allowed[..., p - rows:, :], a.scales[i], a.softcap)
        # the heads' outputs z_h @ W_O[h] go to the visitor as a product it may fuse (a
        # patcher wants only patch - out); their sum is the model's own output projection,
        # unless the visitor formed it on the way
        summed = visitor.src_product(pre + "attn.hook_result", z.reshape(H, b * rows, dh),
                                     w[f"{i}.o.w"].t().view(H, dh, d), (H, b, rows, d))
        if summed is not None:
            out = summed.view(b, rows, d)
            if f"{i}.o.b" in w:
                out = out + w[f"{i}.o.b"]
        else:
            out = F.linear(z.permute(1, 2, 0, 3).reshape(b, rows, H * dh), w[f"{i}.o.w"], w.get(f"{i}.o.b"))
        if a.post_norms:
            normed = self.norm(w, f"{i}.post1", out)
            tell = getattr(visitor, "post_norm", None)
            if tell is not None:
                tell(pre + "attn.hook_result", out, lambda t, i=i, w=w: self.norm(w, f"{i}.post1", t))
            out = normed
        return out

    def _head_norm(self, w, key: str, x: torch.Tensor) -> torch.Tensor:
        """The per-head norm ``key`` (Qwen3's q/k norms) over the head dims of ``x``, which
        are in rotation pairs (its weight permuted alike)."""
        if self.pair_order is None:
            return self.norm(w, key, x)
        order = self.pair_order.to(x.device)
        return self.norm({k: w[k].index_select(0, order) for k in (key + ".w", key + ".b") if k in w}, key, x)

    def _qkv_sources(self, w, i: int):
        """The weight tensors block ``i``'s Q/K/V projection is made from."""
        return [w[k] for k in (f"{i}.{x}.{y}" for x in "qkv" for y in "wb") if k in w]

    def _slot_projection(self, w, i: int):
        """Block ``i``'s per-slot projection as :meth:`_project` takes it: ``[slots, d, dh]``
        (with an RMSNorm, its scale folded in) and bias ``[slots, 1, dh]`` or None."""
        ln = f"{i}.ln1"
        rms = self.arch.norm != "layer"

        def make():
            weight, bias = self.slot_weights(w, i)
            weight = weight.transpose(1, 2)
            # (contiguous: the compiled kernel takes it so)
            return (weight * self.norm_gain(w, ln)[:, None] if rms else weight).contiguous(), bias

        return self.derived(f"slots {i}", self._qkv_sources(w, i) + ([w[ln + ".w"]] if rms else []), make)

    def _plain_rows(self, w, i: int, resid: torch.Tensor) -> torch.Tensor:
        """Block ``i``'s Q, K and V heads projected from the residual itself: ``[H + 2G, b, p, dh]``."""
        b, p, _ = resid.shape
        weight, bias = self.derived(f"qkv {i}", self._qkv_sources(w, i), lambda: self.qkv_rows(w, i))
        return F.linear(self.norm(w, f"{i}.ln1", resid), weight, bias).view(b, p, -1, self.d_head).permute(2, 0, 1, 3)

    def _plain_slots(self, w, i: int, resid: torch.Tensor) -> torch.Tensor:
        """Every Q/K/V slot of block ``i`` projected from the residual itself: ``[slots, b, p, dh]``."""
        rows = self._plain_rows(w, i, resid)
        if len(self.slot_rows) == rows.shape[0]:
            return rows
        return rows.index_select(0, self.slot_rows.to(rows.device))

    def _project(self, w, ln: str, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        """The norm ``ln`` then each slot's own projection: ``x [m, b, p, d]`` -> ``[m, b, p, dh]``
        (``weight [m, d, dh]``, ``bias [m, 1, dh]`` or None). ``x`` may be batch-major
        underneath (a transposed ``[b, m, p, d]``, as per-row masks give): then it stays so.

        An RMSNorm is folded into the projection: its weight is already in ``weight``
        (:meth:`_slot_projection`), its ``1/rms`` is applied to the projected ``dh`` values
        rather than to the ``d`` inputs (one reduction over ``x`` instead of the several
        passes torch's RMSNorm makes on a CPU)."""
        m, b, p, d = x.shape
        rms = self.arch.norm != "layer"
        own = not recording()  # intermediates in scratch memory and products in place (nothing saves them)
        batch_major = not x.is_contiguous()
        if batch_major:
            x = x.transpose(0, 1)  # [b, m, p, d], contiguous underneath
        if rms:
            norms = torch.linalg.vector_norm(x, dim=-1, keepdim=True)  # [.., 1]: small, out of place for autograd
            rstd = torch.rsqrt(norms * norms / d + self.eps)
            inputs = x
        else:
            inputs = self.norm(w, ln, x)
        if batch_major:
            out = torch.matmul(inputs, weight)
        else:  # head-major: one product per slot over all rows
            # into this thread's scratch memory: read within the block
            into = scratch("slot projections", (m, b * p, weight.shape[-1]), x) if own else None
            out = torch.bmm(inputs.view(m, b * p, d), weight, out=into).view(m, b, p, -1)
        if rms:
            out = out.mul_(rstd) if own else out * rstd
        if bias is not None:
            bias = bias if batch_major else bias.unsqueeze(1)
            out = out.add_(bias) if own else out + bias
        return out.transpose(0, 1) if batch_major else out


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, turn: Optional[torch.Tensor],
            dims: int) -> torch.Tensor:
    """Rotary position embedding on the first ``dims`` of each head's dims, held in
    rotation pairs (:attr:`DecoderForward.pair_order`): each pair turned by its angle.
    ``x [heads, b, p, dh]``, ``cos``/``sin [b | 1, p, dims / 2]``. With ``turn``
    (``cos + i sin``), in place as one complex product; else out of place."""
    if turn is not None:
        torch.view_as_complex(x[..., :dims].unflatten(-1, (-1, 2))).mul_(turn)
        return x
    pairs = x[..., :dims].unflatten(-1, (-1, 2))
    first, second = pairs[..., 0], pairs[..., 1]
    out = torch.stack([first * cos - second * sin, second * cos + first * sin], dim=-1).flatten(-2)
    return out if dims == x.shape[-1] else torch.cat([out, x[..., dims:]], dim=-1)


def _allowed(attention_mask: Optional[torch.Tensor], p: int, window: Optional[int], device) -> torch.Tensor:
    """Which keys each query sees: causal, within ``window`` if set, not padding.
    Bool ``[p, p]``, or ``[batch, p, p]`` with a padding mask (broadcasts over heads)."""
    q = torch.arange(p, device=device)
    allowed = q[None, :] <= q[:, None]
    if window is not None:
        allowed = allowed & (q[None, :] > q[:, None] - window)
    if attention_mask is not None:
        allowed = allowed & attention_mask[:, None, :].bool()
    return allowed


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor, scale: float,
            softcap: Optional[float]) -> torch.Tensor:
    """``softmax(q k^T * scale) v`` over the keys ``allowed`` (bool); ``q [..., rows, dh]``,
    ``k``/``v [..., p, dh]``. One fused kernel, except with a soft-cap (Gemma-2) and under
    torch.func transforms (it has no batching rule there: vmap would loop)."""
    if softcap is None and not torch._C._are_functorch_transforms_active():
        if allowed.dim() == 3:  # padding: transformers' additive mask (rows of all-masked keys stay finite)
            allowed = torch.where(allowed, 0.0, torch.finfo(q.dtype).min).to(q.dtype)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
    return torch.matmul(scores.softmax(-1), v)


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


def _in_place(act: nn.Module):
    """``act`` as a function that overwrites its input, for the activations transformers'
    families use (SiLU, exact and tanh GELU, ReLU); None for others."""
    name = type(act).__name__
    if name in ("SiLU", "SiLUActivation"):
        return lambda x: F.silu(x, inplace=True)
    if name in ("GELUTanh", "PytorchGELUTanh", "NewGELUActivation") or (
            isinstance(act, nn.GELU) and act.approximate == "tanh"):
        return lambda x: torch.ops.aten.gelu_(x, approximate="tanh")
    if (name == "GELUActivation" and getattr(act, "act", None) is F.gelu) or (
            isinstance(act, nn.GELU) and act.approximate == "none"):
        return torch.ops.aten.gelu_
    if isinstance(act, nn.ReLU):
        return torch.relu_
    return None


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], slot: Optional[str]) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for ``x [rows, d]``, written into this thread's scratch
    memory ``slot`` when given (see :func:`funcpatch.scratch.scratch`)."""
    if slot is None:
        return F.linear(x, weight, bias)
    out = scratch(slot, (x.shape[0], weight.shape[0]), x)
    return torch.mm(x, weight.t(), out=out) if bias is None else torch.addmm(bias, x, weight.t(), out=out)


def _node(visitor, name: str, x: torch.Tensor) -> torch.Tensor:
    """A residual-stream node: patched if it is a destination, recorded if a source."""
    patched = visitor.dest([name], x)
    x = x if patched is None else patched[0]
    visitor.src(name, x.unsqueeze(0))
    return x


def decoder_forward_for(model: nn.Module, grouped_kv: bool = False) -> Optional[DecoderForward]:
    """funcpatch's own forward for ``model``, or None when it has none (a bridge in
    compatibility mode, an architecture :mod:`funcpatch.arch` does not cover)."""
    if transformers_model(model) is None:
        return None
    if getattr(model, "original_model", None) is not None and getattr(model, "compatibility_mode", False):
        return None  # TransformerLens has processed the weights
    try:
        return DecoderForward(model, grouped_kv)
    except UnsupportedArchitecture:
        return None
