"""Models whose weights lie on several devices (transformers' ``device_map``, or blocks
moved by hand): where funcpatch's own forward runs each part, and the setups it refuses.

funcpatch's own forward (:mod:`funcpatch.decoder`) runs each block on the device of its
weights, as transformers and accelerate do: the residual stream (and what the visitors
carry along with it, :mod:`funcpatch.source_major`) moves to a block's device when the
block starts, and only forward, in block order. A block must not itself be split over
devices. Weights *offloaded* by accelerate (kept on ``meta`` and loaded by hooks when
the module runs) cannot serve: the own forward reads the weights, it does not call the
modules that would load them.
"""

from __future__ import annotations

from typing import List, Mapping, Optional, Set

import torch
from torch import nn


def weight_devices(model: nn.Module) -> Set[torch.device]:
    """The devices of ``model``'s parameters."""
    return {t.device for t in model.parameters()}


def block_devices(w: Mapping[str, torch.Tensor], n_layers: int) -> Optional[List[torch.device]]:
    """Each block's device from the weights by canonical key (:func:`funcpatch.arch.resolve`),
    or None when every weight is on one device (then nothing is ever moved).

    Raises:
        ValueError: a block whose weights are on several devices.
    """
    first = w["embed"].device
    if all(t.device == first for t in w.values()):
        return None
    per: List[Set[torch.device]] = [set() for _ in range(n_layers)]
    for key, t in w.items():
        block = key.split(".", 1)[0]
        if block.isdigit():
            per[int(block)].add(t.device)
    for i, devices in enumerate(per):
        if len(devices) != 1:
            raise ValueError(f"block {i}'s weights are on several devices ({sorted(map(str, devices))}); funcpatch "
                             "runs each block on one device: keep blocks whole (a device_map per decoder layer, as "
                             "transformers' device_map='auto' makes)")
    return [d.pop() for d in per]


def _offloads(hook) -> bool:
    """Whether an accelerate hook (or one of a ``SequentialHook``'s) loads offloaded weights."""
    inner = getattr(hook, "hooks", None)
    if inner is not None:
        return any(_offloads(h) for h in inner)
    return bool(getattr(hook, "offload", False))


def check_not_offloaded(model: nn.Module) -> None:
    """Raise if accelerate offloads any of ``model``'s weights (cpu or disk offload: the
    weights wait on ``meta`` for a hook to load them when their module runs).

    A model whose blocks are placed on ``meta`` by hand (tests) has no such hooks and passes.
    """
    offloaded = [name or type(model).__name__ for name, m in model.named_modules()
                 if _offloads(getattr(m, "_hf_hook", None))]
    if offloaded:
        raise ValueError(
            f"{len(offloaded)} module(s) of this model have their weights offloaded by accelerate (first: "
            f"{offloaded[0]!r}): funcpatch's forward reads the weights and cannot load them. Load the model with "
            "every layer on a device that holds its weights: a device_map without 'disk' entries and, with a GPU, "
            "without 'cpu' entries (accelerate offloads those), or move layers to the CPU with .to('cpu')")


def check_one_device(model: nn.Module, why: str) -> None:
    """Raise if ``model``'s weights lie on several devices: ``why`` names the path that needs one."""
    devices = weight_devices(model)
    if len(devices) > 1:
        raise ValueError(f"the model's weights are on several devices ({sorted(map(str, devices))}) and {why} runs "
                         "on one device only; give fp.patchable the transformers model itself (or its "
                         "TransformerBridge, lean=True) of a family funcpatch's own forward covers, with calls it "
                         "takes (token ids, attention_mask, position_ids, logits_to_keep), or move the model to one "
                         "device")
