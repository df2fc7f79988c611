"""The pure patched forward pass, and the one interface every way of running a model
implements.

During one call each source's output is recorded, and each destination's input
becomes ``input + sum_src mask[..., src] * (patch_src_outs[src] - src_out[src])`` over
its incoming sources, where ``src_out`` is the source's output *in this same forward*.
The mask-weighted sum is one matrix product over the differences, shared by the
destinations that read the same sources (a layer's Q, K and V inputs).

Two implementations of :class:`PatchForward`, chosen once by ``fp.patchable``:
funcpatch's own forward (:mod:`funcpatch.own_forward`, over :mod:`funcpatch.decoder`) for
the decoder families it covers, and hooks on the model's modules
(:mod:`funcpatch.hook_forward`) for everything else. Algorithms call ``pm.forward`` and
never ask which one it is; both give the same outputs (tests/test_lean.py).
"""

from __future__ import annotations

from typing import Callable, ContextManager, Dict, Mapping, Optional, Protocol, Tuple

import torch

from funcpatch.inputs import check_call_inputs, check_mask_dtypes
from funcpatch.state import PatchState

Checkpoints = Dict[Tuple[int, int], Tuple[torch.Tensor, int]]


class PatchForward(Protocol):
    """How a :class:`funcpatch.PatchableModel` runs its model (``pm.forward``).

    ``args``/``kwargs`` are the model call's; outputs are what ``pm.model`` returns for
    them (logits ``[batch, pos, vocab]`` for language models).
    """

    takes_logits_to_keep: bool  # calls accept ``logits_to_keep=k`` (outputs: the last k positions)

    def session(self, pm) -> ContextManager:
        """A context for many calls in a row (a search, a training loop): whatever the
        forward sets up per call stays set up inside it."""

    def plain(self, pm, args, kwargs):
        """The unpatched forward."""

    def patched(self, pm, state: PatchState, args, kwargs, params: Optional[Mapping[str, torch.Tensor]] = None):
        """The forward with edges patched as ``state`` says (see the module docstring)."""

    def record(self, pm, args, kwargs, params: Optional[Mapping[str, torch.Tensor]] = None):
        """``(out, src_outs [n_srcs, batch, pos, d])``: a plain forward and every source's output."""

    def checkpoints(self, pm, args, kwargs) -> Tuple[object, torch.Tensor, Checkpoints]:
        """``(out, src_outs, {point: (resid, n sources before)})``: a plain forward and the
        points :meth:`resumed` can start from (``(block, 0)`` entering a block, ``(block, 1)``
        entering its MLP, ``(n_layers, 0)`` after the last block); possibly none."""

    def resumed(self, pm, state: PatchState, point: Tuple[int, int], resid: Optional[torch.Tensor],
                src_outs: Optional[torch.Tensor], args, kwargs, repeats: int = 1):
        """:meth:`patched` from ``point`` on (a key of :meth:`checkpoints`, or ``(0, 0)``).

        Exact when no destination before ``point`` is patched and ``resid``/``src_outs``
        come from :meth:`checkpoints` on the same inputs. With ``repeats`` the inputs (and
        ``resid``) are ``repeats`` stacked copies of the batch ``state.patch_src_outs`` and
        ``src_outs`` were computed on (circuits stacked along the batch)."""

    def zero_mask_grads(self, pm, state: PatchState, tokens: torch.Tensor, kwargs,
                        loss: Callable[[object], torch.Tensor],
                        resid: Optional[torch.Tensor] = None) -> Optional[Dict[str, torch.Tensor]]:
        """``dL/dmasks`` at masks = 0 from one plain forward/backward, or None where this
        forward has no such shortcut (then ``torch.func.grad`` of :meth:`patched` serves).
        With ``resid [batch, pos, d]`` the residual stream starts there (EAP-IG-inputs'
        interpolated embedding) and ``state.patch_src_outs`` are fixed differences
        (:func:`funcpatch.zero_grads.zero_mask_grads`)."""


def check_state(pm, state: PatchState) -> None:
    """Clear errors for a state that does not fit ``pm``'s graph."""
    if not isinstance(state, PatchState):
        raise TypeError(f"state must be a funcpatch.PatchState (fp.init_state), got {type(state).__name__}")
    if state.patch_src_outs is None:
        raise ValueError("state has no patch values: call fp.patch_mode(pm, state, patch_src_outs) first "
                         "(patch_src_outs from fp.src_ablations)")
    expected = {m.module_name: m.mask_shape(pm.graph.seq_len) for m in pm.graph.dest_modules}
    if set(state.masks) != set(expected):
        raise ValueError(f"state.masks keys do not match this graph's destination modules: "
                         f"missing {sorted(set(expected) - set(state.masks))}, "
                         f"unexpected {sorted(set(state.masks) - set(expected))}")
    for k, shape in expected.items():
        got = tuple(state.masks[k].shape)
        if got != shape and got[1:] != shape:
            raise ValueError(f"mask for {k} has shape {got}; this graph needs {shape} "
                             "(optionally with a leading batch dim)")
    if state.patch_src_outs.shape[0] != len(pm.graph.srcs):
        raise ValueError(f"patch_src_outs has {state.patch_src_outs.shape[0]} sources, the graph has "
                         f"{len(pm.graph.srcs)}")


def patched_forward(pm, state: PatchState, *args, params: Optional[Mapping[str, torch.Tensor]] = None,
                    **kwargs):
    """Run ``pm.model(*args, **kwargs)`` with the edges patched as ``state`` says.

    Pure: the output depends only on the arguments, and the model is left exactly as
    it was (also when the call raises). With ``params`` (name -> tensor, any subset of
    the model's parameters and buffers) the model runs with those values, so gradients
    w.r.t. weights flow. Composes with ``torch.func.vmap``/``grad``/``jvp``/``jacrev``.

    Returns the model's full output (apply ``pm.out_slice`` to score a task); for a
    transformers model given directly to ``fp.patchable``, the logits ``[batch, pos, vocab]``.
    """
    check_state(pm, state)
    check_mask_dtypes(state.masks, state.patch_src_outs.dtype)
    check_call_inputs(pm, args, kwargs, params)
    return pm.forward.patched(pm, state, args, kwargs, params)


def record_src_outs(pm, *args, params=None, **kwargs) -> Tuple[object, torch.Tensor]:
    """A plain forward that also returns every source's output ``[n_srcs, batch, seq, d]``."""
    check_call_inputs(pm, args, kwargs, params)
    return pm.forward.record(pm, args, kwargs, params)
