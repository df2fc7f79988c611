"""The :class:`funcpatch.forward.PatchForward` of funcpatch's own forward
(:mod:`funcpatch.decoder`): its visitors (:mod:`funcpatch.source_major`) patch, record,
keep checkpoints and resume; EAP's gradients come from :mod:`funcpatch.zero_grads`.

A call the own forward does not reproduce (inputs other than token ids, unknown keyword
arguments, training mode) goes to the hook path where the model has one (a bridge);
a transformers model given directly has none, and such a call is an error.
"""

from __future__ import annotations

import contextlib
from typing import Optional

from funcpatch.decoder import DecoderForward
from funcpatch.devices import check_one_device
from funcpatch.hook_forward import HookForward
from funcpatch.source_major import CheckpointRecorder, SrcMajorPatcher, SrcMajorRecorder
from funcpatch.zero_grads import zero_mask_grads


class OwnForward:
    """funcpatch's own forward for one model, with the hook path as ``fallback`` (or None)."""

    takes_logits_to_keep = True

    def __init__(self, decoder: DecoderForward, fallback: Optional[HookForward]):
        self.decoder = decoder
        self.fallback = fallback

    def session(self, pm):
        return contextlib.nullcontext()  # nothing is set up per call

    def _bind(self, args, kwargs, params=None, resume=None):
        run = self.decoder.bind(args, kwargs, params, resume)
        if run is None and self.fallback is None:
            model = self.decoder.model
            raise ValueError(
                f"funcpatch runs this {type(model).__name__} with its own forward, which takes token ids "
                "[batch, pos] (int64) and the keyword arguments attention_mask, position_ids, logits_to_keep, "
                f"in eval mode; got args {[type(a).__name__ for a in args]}, kwargs {sorted(kwargs)}, "
                f"training={model.training}. Wrap the model as a TransformerBridge (fp.models.from_hf) for other calls")
        if run is None:  # the bridge's hooks serve this call, on one device only
            check_one_device(self.decoder.model, f"this call (args {[type(a).__name__ for a in args]}, kwargs "
                                                 f"{sorted(kwargs)}, training={self.decoder.model.training}) goes "
                                                 "to the bridge's hook path, which")
        return run

    def plain(self, pm, args, kwargs):
        run = self._bind(args, kwargs)
        return self.fallback.plain(pm, args, kwargs) if run is None else run(SrcMajorRecorder(pm))

    def patched(self, pm, state, args, kwargs, params=None):
        run = self._bind(args, kwargs, params)
        if run is None:
            return self.fallback.patched(pm, state, args, kwargs, params)
        return run(SrcMajorPatcher(pm, state))

    def record(self, pm, args, kwargs, params=None):
        run = self._bind(args, kwargs, params)
        if run is None:
            return self.fallback.record(pm, args, kwargs, params)
        rec = SrcMajorRecorder(pm)
        out = run(rec)
        return out, rec.stacked()

    def checkpoints(self, pm, args, kwargs):
        run = self._bind(args, kwargs)
        if run is None:
            return self.fallback.checkpoints(pm, args, kwargs)
        rec = CheckpointRecorder(pm)
        out = run(rec)
        # post-normalized heads (Gemma-2) need their layer's sum, which a resumed forward
        # would not see for layers before its start: no checkpoints there
        return out, rec.stacked(), {} if self.decoder.arch.post_norms else rec.checkpoints

    def resumed(self, pm, state, point, resid, src_outs, args, kwargs, repeats: int = 1):
        run = self._bind(args, kwargs, None, resume=(point, resid))
        if run is None:
            return self.fallback.resumed(pm, state, point, resid, src_outs, args, kwargs, repeats)
        return run(SrcMajorPatcher(pm, state, before=src_outs, repeats=repeats))

    def zero_mask_grads(self, pm, state, tokens, kwargs, loss, resid=None):
        return zero_mask_grads(pm, self.decoder, state, tokens, kwargs, loss, resid)
