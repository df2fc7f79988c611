"""Validating model call inputs: the tokens, parameters and mask values a call is given.

Without these checks a token id outside the vocabulary or a sequence past the context
window fails deep in the model as a torch index error, float tokens as a shape error,
``params=`` keys the model does not have are ignored silently by
``functional_call(strict=False)``, and a NaN mask poisons every output.

The value checks also run inside ``torch.func`` transforms: they look at the plain
tensor under vmap's and grad's wrappers (under vmap that holds every row at once).
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, Mapping, Optional, Sequence

import torch
from torch import nn
from torch._C import _functorch

__all__ = ["check_call_inputs", "check_finite_masks", "check_mask_dtypes", "check_params", "check_tokens",
           "underlying"]

# Where a transformer's forward takes its tokens when they are not the first argument.
TOKEN_KWARGS = ("input", "input_ids", "tokens")
# Positional embeddings indexed by position: past the context window they are an index error.
ABSOLUTE_POSITIONS = ("standard", "shortformer")


def underlying(x: torch.Tensor) -> torch.Tensor:
    """The plain tensor under ``torch.func``'s vmap/grad wrappers (all vmap rows at once)."""
    while _functorch.is_functorch_wrapped_tensor(x):
        x = _functorch.get_unwrapped(x)
    return x


def check_params(model: nn.Module, params: Optional[Mapping[str, torch.Tensor]]) -> None:
    """``params`` names only parameters or buffers of ``model`` (any subset of them).

    Raises:
        TypeError: ``params`` is not a mapping.
        KeyError: a name the model does not have, listing close valid names.
    """
    if params is None:
        return
    if not isinstance(params, Mapping):
        raise TypeError(f"params must be a mapping of parameter name -> tensor (e.g. dict(model.named_parameters())), "
                        f"got {type(params).__name__}")
    known = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    known |= {n for n, _ in model.named_buffers(remove_duplicate=False)}
    unknown = [k for k in params if k not in known]
    if unknown:
        import difflib
        hints = difflib.get_close_matches(str(unknown[0]), sorted(known), n=3)
        raise KeyError(f"params has {len(unknown)} name(s) the model does not have: {unknown[:5]}"
                       f"{' ...' if len(unknown) > 5 else ''}; names come from model.named_parameters() / "
                       f"named_buffers() (any subset is allowed){'; close: ' + str(hints) if hints else ''}")


def check_tokens(cfg: Any, tokens: torch.Tensor) -> None:
    """Token ids ``[batch, seq]`` (or ``[seq]``) fit a TransformerLens-style ``cfg``.

    Raises:
        TypeError: tokens that are not integers.
        ValueError: an id outside ``[0, cfg.d_vocab)``, or (absolute positional
            embeddings) more positions than ``cfg.n_ctx``.
    """
    if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
        raise TypeError(f"tokens must be integer token ids (torch.long), got dtype {tokens.dtype}; "
                        "convert ids with .long(), or tokenize text first")
    n_ctx = getattr(cfg, "n_ctx", None)
    if (n_ctx is not None and getattr(cfg, "positional_embedding_type", None) in ABSOLUTE_POSITIONS
            and tokens.dim() >= 1 and tokens.shape[-1] > n_ctx):
        raise ValueError(f"tokens have {tokens.shape[-1]} positions but the model's context window is "
                         f"n_ctx={n_ctx}; shorten the prompts")
    d_vocab = getattr(cfg, "d_vocab", None)
    ids = underlying(tokens)
    if d_vocab is not None and ids.numel():
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= d_vocab:
            raise ValueError(f"token ids must be in [0, d_vocab={d_vocab}), got ids from {lo} to {hi}")


def _token_limits(model: nn.Module) -> Any:
    """The vocabulary and context window, TransformerLens-style (``d_vocab``, ``n_ctx``,
    ``positional_embedding_type``): a TransformerLens model's ``cfg``, or read from a
    bare transformers model's config (learned positions: GPT-2's ``n_positions``)."""
    cfg = getattr(model, "cfg", None)
    if cfg is not None:
        return cfg
    config = model.config
    n_ctx = getattr(config, "n_positions", None) if config.model_type == "gpt2" else None
    return SimpleNamespace(d_vocab=config.vocab_size, n_ctx=n_ctx,
                           positional_embedding_type="standard" if n_ctx else "rotary")


def check_call_inputs(pm, args: Sequence[Any], kwargs: Mapping[str, Any],
                      params: Optional[Mapping[str, torch.Tensor]]) -> None:
    """The inputs of one call of ``pm.model`` (through funcpatch) are ones it can run.

    Checks ``params`` (:func:`check_params`), a transformer's token tensor (the first
    argument or ``input``/``input_ids``/``tokens``; :func:`check_tokens`), and that a
    token-specific graph (``seq_len``) gets inputs of exactly that many positions:
    tokens ``[batch, seq]``, MicroModel inputs ``[batch, seq, 2]``.
    """
    check_params(pm.model, params)
    x = args[0] if args else next((kwargs[k] for k in TOKEN_KWARGS if k in kwargs), None)
    if not isinstance(x, torch.Tensor):
        return
    if pm.backend.is_transformer:
        check_tokens(_token_limits(pm.model), x)
    seq_len = pm.graph.seq_len
    seq_dim = -1 if pm.backend.is_transformer else -2
    if seq_len is not None and x.dim() >= -seq_dim and x.shape[seq_dim] != seq_len:
        raise ValueError(f"this graph is token-specific for seq_len={seq_len} (fp.patchable(..., seq_len=...)) "
                         f"but the input has {x.shape[seq_dim]} positions (shape {tuple(x.shape)}); build "
                         f"a graph for that length, or pad/cut the inputs to {seq_len}")


def check_finite_masks(masks: Mapping[str, torch.Tensor], where: str) -> None:
    """Every mask value is finite. Raises ValueError naming the module and ``where``."""
    for k, m in masks.items():
        if isinstance(m, torch.Tensor) and m.is_floating_point() and not bool(torch.isfinite(underlying(m)).all()):
            raise ValueError(f"{where}: mask for {k} holds NaN or inf; masks must be finite "
                             "(0 = clean, 1 = patched, values between interpolate)")


def check_mask_dtypes(masks: Mapping[str, torch.Tensor], dtype: torch.dtype) -> None:
    """Every mask has ``dtype``, the patch values' (the model's activations') dtype.

    No silent cast: a float64 mask on a float32 model would lose the precision its
    caller asked for. Raises TypeError naming the module.
    """
    for k, m in masks.items():
        if isinstance(m, torch.Tensor) and m.dtype != dtype:
            raise TypeError(f"mask for {k} has dtype {m.dtype} but the model computes in {dtype} (the patch "
                            f"values' dtype); cast the masks with .to({dtype}), or run the model in {m.dtype}")
