"""The patch state: masks, patch values and the mask function, as an immutable pytree.

Every function here is pure: it returns a new :class:`PatchState` and never changes
the one it was given. The state is a pytree for ``torch.utils._pytree`` (so
``torch.func.vmap``/``grad`` see its tensors) and for optree (namespace ``"funcpatch"``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Collection, Dict, Mapping, Optional, Union

import optree
import torch
import torch.utils._pytree as torch_pytree

from funcpatch.graph import Edge
from funcpatch.inputs import check_finite_masks

MASK_FNS = (None, "sigmoid", "hard_concrete")
OPTREE_NAMESPACE = "funcpatch"

# Hard concrete stretch and temperature (Louizos et al. 2017, as in subnetwork probing).
HC_LEFT, HC_RIGHT, HC_TEMP = -0.1, 1.1, 2 / 3


class FrozenMasks(dict):
    """A dict that refuses changes: a state's masks, shared by every call that holds it.

    ``state.masks[k] = ...`` would otherwise change a state that another call (or
    thread) holds. Build a new state instead: ``dataclasses.replace(state, masks={...})``.
    It is a dict (``isinstance``, iteration, ``{**masks}`` work) and a pytree node for
    ``torch.utils._pytree`` and optree (namespace ``"funcpatch"``), so ``vmap``/``grad``
    see its tensors. The tensors themselves are ordinary tensors. Where two pytrees must
    have one structure (``jvp``'s primals and tangents, a ``tree_map`` over two trees),
    pass ``dict(state.masks)`` next to plain dicts.
    """

    def _refuse(self, *args, **kwargs):
        raise TypeError("a state's masks are immutable: build a new state with "
                        "dataclasses.replace(state, masks={**state.masks, name: tensor})")

    __setitem__ = __delitem__ = __ior__ = _refuse
    update = pop = popitem = clear = setdefault = _refuse

    def __reduce__(self):  # pickle/deepcopy would otherwise fill an empty copy item by item
        return FrozenMasks, (dict(self),)

    def __repr__(self) -> str:
        return f"FrozenMasks({dict.__repr__(self)})"


def _flatten_masks(m: FrozenMasks):
    return list(m.values()), list(m.keys())


def _unflatten_masks(values, keys) -> FrozenMasks:
    return FrozenMasks(zip(keys, values))


torch_pytree.register_pytree_node(
    FrozenMasks, _flatten_masks, _unflatten_masks, serialized_type_name="funcpatch.FrozenMasks",
    flatten_with_keys_fn=lambda m: ([(torch_pytree.MappingKey(k), v) for k, v in m.items()], list(m.keys())),
)
optree.register_pytree_node(
    FrozenMasks, lambda m: (list(m.values()), list(m.keys()), list(m.keys())),
    lambda keys, values: _unflatten_masks(values, keys), namespace=OPTREE_NAMESPACE,
)


@dataclass(frozen=True)
class MaskNoise:
    """Uniform [0, 1) samples, mask-shaped, for the random mask functions.

    ``concrete[m]``: ``[*mask.shape]`` or ``[batch, *mask.shape]`` (one sample per example).
    ``dropout[m]``: same shapes; an entry is dropped where its sample is below ``dropout_p``.
    """

    concrete: Optional[Dict[str, torch.Tensor]] = None
    dropout: Optional[Dict[str, torch.Tensor]] = None


@dataclass(frozen=True)
class PatchState:
    """Masks and patch values for one patched forward.

    masks: dest module name -> ``[seq?, heads?, n_in_srcs]`` tensor, held as an
        immutable :class:`FrozenMasks` (any mapping given is copied into one); 0 keeps an edge
        clean, 1 patches it with ``patch_src_outs``, values between interpolate.
    patch_src_outs: ``[n_srcs, batch, seq, d_model]`` values sources are patched with
        (see :func:`funcpatch.src_ablations`), or None before :func:`patch_mode`.
    mask_fn: None | "sigmoid" | "hard_concrete": applied to masks before use.
    dropout_p: dropout on the (transformed) masks, driven by ``noise.dropout``.
    noise: explicit randomness for hard concrete / dropout (:func:`sample_mask_noise`).
    """

    masks: Dict[str, torch.Tensor]
    patch_src_outs: Optional[torch.Tensor] = None
    mask_fn: Optional[str] = None
    dropout_p: float = 0.0
    noise: Optional[MaskNoise] = None

    def __post_init__(self):
        if isinstance(self.masks, Mapping) and not isinstance(self.masks, FrozenMasks):
            object.__setattr__(self, "masks", FrozenMasks(self.masks))


def _flatten_state(s: PatchState):
    return (s.masks, s.patch_src_outs, s.noise), (s.mask_fn, s.dropout_p)


def _unflatten_state(children, aux) -> PatchState:
    masks, patch, noise = children
    return PatchState(masks, patch, aux[0], aux[1], noise)


def _flatten_noise(n: MaskNoise):
    return (n.concrete, n.dropout), None


def _unflatten_noise(children, _aux) -> MaskNoise:
    return MaskNoise(*children)


torch_pytree.register_pytree_node(
    PatchState, _flatten_state, _unflatten_state, serialized_type_name="funcpatch.PatchState",
    flatten_with_keys_fn=lambda s: ([(torch_pytree.GetAttrKey(k), v) for k, v in
                                     zip(("masks", "patch_src_outs", "noise"), _flatten_state(s)[0])],
                                    _flatten_state(s)[1]),
)
torch_pytree.register_pytree_node(
    MaskNoise, _flatten_noise, _unflatten_noise, serialized_type_name="funcpatch.MaskNoise",
    flatten_with_keys_fn=lambda n: ([(torch_pytree.GetAttrKey("concrete"), n.concrete),
                                     (torch_pytree.GetAttrKey("dropout"), n.dropout)], None),
)
# optree's unflatten takes (metadata, children), torch's (children, metadata).
optree.register_pytree_node(
    PatchState, lambda s: (*_flatten_state(s), ("masks", "patch_src_outs", "noise")),
    lambda aux, children: _unflatten_state(children, aux), namespace=OPTREE_NAMESPACE,
)
optree.register_pytree_node(
    MaskNoise, lambda n: ((n.concrete, n.dropout), None, ("concrete", "dropout")),
    lambda aux, children: _unflatten_noise(children, aux), namespace=OPTREE_NAMESPACE,
)


def _param_dtype(pm) -> torch.dtype:
    p = next(pm.model.parameters(), None)
    return torch.float32 if p is None else p.dtype


def _param_device(pm) -> torch.device:
    p = next(pm.model.parameters(), None)
    return torch.device("cpu") if p is None else p.device


def _finite_value(value: float, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{where}: the mask value must be a finite number (0 = clean, 1 = patched), got {value!r}")
    return float(value)


def init_state(pm, value: float = 0.0) -> PatchState:
    """A state with every mask filled with ``value`` (finite) and no patch values yet."""
    value = _finite_value(value, "init_state")
    g = pm.graph
    masks = {m.module_name: torch.full(m.mask_shape(g.seq_len), float(value), dtype=_param_dtype(pm),
                                       device=_param_device(pm))
             for m in g.dest_modules}
    return PatchState(masks)


def set_all_masks(state: PatchState, value: float) -> PatchState:
    """A copy of ``state`` with every mask set to ``value`` (finite)."""
    value = _finite_value(value, "set_all_masks")
    return dataclasses.replace(state, masks={k: torch.full_like(v, float(value)) for k, v in state.masks.items()})


def edge_masks(pm, edges: Collection[Union[str, Edge]], value: float = 1.0,
               template: Optional[Dict[str, torch.Tensor]] = None) -> Dict[str, torch.Tensor]:
    """Masks that are ``value`` on ``edges`` (names or Edge objects, or one of them) and 0 elsewhere."""
    if isinstance(edges, (str, Edge)):  # one edge, not the characters of its name
        edges = [edges]
    resolved = pm.graph.edges_named(edges)
    base = template if template is not None else init_state(pm).masks
    masks = {k: torch.zeros_like(v) for k, v in base.items()}
    by_module: Dict[str, list] = {}
    for e in resolved:
        by_module.setdefault(e.dest.module_name, []).append(e.patch_idx)
    for module, idxs in by_module.items():
        index = tuple(torch.tensor(col) for col in zip(*idxs))
        m = masks[module]
        masks[module] = m.index_put(index, torch.full((len(idxs),), float(value), dtype=m.dtype, device=m.device))
    return FrozenMasks(masks)  # the type of state.masks, so the two pair up in jvp and tree_map


def patch_mode(pm, state: PatchState, patch_src_outs: torch.Tensor,
               edges: Optional[Collection[Union[str, Edge]]] = None) -> PatchState:
    """A copy of ``state`` that patches with ``patch_src_outs`` ``[n_srcs, batch, seq, d]``.

    With ``edges`` (names or Edge objects, or a single one; a name covers every position
    of a token-specific graph), those edges' masks become 1 and all other masks 0.
    The state's masks must be finite (NaN/inf: ValueError).
    """
    n = len(pm.graph.srcs)
    if not isinstance(patch_src_outs, torch.Tensor):
        raise TypeError(f"patch_src_outs must be a tensor [n_srcs={n}, batch, seq, d_model], "
                        f"got {type(patch_src_outs).__name__}")
    if patch_src_outs.dim() < 2 or patch_src_outs.shape[0] != n:
        raise ValueError(f"patch_src_outs must have shape [n_srcs={n}, batch, ...] (one slice per source "
                         f"node), got {tuple(patch_src_outs.shape)}")
    check_finite_masks(state.masks, "patch_mode")
    masks = state.masks if edges is None else edge_masks(pm, edges, 1.0, template=state.masks)
    return dataclasses.replace(state, masks=masks, patch_src_outs=patch_src_outs)


def mask_fn_mode(state: PatchState, mask_fn: Optional[str] = None, dropout_p: float = 0.0,
                 noise: Optional[MaskNoise] = None) -> PatchState:
    """A copy of ``state`` whose masks pass through ``mask_fn`` (and dropout) when used.

    "hard_concrete" and dropout are random: their randomness comes in ``noise``
    (:func:`sample_mask_noise`), so a call is reproducible and vmap can give each
    example its own sample.
    """
    if mask_fn not in MASK_FNS:
        raise ValueError(f"unknown mask_fn {mask_fn!r}; valid: {list(MASK_FNS)}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if mask_fn == "hard_concrete" and (noise is None or noise.concrete is None):
        raise ValueError("mask_fn='hard_concrete' needs noise.concrete: pass "
                         "noise=fp.sample_mask_noise(state, mask_fn='hard_concrete', ...)")
    if dropout_p > 0 and (noise is None or noise.dropout is None):
        raise ValueError("dropout_p > 0 needs noise.dropout: pass noise=fp.sample_mask_noise(state, dropout=True, ...)")
    if noise is not None:
        for part in (noise.concrete, noise.dropout):
            if part is not None and set(part) != set(state.masks):
                raise ValueError(f"noise keys {sorted(part)} do not match the mask keys {sorted(state.masks)}")
    return dataclasses.replace(state, mask_fn=mask_fn, dropout_p=float(dropout_p), noise=noise)


def sample_mask_noise(state: PatchState, *, mask_fn: Optional[str] = "hard_concrete", dropout: bool = False,
                      batch_size: Optional[int] = None, generator: Optional[torch.Generator] = None) -> MaskNoise:
    """Fresh uniform noise for :func:`mask_fn_mode`, one sample per example with ``batch_size``."""

    def uniform() -> Dict[str, torch.Tensor]:
        out = {}
        for k, m in state.masks.items():
            shape = m.shape if batch_size is None else (batch_size, *m.shape)
            u = torch.rand(shape, generator=generator, dtype=m.dtype, device=m.device)
            out[k] = u.clamp(1e-4, 1 - 1e-4)
        return out

    return MaskNoise(concrete=uniform() if mask_fn == "hard_concrete" else None,
                     dropout=uniform() if dropout else None)


def effective_mask(state: PatchState, module: str) -> torch.Tensor:
    """The mask of ``module`` after ``mask_fn`` and dropout (what the forward uses)."""
    mask = state.masks[module]
    if state.mask_fn == "sigmoid":
        mask = torch.sigmoid(mask)
    elif state.mask_fn == "hard_concrete":
        u = state.noise.concrete[module]
        s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + mask) / HC_TEMP)
        mask = (s * (HC_RIGHT - HC_LEFT) + HC_LEFT).clamp(0.0, 1.0)
    if state.dropout_p > 0:
        keep = (state.noise.dropout[module] >= state.dropout_p).to(mask.dtype)
        mask = mask * keep / (1.0 - state.dropout_p)
    return mask
