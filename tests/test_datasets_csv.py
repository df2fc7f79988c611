"""EAP-IG's CSV prompt files (tests/data/mib/*_head.csv: the first rows of EAP-IG's
ioi_llama.csv and greater_than_data.csv)."""

import csv
from pathlib import Path

import pytest
import torch

import funcpatch as fp
from funcpatch import zoo
from funcpatch.datasets import DatasetFormatError, load_datasets_from_csv, read_dataset_csv

DATA = Path(__file__).parent / "data" / "mib"


def _write(path, header, rows):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def _ioi_csv(tmp_path, tok, n=6):
    """An ioi_llama.csv-style file made with the zoo ioi tokenizer's ids."""
    prompts = fp.datasets.read_dataset_json(zoo.dataset_path("ioi"))["prompts"][:n]
    rows = [(k, p["clean"], p["corrupt"], tok.convert_tokens_to_ids(p["answers"][0]),
             tok.convert_tokens_to_ids(p["wrong_answers"][0])) for k, p in enumerate(prompts)]
    return _write(tmp_path / "ioi.csv", ["", "clean", "corrupted", "correct_idx", "incorrect_idx"], rows), prompts


def test_ioi_style_loads_with_its_tokenizer(tmp_path):
    _, tok = zoo.load_hf("ioi")
    path, prompts = _ioi_csv(tmp_path, tok)
    train, _ = load_datasets_from_csv(tok, path, batch_size=5, train_test_size=(5, 1), shuffle=False)
    batch = next(iter(train))
    want, _ = fp.datasets.load_datasets_from_json(tok, zoo.dataset_path("ioi"), batch_size=5,
                                                  train_test_size=(5, 1), shuffle=False)
    ref = next(iter(want))
    assert torch.equal(batch.clean, ref.clean) and torch.equal(batch.corrupt, ref.corrupt)
    assert torch.equal(torch.as_tensor(batch.answers), torch.as_tensor(ref.answers))
    assert torch.equal(torch.as_tensor(batch.wrong_answers), torch.as_tensor(ref.wrong_answers))


def test_ioi_style_ids_of_another_tokenizer_are_refused(tmp_path):
    _, tok = zoo.load_hf("ioi")
    with pytest.raises(DatasetFormatError, match="another tokenizer"):
        read_dataset_csv(DATA / "ioi_llama_head.csv", tok)  # Llama-3's ids
    # ids within this vocabulary but of other tokens: refused too
    path, _ = _ioi_csv(tmp_path, tok)
    rows = list(csv.reader(open(path)))
    rows[3][3] = str(tok.convert_tokens_to_ids("store"))  # a word of the vocabulary, not of this prompt
    _write(path, rows[0], rows[1:])
    with pytest.raises(DatasetFormatError, match=r"row 2, correct_idx"):
        read_dataset_csv(path, tok)
    assert read_dataset_csv(path, tok, check_token_ids=False)["prompts"][2]["answers"] == [int(rows[3][3])]


def _year_tokenizer():
    """A word-level tokenizer that knows greater_than_head.csv's words and every "00".."99"."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    words = sorted({w for r in csv.DictReader(open(DATA / "greater_than_head.csv"))
                    for w in (r["clean"] + " " + r["corrupted"]).split()} | {f"{y:02d}" for y in range(100)})
    vocab = {t: i for i, t in enumerate(["<bos>", "<pad>", "<unk>"] + words)}
    t = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<bos>", pad_token="<pad>", unk_token="<unk>")


def test_greater_than_style_answers_are_the_later_years():
    tok = _year_tokenizer()
    d = read_dataset_csv(DATA / "greater_than_head.csv", tok)
    first = d["prompts"][0]  # "... from the year 1352 to the year 13", label 52
    year = lambda y: tok.convert_tokens_to_ids(f"{y:02d}")  # noqa: E731
    assert first["answers"] == [year(y) for y in range(53, 100)]
    assert first["wrong_answers"] == [year(y) for y in range(0, 53)]
    train, _ = load_datasets_from_csv(tok, DATA / "greater_than_head.csv", batch_size=4, train_test_size=(4, 1),
                                      shuffle=False)
    assert len(next(iter(train)).answers) == 4


def test_greater_than_needs_year_tokens():
    _, tok = zoo.load_hf("ioi")  # knows no years
    with pytest.raises(DatasetFormatError, match="two-digit year"):
        read_dataset_csv(DATA / "greater_than_head.csv", tok)


def test_unknown_csv_columns_are_refused(tmp_path):
    _, tok = zoo.load_hf("ioi")
    path = _write(tmp_path / "x.csv", ["clean", "corrupt", "answer"], [("a", "b", "c")])
    with pytest.raises(DatasetFormatError, match="no EAP-IG CSV style"):
        read_dataset_csv(path, tok)
    path = _write(tmp_path / "y.csv", ["clean", "corrupted", "label"], [("a", "b", "1999")])
    with pytest.raises(DatasetFormatError, match="row 0, label"):
        read_dataset_csv(path, _year_tokenizer())


def test_prob_mass_diff_sums_probabilities():
    """MIB's greater-than metric, hand-checked: P(later years) - P(earlier years)."""
    from funcpatch.mib.evaluation import _metric_fn

    class Batch:
        answers = [torch.tensor([2, 3])]
        wrong_answers = [torch.tensor([0, 1])]

    logits = torch.log(torch.tensor([[0.1, 0.2, 0.3, 0.15, 0.25]]))
    assert _metric_fn("prob_mass_diff")(logits, Batch).item() == pytest.approx((0.3 + 0.15) - (0.1 + 0.2))
