"""The seed library's MicroModel dataset format (prompts as input vectors) loads, and the
dataset-wide (token-wise mean) ablations work for MicroModel.

tests/data/micro_model_inputs.json: the first 8 prompts of auto-circuit's
datasets/micro_model_inputs.json (its 1000 prompts are all this same pair), unchanged.
"""

import json
from pathlib import Path

import pytest
import torch

import funcpatch as fp
from funcpatch.datasets import DatasetFormatError, load_datasets_from_json

PATH = Path(__file__).parent / "data" / "micro_model_inputs.json"
A = fp.AblationType
# MicroModel(2): each block multiplies the residual by 1 + w0 + w1 = (5, 7) elementwise,
# head h by w_h: w0 = (1, 2), w1 = (3, 4). The clean prompt is x = (3,3), (2,2), (1,1).
X = torch.tensor([[3.0, 3.0], [2.0, 2.0], [1.0, 1.0]])
CLEAN_SRC_OUTS = torch.stack([X, X * torch.tensor([1.0, 2.0]), X * torch.tensor([3.0, 4.0]),
                              X * torch.tensor([5.0, 14.0]), X * torch.tensor([15.0, 28.0])])  # [src, seq, 2]


@pytest.fixture(scope="module")
def loaders():
    return load_datasets_from_json(None, PATH, prepend_bos=False, batch_size=2, train_test_size=(4, 4))


@pytest.fixture(scope="module")
def micro():
    return fp.patchable(fp.MicroModel(2), slice_output="last_seq")


def test_the_seed_file_loads_as_vectors(loaders, micro):
    train, test = loaders
    assert train.seq_len == 3 and train.diverge_idx == 0
    batches = list(train) + list(test)
    assert len(batches) == 4
    for b in batches:
        assert b.clean.dtype == torch.get_default_dtype() and b.clean.shape == (2, 3, 2)
        torch.testing.assert_close(b.clean, X.expand(2, 3, 2))
        torch.testing.assert_close(b.corrupt, -X.expand(2, 3, 2))
        assert b.answers.tolist() == [[1], [1]] and b.wrong_answers.tolist() == [[0], [0]]
        torch.testing.assert_close(micro.model(b.clean)[micro.out_slice], torch.tensor([[25.0, 49.0]] * 2))


@pytest.mark.parametrize("ablation,sign", [(A.TOKENWISE_MEAN_CLEAN, 1.0), (A.TOKENWISE_MEAN_CORRUPT, -1.0),
                                           (A.TOKENWISE_MEAN_CLEAN_AND_CORRUPT, 0.0)])
def test_tokenwise_means_for_micro_model(loaders, micro, ablation, sign):
    train, _ = loaders
    want = (sign * CLEAN_SRC_OUTS)[:, None].expand(5, 2, 3, 2)
    torch.testing.assert_close(fp.src_ablations(micro, train, ablation), want)
    per_batch = fp.batch_src_ablations(micro, train, ablation)
    assert len(per_batch) == 1  # identical batches share a key
    torch.testing.assert_close(next(iter(per_batch.values())), want)
    # run_circuits (edge patching: the corrupt run, circuit edges patched with the ablation):
    # no edge gives the corrupt output; every edge patched to the mean gives the mean's output
    scores = {k: torch.ones_like(v) for k, v in fp.init_state(micro).masks.items()}
    outs = fp.run_circuits(micro, train, [0, micro.graph.n_edges], scores, ablation_type=ablation, progress=False)
    key = next(iter(train)).key
    torch.testing.assert_close(outs[0][key], -torch.tensor([[25.0, 49.0]] * 2))
    torch.testing.assert_close(outs[micro.graph.n_edges][key], sign * torch.tensor([[25.0, 49.0]] * 2))


def test_vector_prompts_need_no_bos_and_one_kind(tmp_path):
    data = json.loads(PATH.read_text())
    with pytest.raises(ValueError, match="input vectors.*prepend_bos=False"):
        load_datasets_from_json(None, PATH, train_test_size=(4, 4))
    mixed = {"prompts": data["prompts"][:2] + [{"clean": [1, 2, 3], "corrupt": [1, 2, 4], "answers": [1],
                                                 "wrong_answers": [0]}]}
    (tmp_path / "mixed.json").write_text(json.dumps(mixed))
    with pytest.raises(DatasetFormatError, match=r"prompts\[2\]\.clean is a text/token prompt.*one kind"):
        load_datasets_from_json(None, tmp_path / "mixed.json", prepend_bos=False, train_test_size=(1, 1))
    ragged = {"prompts": [{"clean": [[1.0, 2.0], [3.0]], "corrupt": [[1.0, 2.0], [3.0, 4.0]], "answers": [1],
                           "wrong_answers": [0]}] * 2}
    (tmp_path / "ragged.json").write_text(json.dumps(ragged))
    with pytest.raises(DatasetFormatError, match=r"prompts\[0\]\.clean must be .*equal-width vectors"):
        load_datasets_from_json(None, tmp_path / "ragged.json", prepend_bos=False, train_test_size=(1, 1))
    short = {"prompts": data["prompts"][:1] + [dict(data["prompts"][0], clean=X[:2].tolist(),
                                                    corrupt=(-X[:2]).tolist())]}
    (tmp_path / "short.json").write_text(json.dumps(short))
    with pytest.raises(DatasetFormatError, match=r"must all have one length"):
        load_datasets_from_json(None, tmp_path / "short.json", prepend_bos=False, train_test_size=(1, 1))


def test_prompt_dataset_takes_float_vectors():
    ds = fp.PromptDataset(X.expand(2, 3, 2), -X.expand(2, 3, 2), [1, 1], [0, 0])
    assert ds[0].clean.dtype == torch.float32 and ds[0].clean.shape == (3, 2)
    with pytest.raises(ValueError, match="mix kinds"):
        fp.PromptDataset([X, torch.arange(3)], [-X, torch.arange(3)], [1, 1], [0, 0])
