"""Load clean/corrupt prompt-pair datasets from JSON files (the auto-circuit format).

File format::

    {
        "prompts": [                                   # required, non-empty
            {
                "clean": str | [int, ...] | [[float, ...], ...],  # text, token ids, or input vectors
                "corrupt": str | [int, ...] | [[float, ...], ...],
                "answers": [str | int, ...],           # non-empty; each one token
                "wrong_answers": [str | int, ...]      # non-empty; each one token
            },
            ...
        ],
        "seq_labels": [str, ...],                      # optional: a label per token position
        "word_idxs": {str: int, ...}                   # optional: named token positions
    }

Input vectors (one ``[float, ...]`` per position, all of one width) are the inputs of a
model that takes no tokens, :class:`funcpatch.MicroModel` (the seed library's
``micro_model_inputs.json``); their answers are indices into the output's last dimension.
Text is tokenized without the tokenizer's own special tokens; ``prepend_bos`` then puts
``tokenizer.bos_token_id`` in front of every prompt (token-id prompts get it too). Answers
must be single tokens. The whole file is validated before anything is returned: an error
names the file, the prompt index (in the file's ``prompts`` list) and the field.
"""

from __future__ import annotations

import functools
import json
import math
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch.utils.data import Subset

from funcpatch.data import PromptDataLoader, PromptDataset, collate_prompt_pairs

__all__ = ["DatasetFormatError", "load_datasets_from_csv", "load_datasets_from_json", "read_dataset_csv",
           "read_dataset_json"]

PathLike = Union[str, os.PathLike]
BOS_LABEL = "<|BOS|>"


class DatasetFormatError(ValueError):
    """A dataset file (or its combination with a tokenizer) that cannot be loaded."""


@dataclass(frozen=True)
class _Tokenized:
    """One prompt pair as token ids, before padding."""

    clean: list  # token ids, or input vectors
    corrupt: list
    answers: List[int]
    wrong_answers: List[int]


# ---------------------------------------------------------------------------- reading


def _where(path: Path, i: int, field: str) -> str:
    return f"{path}: prompts[{i}].{field}"


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def is_vector_prompt(v: Any) -> bool:
    """A prompt given as input vectors: a non-empty list of equal-width, non-empty lists of numbers."""
    return (isinstance(v, list) and bool(v) and all(isinstance(x, list) and x and all(map(_is_number, x))
                                                     for x in v) and len({len(x) for x in v}) == 1)


def _check_prompt(path: Path, i: int, p: Any) -> None:
    if not isinstance(p, dict):
        raise DatasetFormatError(f"{path}: prompts[{i}] must be an object, got {type(p).__name__}")
    for field in ("clean", "corrupt", "answers", "wrong_answers"):
        if field not in p:
            raise DatasetFormatError(f"{path}: prompts[{i}] has no {field!r} field")
    for field in ("clean", "corrupt"):
        v = p[field]
        if isinstance(v, str):
            if not v.strip():
                raise DatasetFormatError(f"{_where(path, i, field)} is an empty string")
        elif isinstance(v, list):
            if not (v and all(_is_int(t) for t in v)) and not is_vector_prompt(v):
                raise DatasetFormatError(
                    f"{_where(path, i, field)} must be a string, a non-empty list of int token ids, or a list of "
                    f"equal-width vectors of finite numbers (inputs of a model without tokens), got {v!r:.200}"
                )
        else:
            raise DatasetFormatError(
                f"{_where(path, i, field)} must be a string or a list of int token ids, got {type(v).__name__}"
            )
    for field in ("answers", "wrong_answers"):
        v = p[field]
        if not isinstance(v, list) or not v:
            raise DatasetFormatError(
                f"{_where(path, i, field)} must be a non-empty list of strings or int token ids, got {v!r}"
            )
        for j, a in enumerate(v):
            if not (isinstance(a, str) or _is_int(a)):
                raise DatasetFormatError(
                    f"{_where(path, i, field)}[{j}] must be a string or an int token id, got {a!r}"
                )


def read_dataset_json(path: Union[PathLike, Sequence[PathLike]]) -> Dict[str, Any]:
    """Read and validate a dataset file (or several: the first fully, the others' prompts appended).

    Returns:
        ``{"prompts": [...], "seq_labels": list | None, "word_idxs": dict,
        "sources": [(path, index_in_file), ...]}`` — ``sources[k]`` says where prompt ``k``
        came from, for error messages.
    Raises:
        DatasetFormatError: naming the file, the prompt index and the field at fault.
    """
    paths = [Path(path)] if isinstance(path, (str, os.PathLike)) else [Path(p) for p in path]
    if not paths:
        raise DatasetFormatError("no dataset path given")
    prompts: List[Any] = []
    sources: List[Tuple[Path, int]] = []
    first: Dict[str, Any] = {}
    for n, p in enumerate(paths):
        try:
            with open(p) as f:
                data = json.load(f)
        except json.JSONDecodeError as e:
            raise DatasetFormatError(f"{p}: not valid JSON ({e})") from e
        if not isinstance(data, dict):
            raise DatasetFormatError(f"{p}: the top level must be an object with a 'prompts' list")
        if "prompts" not in data:
            raise DatasetFormatError(f"{p}: has no 'prompts' field")
        if not isinstance(data["prompts"], list) or not data["prompts"]:
            raise DatasetFormatError(f"{p}: 'prompts' must be a non-empty list")
        for i, prompt in enumerate(data["prompts"]):
            _check_prompt(p, i, prompt)
            sources.append((p, i))
        prompts.extend(data["prompts"])
        if n == 0:
            first = data
    seq_labels = first.get("seq_labels")
    if seq_labels is not None and (
        not isinstance(seq_labels, list) or not all(isinstance(s, str) for s in seq_labels)
    ):
        raise DatasetFormatError(f"{paths[0]}: 'seq_labels' must be a list of strings")
    word_idxs = first.get("word_idxs", {})
    if not isinstance(word_idxs, dict) or not all(
        isinstance(k, str) and _is_int(v) for k, v in word_idxs.items()
    ):
        raise DatasetFormatError(f"{paths[0]}: 'word_idxs' must be an object mapping names to int positions")
    return {"prompts": prompts, "seq_labels": seq_labels, "word_idxs": dict(word_idxs), "sources": sources}


# ---------------------------------------------------------------------------- tokenizing


def _resolve_tokenizer(model_or_tokenizer: Any) -> Any:
    """A transformers tokenizer from a tokenizer, an object with ``.tokenizer``, or None."""
    if model_or_tokenizer is None:
        return None
    if hasattr(model_or_tokenizer, "tokenizer") and not callable(
        getattr(model_or_tokenizer, "convert_tokens_to_ids", None)
    ):
        tok = model_or_tokenizer.tokenizer
        if tok is None:
            raise ValueError(f"{type(model_or_tokenizer).__name__}.tokenizer is None: pass a tokenizer")
        return tok
    if callable(model_or_tokenizer) and hasattr(model_or_tokenizer, "convert_tokens_to_ids"):
        return model_or_tokenizer
    raise TypeError(
        f"expected a transformers tokenizer, an object with a .tokenizer (a TransformerLens model) "
        f"or None, got {type(model_or_tokenizer).__name__}"
    )


def _encode(tokenizer: Any, text: str, where: str) -> List[int]:
    """Token ids of ``text``; a word the tokenizer maps to its unknown token is an error.

    A silent ``<unk>`` would still run and give plausible-looking but wrong scores.
    """
    unk = getattr(tokenizer, "unk_token_id", None)
    fast = bool(getattr(tokenizer, "is_fast", False))
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=fast)
    ids = list(enc["input_ids"])
    if unk is None or unk not in ids:
        return ids
    unk_text = getattr(tokenizer, "unk_token", None)
    if fast:
        words = [text[a:b] for t, (a, b) in zip(ids, enc["offset_mapping"]) if t == unk]
    else:  # no offsets: name the tokenizer's own pieces
        words = [w for t, w in zip(ids, tokenizer.convert_ids_to_tokens(ids)) if t == unk]
    words = [w for w in words if w != unk_text]  # the unknown token written out on purpose
    if not words:
        return ids
    raise DatasetFormatError(
        f"{where} = {text!r}: {', '.join(repr(w) for w in words)} "
        f"{'is' if len(words) == 1 else 'are'} not in the tokenizer's vocabulary (mapped to the unknown "
        f"token {unk_text!r}); use words the model knows, or give token ids"
    )


def _ids(tokenizer: Any, value: Union[str, List[int]], where: str) -> List[int]:
    if isinstance(value, str):
        if tokenizer is None:
            raise DatasetFormatError(f"{where} is text, which needs a tokenizer; none was given")
        ids = _encode(tokenizer, value, where)
        if not ids:
            raise DatasetFormatError(f"{where} = {value!r} tokenizes to nothing")
        return ids
    if is_vector_prompt(value):
        return [list(map(float, x)) for x in value]
    ids = list(value)
    if tokenizer is not None:
        bad = [t for t in ids if not 0 <= t < len(tokenizer)]
        if bad:
            raise DatasetFormatError(f"{where} has token ids {bad} outside the vocabulary [0, {len(tokenizer)})")
    return ids


def _answer_id(tokenizer: Any, value: Union[str, int], where: str) -> int:
    if _is_int(value):
        if tokenizer is not None and not 0 <= value < len(tokenizer):
            raise DatasetFormatError(f"{where} = {value} is outside the vocabulary [0, {len(tokenizer)})")
        return int(value)
    if tokenizer is None:
        raise DatasetFormatError(f"{where} = {value!r} is text, which needs a tokenizer; none was given")
    ids = _encode(tokenizer, value, where)
    if len(ids) != 1:
        pieces = tokenizer.convert_ids_to_tokens(ids)
        raise DatasetFormatError(
            f"{where} = {value!r} is {len(ids)} tokens {pieces}; answers must be single tokens"
        )
    return ids[0]


def _tokenize(tokenizer: Any, prompt: Dict[str, Any], where: str, bos: Optional[int]) -> _Tokenized:
    head = [] if bos is None else [bos]
    return _Tokenized(
        clean=head + _ids(tokenizer, prompt["clean"], f"{where}.clean"),
        corrupt=head + _ids(tokenizer, prompt["corrupt"], f"{where}.corrupt"),
        answers=[_answer_id(tokenizer, a, f"{where}.answers[{j}]") for j, a in enumerate(prompt["answers"])],
        wrong_answers=[
            _answer_id(tokenizer, a, f"{where}.wrong_answers[{j}]") for j, a in enumerate(prompt["wrong_answers"])
        ],
    )


def _pad_id(tokenizer: Any) -> int:
    for name in ("pad_token_id", "eos_token_id", "bos_token_id"):
        v = getattr(tokenizer, name, None) if tokenizer is not None else None
        if v is not None:
            return int(v)
    return 0


def _left_pad(seqs: Sequence[List[int]], length: int, pad_id: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(ids [n, length], mask [n, length])`` with each sequence right-aligned."""
    ids = torch.tensor([[pad_id] * (length - len(s)) + s for s in seqs], dtype=torch.long)
    mask = torch.tensor([[0] * (length - len(s)) + [1] * len(s) for s in seqs], dtype=torch.long)
    return ids, mask


def shared_prefix_len(clean: torch.Tensor, corrupt: torch.Tensor) -> int:
    """First position where any clean prompt differs from its corrupt prompt.

    Args:
        clean, corrupt: ``[n_prompts, seq]`` tokens, or ``[n_prompts, seq, d_in]`` vectors.
    Returns:
        The length of the prefix that every pair shares (``seq`` when all pairs are equal).
    """
    differs = (clean != corrupt).transpose(0, 1).flatten(1).any(dim=1)  # [seq]
    nz = differs.nonzero()
    return int(nz[0, 0]) if len(nz) else clean.shape[1]


def _vector_kind(data: Dict[str, Any]) -> bool:
    """Whether the prompts are input vectors; all must be of one kind (and one width)."""
    kinds = [(is_vector_prompt(p[f]), len(p[f][0]) if is_vector_prompt(p[f]) else None)
             for p in data["prompts"] for f in ("clean", "corrupt")]
    k = next((k for k in range(len(kinds)) if kinds[k] != kinds[0]), None)
    if k is not None:
        src, i = data["sources"][k // 2]
        field = ("clean", "corrupt")[k % 2]
        raise DatasetFormatError(
            f"{src}: prompts[{i}].{field} is {'an input-vector' if kinds[k][0] else 'a text/token'} prompt"
            f"{f' of width {kinds[k][1]}' if kinds[k][0] else ''}, but the first prompt is "
            f"{'an input-vector' if kinds[0][0] else 'a text/token'} prompt"
            f"{f' of width {kinds[0][1]}' if kinds[0][0] else ''}; all prompts must be of one kind")
    return kinds[0][0]


# ---------------------------------------------------------------------------- splitting


def _split_sizes(train_test_size: Any, n: int) -> Tuple[int, int]:
    if not isinstance(train_test_size, (tuple, list)) or len(train_test_size) != 2:
        raise ValueError(f"train_test_size must be a pair (n_train, n_test) or fractions, got {train_test_size!r}")
    a, b = train_test_size
    if _is_int(a) and _is_int(b):
        n_train, n_test = a, b
    elif all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in (a, b)):
        if not (0 <= a <= 1 and 0 <= b <= 1 and a + b <= 1 + 1e-9):
            raise ValueError(f"fractions in train_test_size must be in [0, 1] and sum to at most 1, got {(a, b)}")
        n_train, n_test = math.floor(a * n + 1e-9), math.floor(b * n + 1e-9)
    else:
        raise ValueError(f"train_test_size must hold two ints or two fractions, got {train_test_size!r}")
    if n_train < 1 or n_test < 1:
        raise ValueError(
            f"train_test_size {tuple(train_test_size)} gives {n_train} train and {n_test} test prompts "
            f"out of {n}; each split needs at least one"
        )
    if n_train + n_test > n:
        raise ValueError(
            f"train_test_size asks for {n_train} + {n_test} prompts but the dataset has {n}; "
            f"ask for fewer or give fractions such as (0.5, 0.5)"
        )
    return n_train, n_test


def _batch_sizes(batch_size: Any) -> Tuple[int, int]:
    sizes = tuple(batch_size) if isinstance(batch_size, (tuple, list)) else (batch_size, batch_size)
    if len(sizes) != 2 or not all(_is_int(s) and s > 0 for s in sizes):
        raise ValueError(f"batch_size must be a positive int or a pair (train, test) of them, got {batch_size!r}")
    return sizes  # type: ignore[return-value]


# ---------------------------------------------------------------------------- loading


def load_datasets_from_json(
    model_or_tokenizer: Any,
    path: Union[PathLike, Sequence[PathLike]],
    device: Union[str, torch.device] = "cpu",
    prepend_bos: bool = True,
    batch_size: Union[int, Tuple[int, int]] = 32,
    train_test_size: Tuple[float, float] = (128, 128),
    return_seq_length: bool = False,
    tail_divergence: bool = False,
    shuffle: bool = True,
    random_seed: int = 42,
    pad: bool = True,
):
    """Load a prompt-pair dataset from JSON into train and test :class:`PromptDataLoader`s.

    Args:
        model_or_tokenizer: a transformers tokenizer, an object with a ``.tokenizer``
            (a TransformerLens model), or None when every prompt and answer is given as
            token ids (then ``prepend_bos`` must be False).
        path: the JSON file, or a list of files (the first gives ``seq_labels`` and
            ``word_idxs``; the prompts of all are concatenated), or a dict as
            :func:`read_dataset_json` returns one (as :func:`read_dataset_csv` does).
        device: where the tensors go.
        prepend_bos: put ``tokenizer.bos_token_id`` before every prompt; ``seq_labels``
            gains a ``"<|BOS|>"`` label and non-negative ``word_idxs`` shift by one.
        batch_size: one int, or ``(train, test)``.
        train_test_size: ``(n_train, n_test)`` as ints, or as fractions of the prompts.
        return_seq_length: also return ``seq_len`` (an error if the prompts' lengths vary).
        tail_divergence: cut off the prefix that every prompt shares (it must be the same
            tokens in every prompt, with no padding); the loaders' ``prefix`` holds it,
            ``diverge_idx`` is its length, ``seq_len``, ``seq_labels`` and ``word_idxs``
            refer to the cut prompts (word positions inside the prefix are dropped).
        shuffle: shuffle the prompts once, with ``random_seed``, before splitting; the
            loaders themselves serve batches in a fixed order. The global RNGs are untouched.
        pad: left-pad prompts of different lengths to the longest, with the tokenizer's pad
            token (else eos, bos, 0); batches then carry ``attention_mask`` (clean) and
            ``corrupt_attention_mask`` ``[batch, seq]``. Without ``pad``, differing
            lengths are an error.

    Returns:
        ``(train_loader, test_loader)``, or ``(train_loader, test_loader, seq_len)`` with
        ``return_seq_length``. Batches: ``clean``/``corrupt`` ``[batch, seq]``,
        ``answers``/``wrong_answers`` ``[batch, n]`` (or lists when counts differ). The
        loaders carry ``seq_len`` (None when lengths vary), ``diverge_idx`` (the length of
        the prefix every clean/corrupt pair shares), ``seq_labels``, ``word_idxs``, ``prefix``.

    Raises:
        DatasetFormatError: a malformed file (naming file, prompt index and field), a
            multi-token answer, text without a tokenizer, ...
        ValueError: invalid arguments.
    """
    data = path if isinstance(path, dict) else read_dataset_json(path)
    tokenizer = _resolve_tokenizer(model_or_tokenizer)
    vectors = _vector_kind(data)
    if vectors and prepend_bos:
        raise ValueError("the prompts are input vectors (a model without tokens, e.g. MicroModel): they take no BOS "
                         "token; pass prepend_bos=False")
    bos = None
    if prepend_bos:
        bos = getattr(tokenizer, "bos_token_id", None)
        if bos is None:
            raise ValueError(
                "prepend_bos=True needs a tokenizer with a bos_token_id"
                + (" (none was given)" if tokenizer is None else f" ({type(tokenizer).__name__} has none)")
                + "; pass prepend_bos=False for token-id prompts that already start as the model expects"
            )
    pairs = [
        _tokenize(tokenizer, p, f"{src}: prompts[{i}]", bos)
        for p, (src, i) in zip(data["prompts"], data["sources"])
    ]
    n_train, n_test = _split_sizes(train_test_size, len(pairs))
    train_bs, test_bs = _batch_sizes(batch_size)

    order = list(range(len(pairs)))
    if shuffle:
        random.Random(random_seed).shuffle(order)
    order = order[: n_train + n_test]
    chosen = [pairs[k] for k in order]

    lengths = {len(p.clean) for p in chosen} | {len(p.corrupt) for p in chosen}
    length = max(lengths)
    masks: Tuple[Optional[torch.Tensor], Optional[torch.Tensor]] = (None, None)
    if len(lengths) > 1 and not pad:
        k = next(k for k, p in zip(order, chosen) if len(p.clean) != length or len(p.corrupt) != length)
        src, i = data["sources"][k]
        raise DatasetFormatError(
            f"{src}: prompts[{i}] has {len(pairs[k].clean)} clean and {len(pairs[k].corrupt)} corrupt tokens "
            f"but the longest prompt has {length}; prompt lengths vary ({sorted(lengths)}): pass pad=True"
        )
    if vectors and len(lengths) > 1:
        raise DatasetFormatError(f"input-vector prompts must all have one length (they are not padded), got lengths "
                                 f"{sorted(lengths)}")
    if vectors:
        clean = torch.tensor([p.clean for p in chosen], dtype=torch.get_default_dtype())
        corrupt = torch.tensor([p.corrupt for p in chosen], dtype=torch.get_default_dtype())
    else:
        pad_id = _pad_id(tokenizer)
        clean, clean_mask = _left_pad([p.clean for p in chosen], length, pad_id)
        corrupt, corrupt_mask = _left_pad([p.corrupt for p in chosen], length, pad_id)
    seq_len: Optional[int] = length
    if len(lengths) > 1:
        masks, seq_len = (clean_mask, corrupt_mask), None

    diverge_idx = shared_prefix_len(clean, corrupt)
    seq_labels = data["seq_labels"]
    word_idxs = data["word_idxs"]
    if seq_labels is not None:
        seq_labels = ([BOS_LABEL] if prepend_bos else []) + seq_labels
        if seq_len is None:
            raise DatasetFormatError(
                f"'seq_labels' label fixed positions, but the prompts have different lengths {sorted(lengths)}"
            )
        if len(seq_labels) != seq_len:
            raise DatasetFormatError(
                f"'seq_labels' has {len(seq_labels)} labels (with BOS: {prepend_bos}) but the prompts have "
                f"{seq_len} tokens"
            )
    if prepend_bos:
        word_idxs = {k: v + 1 if v >= 0 else v for k, v in word_idxs.items()}

    prefix = None
    batch_diverge_idx = diverge_idx
    if tail_divergence and diverge_idx > 0:
        if seq_len is None:
            raise DatasetFormatError("tail_divergence needs prompts of one length (no padding)")
        prefix = clean[0, :diverge_idx]
        differ = (clean[:, :diverge_idx] != prefix).flatten(1).any(dim=1).nonzero()
        if len(differ):
            src, i = data["sources"][order[int(differ[0, 0])]]
            raise DatasetFormatError(
                f"tail_divergence needs every prompt to share the same first {diverge_idx} tokens, "
                f"but {src}: prompts[{i}] starts differently"
            )
        clean, corrupt = clean[:, diverge_idx:], corrupt[:, diverge_idx:]
        seq_len -= diverge_idx
        seq_labels = seq_labels[diverge_idx:] if seq_labels is not None else None
        word_idxs = {k: (v - diverge_idx if v >= 0 else v) for k, v in word_idxs.items()
                     if v >= diverge_idx or v < 0}
        batch_diverge_idx = 0
        prefix = prefix.to(device)

    if return_seq_length and seq_len is None:
        raise DatasetFormatError(
            f"return_seq_length=True but the prompts have different lengths {sorted(lengths)}"
        )

    dev = torch.device(device)
    dataset = PromptDataset(
        clean.to(dev),
        corrupt.to(dev),
        [torch.tensor(p.answers, device=dev) for p in chosen],
        [torch.tensor(p.wrong_answers, device=dev) for p in chosen],
        attention_mask=None if masks[0] is None else masks[0].to(dev),
        corrupt_attention_mask=None if masks[1] is None else masks[1].to(dev),
    )
    collate = functools.partial(collate_prompt_pairs, diverge_idx=batch_diverge_idx)

    def loader(indices: range, bs: int) -> PromptDataLoader:
        return PromptDataLoader(
            Subset(dataset, list(indices)),
            seq_len=seq_len,
            diverge_idx=diverge_idx,
            seq_labels=seq_labels,
            word_idxs=dict(word_idxs),
            prefix=prefix,
            batch_size=bs,
            shuffle=False,
            collate_fn=collate,
        )

    train_loader = loader(range(n_train), train_bs)
    test_loader = loader(range(n_train, n_train + n_test), test_bs)
    if return_seq_length:
        return train_loader, test_loader, seq_len
    return train_loader, test_loader


# ---------------------------------------------------------------------------- EAP-IG's CSV files

#: the columns of EAP-IG's CSV prompt files, by style
CSV_STYLES = {"ioi": ("clean", "corrupted", "correct_idx", "incorrect_idx"), "greater_than": ("clean", "corrupted", "label")}


def _csv_style(path: Path, columns: Sequence[str]) -> str:
    for style, need in CSV_STYLES.items():
        if all(c in columns for c in need):
            return style
    raise DatasetFormatError(f"{path}: columns {list(columns)} match no EAP-IG CSV style; expected "
                             + " or ".join(f"{list(c)} ({s})" for s, c in CSV_STYLES.items()))


def _csv_int(path: Path, row: int, field: str, value: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise DatasetFormatError(f"{path}: row {row}, column {field!r} must be an int, got {value!r}") from None


def _year_ids(tokenizer: Any, path: Path) -> List[int]:
    """The token of each two-digit year ``"00".."99"`` (as GPT-2 tokenizes a year's last two digits)."""
    out = []
    for year in range(100):
        ids = list(tokenizer(f"{year:02d}", add_special_tokens=False)["input_ids"])  # unknown: reported below
        if len(ids) != 1 or ids[0] == getattr(tokenizer, "unk_token_id", None):
            raise DatasetFormatError(f"{path}: greater-than's metric needs every two-digit year as one token, but "
                                     f"'{year:02d}' is {tokenizer.convert_ids_to_tokens(ids)} with this tokenizer")
        out.append(ids[0])
    return out


def read_dataset_csv(path: PathLike, model_or_tokenizer: Any, check_token_ids: bool = True) -> Dict[str, Any]:
    """Read one of EAP-IG's CSV prompt files into :func:`read_dataset_json`'s dict.

    Two styles, told by their columns (others are not read):

    - ``ioi_llama.csv``: ``clean``, ``corrupted``, ``correct_idx``, ``incorrect_idx``: the
      answer and the wrong answer as *token ids* of the tokenizer the file was made with.
      With ``check_token_ids`` (default) both ids must be tokens of the clean prompt under
      this tokenizer (IOI's answers are names in the prompt): ids from another tokenizer
      are refused instead of silently scoring other tokens.
    - ``greater_than_data.csv``: ``clean``, ``corrupted``, ``label`` (a year's last two
      digits, 0..98): answers are the two-digit year tokens after it (``label+1 .. 99``),
      wrong answers those up to it (``00 .. label``), as EAP-IG's greater-than metric sums
      them (``funcpatch.mib.evaluate(metric="prob_mass_diff")``). Every ``"00".."99"`` must
      be one token.

    Raises:
        DatasetFormatError: naming the file, the row (0 = the first after the header) and column.
    """
    import csv

    path = Path(path)
    tokenizer = _resolve_tokenizer(model_or_tokenizer)
    if tokenizer is None:
        raise ValueError("read_dataset_csv needs a tokenizer: EAP-IG's CSV prompts are text")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        style = _csv_style(path, reader.fieldnames or [])
        rows = list(reader)
    if not rows:
        raise DatasetFormatError(f"{path}: has no rows")
    years = _year_ids(tokenizer, path) if style == "greater_than" else None
    prompts = []
    for r, row in enumerate(rows):
        p = {"clean": row["clean"], "corrupt": row["corrupted"]}
        if style == "ioi":
            good, bad = (_csv_int(path, r, c, row[c]) for c in ("correct_idx", "incorrect_idx"))
            if check_token_ids:
                # the ids as this tokenizer reads the prompt (unknown words included: the ids' check names the cause)
                own = set(tokenizer(row["clean"], add_special_tokens=False)["input_ids"])
                for field, t in (("correct_idx", good), ("incorrect_idx", bad)):
                    if t not in own:
                        shown = tokenizer.convert_ids_to_tokens([t])[0] if 0 <= t < len(tokenizer) else None
                        raise DatasetFormatError(
                            f"{path}: row {r}, {field} = {t} ({shown!r} in this tokenizer) is no token of the clean "
                            "prompt: the ids were made with another tokenizer (ioi_llama.csv: Llama-3's). Use "
                            "the model the file was made for, or pass check_token_ids=False if they are right")
            p["answers"], p["wrong_answers"] = [good], [bad]
        else:
            label = _csv_int(path, r, "label", row["label"])
            if not 0 <= label <= 98:
                raise DatasetFormatError(f"{path}: row {r}, label = {label} must be a year's last two digits in "
                                         "[0, 98] (some later year must exist)")
            p["answers"], p["wrong_answers"] = years[label + 1:], years[:label + 1]
        prompts.append(p)
    return {"prompts": prompts, "seq_labels": None, "word_idxs": {}, "sources": [(path, r) for r in range(len(rows))]}


def load_datasets_from_csv(model_or_tokenizer: Any, path: PathLike, check_token_ids: bool = True, **kwargs):
    """:func:`load_datasets_from_json` for one of EAP-IG's CSV files (:func:`read_dataset_csv`);
    ``kwargs`` are :func:`load_datasets_from_json`'s (``batch_size``, ``train_test_size``, ...)."""
    data = read_dataset_csv(path, model_or_tokenizer, check_token_ids=check_token_ids)
    return load_datasets_from_json(model_or_tokenizer, data, **kwargs)
