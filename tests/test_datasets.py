"""Tests for funcpatch.datasets.load_datasets_from_json (the auto-circuit JSON format)."""

from __future__ import annotations

import json
import random
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from funcpatch.data import PromptDataLoader
from funcpatch.datasets import DatasetFormatError, load_datasets_from_json, shared_prefix_len

WORDS = ["the", "cat", "sat", "on", "mat", "dog", "ran", "big", "red", "hat"]
BOS, EOS, PAD, UNK = 0, 1, 2, 3
V = 4 + len(WORDS)


@pytest.fixture(scope="module")
def tok():
    """A real word-level transformers tokenizer: ids 0-3 special, then WORDS."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<bos>", "<eos>", "<pad>", "<unk>"] + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>", unk_token="<unk>")


def ids(text: str) -> list:
    return [4 + WORDS.index(w) for w in text.split()]


def write(tmp: Path, data, name="d.json") -> Path:
    path = Path(tmp) / name
    path.write_text(json.dumps(data))
    return path


def pair(clean="the cat sat", corrupt="the dog sat", answers=("on",), wrong=("hat",)):
    return {"clean": clean, "corrupt": corrupt, "answers": list(answers), "wrong_answers": list(wrong)}


def all_batches(loader):
    return list(loader)


def cat(loader, field):
    return torch.cat([getattr(b, field) for b in loader])


# ---------------------------------------------------------------------------- basics


def test_text_prompts_are_tokenized_with_bos(tok, tmp_path):
    path = write(tmp_path, {"prompts": [pair()] * 4})
    train, test = load_datasets_from_json(tok, path, train_test_size=(3, 1), batch_size=2)
    assert isinstance(train, PromptDataLoader) and isinstance(test, PromptDataLoader)
    batch = all_batches(train)[0]
    assert batch.clean.tolist() == [[BOS] + ids("the cat sat")] * 2
    assert batch.corrupt.tolist() == [[BOS] + ids("the dog sat")] * 2
    assert batch.answers.tolist() == [ids("on")] * 2
    assert batch.wrong_answers.tolist() == [ids("hat")] * 2
    assert batch.attention_mask is None and batch.corrupt_attention_mask is None
    assert train.seq_len == test.seq_len == 4
    assert train.diverge_idx == 2 and batch.batch_diverge_idx == 2  # BOS "the" shared
    assert [len(b.clean) for b in train] == [2, 1] and len(all_batches(test)) == 1


def test_token_id_prompts_without_tokenizer(tmp_path):
    data = {"prompts": [{"clean": [5, 6, 7], "corrupt": [5, 8, 7], "answers": [9], "wrong_answers": [10]}] * 2}
    train, test = load_datasets_from_json(None, write(tmp_path, data), prepend_bos=False, train_test_size=(1, 1))
    b = all_batches(train)[0]
    assert b.clean.tolist() == [[5, 6, 7]] and b.corrupt.tolist() == [[5, 8, 7]]
    assert b.answers.tolist() == [[9]] and train.diverge_idx == 1


def test_token_id_prompts_get_bos_from_tokenizer(tok, tmp_path):
    data = {"prompts": [{"clean": [5, 6], "corrupt": [5, 7], "answers": [9, "red"], "wrong_answers": [10]}] * 2}
    train, _ = load_datasets_from_json(tok, write(tmp_path, data), train_test_size=(1, 1))
    b = all_batches(train)[0]
    assert b.clean.tolist() == [[BOS, 5, 6]] and b.answers.tolist() == [[9, 4 + WORDS.index("red")]]


def test_bos_needs_a_tokenizer(tmp_path):
    data = {"prompts": [{"clean": [5], "corrupt": [6], "answers": [9], "wrong_answers": [10]}] * 2}
    with pytest.raises(ValueError, match="bos_token_id"):
        load_datasets_from_json(None, write(tmp_path, data), train_test_size=(1, 1))


def test_text_without_tokenizer_names_the_prompt(tmp_path):
    data = {"prompts": [{"clean": [5], "corrupt": [6], "answers": [9], "wrong_answers": [10]},
                        {"clean": "the cat", "corrupt": [6], "answers": [9], "wrong_answers": [10]}]}
    with pytest.raises(DatasetFormatError, match=r"prompts\[1\]\.clean.*needs a tokenizer"):
        load_datasets_from_json(None, write(tmp_path, data), prepend_bos=False, train_test_size=(1, 1))


def test_accepts_an_object_with_a_tokenizer(tok, tmp_path):
    model_like = SimpleNamespace(tokenizer=tok)  # what TransformerLens models look like
    train, _ = load_datasets_from_json(model_like, write(tmp_path, {"prompts": [pair()] * 2}),
                                       train_test_size=(1, 1))
    assert all_batches(train)[0].clean[0, 0].item() == BOS


def test_rejects_something_that_is_not_a_tokenizer(tmp_path):
    with pytest.raises(TypeError, match="tokenizer"):
        load_datasets_from_json(torch.nn.Linear(2, 2), write(tmp_path, {"prompts": [pair()] * 2}),
                                train_test_size=(1, 1))


def test_device_and_dtype(tok, tmp_path):
    train, _ = load_datasets_from_json(tok, write(tmp_path, {"prompts": [pair()] * 2}), device="cpu",
                                       train_test_size=(1, 1))
    b = all_batches(train)[0]
    assert b.clean.dtype == torch.long and b.clean.device.type == "cpu" and b.answers.dtype == torch.long


def test_several_files_are_concatenated(tok, tmp_path):
    a = write(tmp_path, {"prompts": [pair()] * 2, "seq_labels": ["x", "y", "z"]}, "a.json")
    b = write(tmp_path, {"prompts": [pair("the cat ran", "the dog ran")] * 3}, "b.json")
    train, test = load_datasets_from_json(tok, [a, str(b)], train_test_size=(2, 3), shuffle=False)
    assert cat(train, "clean")[:, -1].tolist() == ids("sat sat")
    assert cat(test, "clean")[:, -1].tolist() == ids("ran ran ran")
    assert train.seq_labels == ["<|BOS|>", "x", "y", "z"]


# ---------------------------------------------------------------------------- answers


def test_multi_token_answer_is_refused_with_index_and_answer(tok, tmp_path):
    prompts = [pair(), pair(), pair(answers=("on", "big hat"))]
    with pytest.raises(DatasetFormatError, match=r"prompts\[2\]\.answers\[1\] = 'big hat' is 2 tokens"):
        load_datasets_from_json(tok, write(tmp_path, {"prompts": prompts}), train_test_size=(1, 1))


def test_multi_token_wrong_answer_is_refused(tok, tmp_path):
    prompts = [pair(wrong=("red mat",)), pair()]
    with pytest.raises(DatasetFormatError, match=r"prompts\[0\]\.wrong_answers\[0\] = 'red mat'"):
        load_datasets_from_json(tok, write(tmp_path, {"prompts": prompts}), train_test_size=(1, 1))


def test_varying_answer_counts_become_lists(tok, tmp_path):
    prompts = [pair(answers=("on",)), pair(answers=("on", "mat")), pair()]
    train, _ = load_datasets_from_json(tok, write(tmp_path, {"prompts": prompts}), train_test_size=(2, 1),
                                       batch_size=2, shuffle=False)
    b = all_batches(train)[0]
    assert isinstance(b.answers, list) and [a.tolist() for a in b.answers] == [ids("on"), ids("on mat")]
    assert b.wrong_answers.tolist() == [ids("hat")] * 2  # same count everywhere: one tensor


def test_out_of_vocabulary_ids_are_refused(tok, tmp_path):
    data = {"prompts": [{"clean": [5, 999], "corrupt": [5, 6], "answers": [7], "wrong_answers": [8]}] * 2}
    with pytest.raises(DatasetFormatError, match=r"prompts\[0\]\.clean.*999"):
        load_datasets_from_json(tok, write(tmp_path, data), train_test_size=(1, 1))


# ---------------------------------------------------------------------------- malformed files


def _good():
    return {"prompts": [pair(), pair()]}


MALFORMED = [
    ("no prompts", lambda d: d.pop("prompts"), r"no 'prompts' field"),
    ("empty prompts", lambda d: d.update(prompts=[]), r"'prompts' must be a non-empty list"),
    ("prompts not a list", lambda d: d.update(prompts={"a": 1}), r"'prompts' must be a non-empty list"),
    ("prompt not an object", lambda d: d["prompts"].__setitem__(1, "hi"), r"prompts\[1\] must be an object"),
    ("missing clean", lambda d: d["prompts"][1].pop("clean"), r"prompts\[1\] has no 'clean' field"),
    ("missing corrupt", lambda d: d["prompts"][0].pop("corrupt"), r"prompts\[0\] has no 'corrupt' field"),
    ("missing answers", lambda d: d["prompts"][1].pop("answers"), r"prompts\[1\] has no 'answers' field"),
    ("missing wrong_answers", lambda d: d["prompts"][1].pop("wrong_answers"),
     r"prompts\[1\] has no 'wrong_answers' field"),
    ("clean a number", lambda d: d["prompts"][1].update(clean=3), r"prompts\[1\]\.clean must be a string"),
    ("clean empty", lambda d: d["prompts"][0].update(clean="  "), r"prompts\[0\]\.clean is an empty string"),
    ("corrupt with floats", lambda d: d["prompts"][1].update(corrupt=[1.5, 2]), r"prompts\[1\]\.corrupt"),
    ("corrupt with bools", lambda d: d["prompts"][1].update(corrupt=[True]), r"prompts\[1\]\.corrupt"),
    ("answers a string", lambda d: d["prompts"][1].update(answers="on"), r"prompts\[1\]\.answers must be"),
    ("answers empty", lambda d: d["prompts"][0].update(answers=[]), r"prompts\[0\]\.answers must be"),
    ("answer a list", lambda d: d["prompts"][1].update(wrong_answers=[[1]]), r"prompts\[1\]\.wrong_answers\[0\]"),
    ("seq_labels not strings", lambda d: d.update(seq_labels=[1, 2]), r"'seq_labels' must be a list of strings"),
    ("word_idxs not ints", lambda d: d.update(word_idxs={"a": "b"}), r"'word_idxs' must be"),
]


@pytest.mark.parametrize("name,break_it,message", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_files_name_field_and_index(tok, tmp_path, name, break_it, message):
    data = _good()
    break_it(data)
    with pytest.raises(DatasetFormatError, match=message):
        load_datasets_from_json(tok, write(tmp_path, data), train_test_size=(1, 1))


def test_not_json_and_not_an_object(tok, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(DatasetFormatError, match="not valid JSON"):
        load_datasets_from_json(tok, bad)
    with pytest.raises(DatasetFormatError, match="top level must be an object"):
        load_datasets_from_json(tok, write(tmp_path, [pair()]))


def test_a_bad_prompt_anywhere_fails_the_whole_load(tok, tmp_path):
    # the broken prompt is not among the ones a (1, 1) split would use: still refused
    prompts = [pair()] * 5 + [pair(answers=("big hat",))]
    with pytest.raises(DatasetFormatError, match=r"prompts\[5\]"):
        load_datasets_from_json(tok, write(tmp_path, {"prompts": prompts}), train_test_size=(1, 1), shuffle=False)


# ---------------------------------------------------------------------------- splitting


def _numbered(n):
    """n prompt pairs told apart by their token ids."""
    return {"prompts": [{"clean": [4 + i % 10, 5], "corrupt": [4 + i % 10, 6], "answers": [i % V],
                         "wrong_answers": [7]} for i in range(n)]}


def test_fraction_split(tmp_path):
    train, test = load_datasets_from_json(None, write(tmp_path, _numbered(10)), prepend_bos=False,
                                          train_test_size=(0.7, 0.3))
    assert len(train.dataset) == 7 and len(test.dataset) == 3


@pytest.mark.parametrize("size,message", [
    ((8, 5), "asks for 8 \\+ 5 prompts but the dataset has 10"),
    ((0, 5), "at least one"),
    ((0.5, 0.6), "sum to at most 1"),
    ((0.95, 0.05), "at least one"),
    ((3,), "pair"),
    ((1, 0.5), "sum to at most 1"),  # a float makes both fractions
    ((2, 0.5), r"in \[0, 1\]"),
    (("3", 2), "two ints or two fractions"),
])
def test_bad_split_sizes(tmp_path, size, message):
    with pytest.raises(ValueError, match=message):
        load_datasets_from_json(None, write(tmp_path, _numbered(10)), prepend_bos=False, train_test_size=size)


def test_bad_batch_size(tmp_path):
    with pytest.raises(ValueError, match="batch_size"):
        load_datasets_from_json(None, write(tmp_path, _numbered(4)), prepend_bos=False,
                                train_test_size=(2, 2), batch_size=0)


def test_batch_size_pair(tmp_path):
    train, test = load_datasets_from_json(None, write(tmp_path, _numbered(10)), prepend_bos=False,
                                          train_test_size=(6, 4), batch_size=(3, 4))
    assert [len(b.clean) for b in train] == [3, 3] and [len(b.clean) for b in test] == [4]


@given(n=st.integers(2, 40), seed=st.integers(0, 10**6), frac=st.floats(0.05, 0.95))
@settings(max_examples=40, deadline=None)
def test_split_is_a_seeded_partition(n, seed, frac):
    n_train = max(1, min(n - 1, int(frac * n)))
    with tempfile.TemporaryDirectory() as tmp:
        path = write(tmp, _numbered(n))
        rng_state, torch_state = random.getstate(), torch.random.get_rng_state()
        train, test = load_datasets_from_json(None, path, prepend_bos=False, train_test_size=(n_train, n - n_train),
                                              random_seed=seed, batch_size=7)
        again, _ = load_datasets_from_json(None, path, prepend_bos=False, train_test_size=(n_train, n - n_train),
                                           random_seed=seed, batch_size=7)
        assert random.getstate() == rng_state and torch.equal(torch.random.get_rng_state(), torch_state)
    got_train = cat(train, "answers")[:, 0].tolist()
    got_test = cat(test, "answers")[:, 0].tolist()
    assert len(got_train) == n_train and len(got_test) == n - n_train
    assert sorted(got_train + got_test) == sorted(i % V for i in range(n))  # a partition of the file
    assert cat(again, "answers")[:, 0].tolist() == got_train  # same seed, same split and order


def test_shuffle_false_keeps_file_order(tmp_path):
    train, test = load_datasets_from_json(None, write(tmp_path, _numbered(6)), prepend_bos=False,
                                          train_test_size=(4, 2), shuffle=False)
    assert cat(train, "answers")[:, 0].tolist() == [0, 1, 2, 3] and cat(test, "answers")[:, 0].tolist() == [4, 5]


def test_different_seeds_shuffle_differently(tmp_path):
    path = write(tmp_path, _numbered(30))
    orders = {tuple(cat(load_datasets_from_json(None, path, prepend_bos=False, train_test_size=(15, 15),
                                                random_seed=s)[0], "answers")[:, 0].tolist()) for s in range(4)}
    assert len(orders) > 1


# ---------------------------------------------------------------------------- padding and divergence

token_lists = st.lists(st.integers(4, V - 1), min_size=1, max_size=6)


@st.composite
def prompt_sets(draw):
    n = draw(st.integers(2, 8))
    prompts = []
    for _ in range(n):
        clean = draw(token_lists)
        same_len = draw(st.booleans())
        corrupt = draw(st.lists(st.integers(4, V - 1), min_size=len(clean), max_size=len(clean))) \
            if same_len else draw(token_lists)
        prompts.append({"clean": clean, "corrupt": corrupt, "answers": [draw(st.integers(4, V - 1))],
                        "wrong_answers": [draw(st.integers(4, V - 1))]})
    return prompts


@given(prompts=prompt_sets(), prepend_bos=st.booleans())
@settings(max_examples=60, deadline=None)
def test_left_padding_masks_and_divergence(tok, prompts, prepend_bos):
    n = len(prompts)
    with tempfile.TemporaryDirectory() as tmp:
        train, test = load_datasets_from_json(tok, write(tmp, {"prompts": prompts}), prepend_bos=prepend_bos,
                                              train_test_size=(n - 1, 1), shuffle=False, batch_size=3)
    head = [BOS] if prepend_bos else []
    expect_clean = [head + p["clean"] for p in prompts]
    expect_corrupt = [head + p["corrupt"] for p in prompts]
    length = max(map(len, expect_clean + expect_corrupt))
    varies = len(set(map(len, expect_clean + expect_corrupt))) > 1
    batches = all_batches(train) + all_batches(test)
    clean = torch.cat([b.clean for b in batches])
    corrupt = torch.cat([b.corrupt for b in batches])
    assert clean.shape == corrupt.shape == (n, length)
    assert train.seq_len == (None if varies else length)
    if varies:
        mask = torch.cat([b.attention_mask for b in batches])
        cmask = torch.cat([b.corrupt_attention_mask for b in batches])
    else:
        assert all(b.attention_mask is None and b.corrupt_attention_mask is None for b in batches)
        mask = cmask = torch.ones(n, length, dtype=torch.long)
    for i in range(n):
        for got, m, want in ((clean[i], mask[i], expect_clean[i]), (corrupt[i], cmask[i], expect_corrupt[i])):
            k = len(want)
            assert got[length - k:].tolist() == want  # right-aligned: padding on the left
            assert m.tolist() == [0] * (length - k) + [1] * k
            assert (got[: length - k] == PAD).all()
    # diverge_idx: the longest prefix that every (padded) clean/corrupt pair shares
    brute = min(next((j for j in range(length) if clean[i, j] != corrupt[i, j]), length) for i in range(n))
    assert train.diverge_idx == test.diverge_idx == brute
    assert all(b.batch_diverge_idx == brute for b in batches)


def test_clean_and_corrupt_of_different_lengths(tok, tmp_path):
    prompts = [pair("the cat", "the big red dog"), pair("the cat sat", "the dog sat")]
    train, _ = load_datasets_from_json(tok, write(tmp_path, {"prompts": prompts}), train_test_size=(1, 1),
                                       shuffle=False)
    b = all_batches(train)[0]
    assert b.clean.tolist() == [[PAD, PAD, BOS] + ids("the cat")]
    assert b.corrupt.tolist() == [[BOS] + ids("the big red dog")]
    assert b.attention_mask.tolist() == [[0, 0, 1, 1, 1]]
    assert b.corrupt_attention_mask.tolist() == [[1, 1, 1, 1, 1]]
    assert train.seq_len is None and train.diverge_idx == 0


def test_pad_false_refuses_varying_lengths(tok, tmp_path):
    prompts = [pair(), pair("the cat", "the dog")]
    with pytest.raises(DatasetFormatError, match=r"prompts\[1\].*pad=True"):
        load_datasets_from_json(tok, write(tmp_path, {"prompts": prompts}), train_test_size=(1, 1), pad=False)


def test_return_seq_length(tok, tmp_path):
    train, test, seq_len = load_datasets_from_json(tok, write(tmp_path, {"prompts": [pair()] * 2}),
                                                   train_test_size=(1, 1), return_seq_length=True)
    assert seq_len == 4 == train.seq_len
    varied = {"prompts": [pair(), pair("the cat", "the dog")]}
    with pytest.raises(DatasetFormatError, match="different lengths"):
        load_datasets_from_json(tok, write(tmp_path, varied), train_test_size=(1, 1), return_seq_length=True)


def test_shared_prefix_len():
    a = torch.tensor([[1, 2, 3], [1, 2, 4]])
    assert shared_prefix_len(a, torch.tensor([[1, 2, 5], [1, 9, 4]])) == 1
    assert shared_prefix_len(a, a) == 3
    assert shared_prefix_len(a, torch.tensor([[0, 2, 3], [1, 2, 4]])) == 0


# ---------------------------------------------------------------------------- labels, word_idxs, tail divergence


def test_seq_labels_and_word_idxs_shift_with_bos(tok, tmp_path):
    data = {"prompts": [pair()] * 2, "seq_labels": ["a", "b", "c"], "word_idxs": {"subj": 1, "end": -1}}
    train, test = load_datasets_from_json(tok, write(tmp_path, data), train_test_size=(1, 1))
    assert train.seq_labels == test.seq_labels == ["<|BOS|>", "a", "b", "c"]
    assert train.word_idxs == {"subj": 2, "end": -1}
    plain, _ = load_datasets_from_json(tok, write(tmp_path, data), train_test_size=(1, 1), prepend_bos=False)
    assert plain.seq_labels == ["a", "b", "c"] and plain.word_idxs == {"subj": 1, "end": -1}


def test_seq_labels_of_the_wrong_length(tok, tmp_path):
    data = {"prompts": [pair()] * 2, "seq_labels": ["a", "b"]}
    with pytest.raises(DatasetFormatError, match="'seq_labels' has 3 labels"):
        load_datasets_from_json(tok, write(tmp_path, data), train_test_size=(1, 1))


def test_tail_divergence_cuts_the_shared_prefix(tok, tmp_path):
    data = {"prompts": [pair("the cat sat on", "the cat ran on"), pair("the cat big on", "the cat red on")],
            "seq_labels": ["a", "b", "c", "d"], "word_idxs": {"cat": 1, "verb": 2, "last": -1}}
    train, test, seq_len = load_datasets_from_json(tok, write(tmp_path, data), train_test_size=(1, 1),
                                                   tail_divergence=True, return_seq_length=True, shuffle=False)
    assert train.diverge_idx == 3 and train.prefix.tolist() == [BOS] + ids("the cat")
    assert seq_len == train.seq_len == 2 and train.seq_labels == ["c", "d"]
    assert train.word_idxs == {"verb": 0, "last": -1}  # 'cat' (2 with BOS) was in the cut prefix
    b = all_batches(train)[0]
    assert b.clean.tolist() == [ids("sat on")] and b.corrupt.tolist() == [ids("ran on")]
    assert b.batch_diverge_idx == 0
    assert all_batches(test)[0].clean.tolist() == [ids("big on")]


def test_tail_divergence_needs_one_prefix(tok, tmp_path):
    data = {"prompts": [pair("the cat sat", "the cat ran"), pair("a", "b")]}
    data["prompts"][1] = pair("big cat sat", "big cat ran")
    with pytest.raises(DatasetFormatError, match=r"same first 3 tokens.*prompts\[1\]"):
        load_datasets_from_json(tok, write(tmp_path, data), train_test_size=(1, 1), tail_divergence=True,
                                shuffle=False)


def test_without_tail_divergence_nothing_is_cut(tok, tmp_path):
    data = {"prompts": [pair("the cat sat on", "the cat ran on")] * 2}
    train, _ = load_datasets_from_json(tok, write(tmp_path, data), train_test_size=(1, 1))
    assert train.prefix is None and train.diverge_idx == 3 and train.seq_len == 5
