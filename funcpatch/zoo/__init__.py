"""The model zoo: small transformers trained in this repository, with their tasks.

Each model lives in its own folder next to this file::

    funcpatch/zoo/<name>/
        config.json, generation_config.json, model.safetensors   # a transformers GPT-2 or Llama
        tokenizer.json, tokenizer_config.json                     # word-level tokenizer, with BOS
        dataset.json      # clean/corrupt prompt pairs (auto-circuit JSON format), held out from training
        card.json         # name, task, architecture, measured accuracy, training seed
        reference_circuit.json   # the task's circuit by brute-force exact patching
                                 # (scripts/reference_circuits.py; with grouped-query attention
                                 # also reference_circuit_grouped_kv.json, for grouped_kv=True)

The folders are written by ``scripts/train_zoo.py`` (fixed seeds, CPU, a few minutes).
Loading goes through the ordinary transformers code paths
(``AutoModelForCausalLM.from_pretrained`` / ``AutoTokenizer.from_pretrained`` on the local
folder, ``local_files_only=True``): nothing is downloaded.

Example::

    from funcpatch import zoo
    model, tokenizer = zoo.load_hf("induction")
    train, test = funcpatch.load_datasets_from_json(tokenizer, zoo.dataset_path("induction"))
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Tuple

ZOO_DIR = Path(__file__).resolve().parent

__all__ = ["ZOO_DIR", "list_models", "info", "model_dir", "dataset_path", "load_hf"]


def list_models() -> List[str]:
    """Names of the models in the zoo (folders that hold a ``card.json``), sorted."""
    return sorted(p.parent.name for p in ZOO_DIR.glob("*/card.json"))


def model_dir(name: str) -> Path:
    """The folder of model ``name``. Raises ValueError for an unknown name."""
    names = list_models()
    if name not in names:
        raise ValueError(f"unknown zoo model {name!r}; valid names: {', '.join(names) or '(none)'}")
    return ZOO_DIR / name


def info(name: str) -> Dict[str, Any]:
    """The model's card (``card.json``) as a dict: name, task, architecture, accuracy, seed, ..."""
    with open(model_dir(name) / "card.json") as f:
        return json.load(f)


def dataset_path(name: str) -> Path:
    """Path of the model's task dataset (``dataset.json``, auto-circuit JSON format).

    Its prompts were held out from training; load it with
    :func:`funcpatch.datasets.load_datasets_from_json`.
    """
    return model_dir(name) / "dataset.json"


def load_hf(name: str) -> Tuple[Any, Any]:
    """Load model ``name`` with transformers, offline.

    Returns:
        ``(model, tokenizer)``: a ``transformers`` causal LM (``GPT2LMHeadModel``, or
        ``LlamaForCausalLM`` for ``induction_gqa``; the card's ``architecture``) in eval
        mode, float32, eager attention (so ``output_attentions=True`` works), on the CPU;
        and its ``PreTrainedTokenizerFast``. ``model(input_ids).logits`` is
        ``[batch, seq, d_vocab]``. The tokenizer does not add BOS itself: prompts
        start with ``tokenizer.bos_token_id`` (``load_datasets_from_json`` prepends it).
    """
    folder = model_dir(name)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(
        folder, local_files_only=True, attn_implementation="eager"
    )
    model = model.float().eval()
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    return model, tokenizer
