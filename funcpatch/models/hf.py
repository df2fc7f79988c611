"""Wrap a transformers causal LM as a TransformerLens ``TransformerBridge``, offline."""

from __future__ import annotations

import logging
import warnings

from torch import nn


def _placeholder_tokenizer(vocab_size: int):
    """A word-level tokenizer ``t0 .. t{V-1}`` so the bridge needs no model hub."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", pad_token="t0", eos_token="t0")


def from_hf(hf_model: nn.Module, tokenizer=None):
    """A ``TransformerBridge`` around ``hf_model`` (a transformers causal LM), with no hub access.

    ``tokenizer``: a transformers tokenizer; None gives a placeholder word-level one
    (token ``i`` is the string ``"t{i}"``), enough for models driven by token ids.

    Note: the bridge takes over ``hf_model``'s submodules (TransformerLens wraps them in
    place); keep a copy first if you need the bare transformers model afterwards.
    Requires TransformerLens with ``TransformerBridge`` (3.x or 4.x).
    """
    try:
        from transformer_lens.model_bridge import TransformerBridge
    except ImportError as e:
        raise ImportError("fp.models.from_hf needs TransformerLens >= 3 (TransformerBridge); "
                          "installed TransformerLens has none") from e
    config = getattr(hf_model, "config", None)
    if config is None or not hasattr(config, "vocab_size"):
        raise TypeError(f"from_hf expects a transformers causal LM (with .config), got {type(hf_model).__name__}")
    if tokenizer is None:
        tokenizer = _placeholder_tokenizer(config.vocab_size)
    name = getattr(config, "_name_or_path", "") or config.model_type
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        level = logging.getLogger().level
        logging.getLogger().setLevel(logging.ERROR)
        try:
            bridge = TransformerBridge.boot_transformers(name, hf_model=hf_model, tokenizer=tokenizer)
        finally:
            logging.getLogger().setLevel(level)
    return bridge.eval()
