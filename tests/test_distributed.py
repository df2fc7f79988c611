"""Data parallelism: two gloo ranks under torchrun get the single-process results."""

import os
import subprocess
import sys

import pytest
import torch
import torch.utils._pytree as pytree

from conftest import has_bridge
from funcpatch import distributed

pytestmark = pytest.mark.skipif(not has_bridge(), reason="the workload is a GPT-2 bridge")

HERE = os.path.dirname(os.path.abspath(__file__))


def test_no_process_group_changes_nothing():
    assert distributed.rank_world() == (0, 1)
    assert distributed.is_main()
    assert distributed.my_batches(['a', 'b', 'c']) == [0, 1, 2]
    assert distributed.my_rows(4) == slice(0, 4)
    items = [torch.ones(2), torch.zeros(2)]
    assert distributed.gather_in_order(items, 2) == items
    x = {"a": torch.arange(3.0)}
    assert distributed.sum_in_rank_order(x) is x


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("ranks")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.dirname(HERE), HERE]), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           os.path.join(HERE, "distributed_worker.py"), str(out)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, [torch.load(out / f"rank{r}.pt") for r in range(2)]


@pytest.fixture(scope="module")
def single():
    import distributed_worker
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return distributed_worker.run_all()
    finally:
        torch.set_num_threads(n)


def _leaves(x):
    return pytree.tree_flatten(x)


def _close(a, b, rtol=1e-6, unit=1e-12):
    """Leaves equal within ``rtol`` of their size (floats: of ``max(|b|, unit)``)."""
    (la, sa), (lb, sb) = _leaves(a), _leaves(b)
    assert sa == sb
    for x, y in zip(la, lb):
        if isinstance(x, torch.Tensor):
            scale = max(float(y.abs().max()), 1e-12) if y.numel() else 1.0
            assert x.shape == y.shape and float((x - y).abs().max()) <= rtol * scale, (x, y)
        elif isinstance(x, float):
            assert abs(x - y) <= rtol * max(abs(y), unit)
        else:
            assert x == y


BITWISE = ["eap", "eap_per_prompt", "mask_ig", "inputs_ig", "eap_tokenwise_mean", "tokenwise_mean", "exact",
           "circuits", "circuit_keys", "mib_patching", "mib_mean-positional"]


@pytest.mark.parametrize("name", BITWISE)
def test_batch_split_results_equal_one_process_exactly(two_ranks, single, name):
    # per-batch results are gathered and summed in batch order: the same bits
    for rank in two_ranks[1]:
        _close(rank[name], single[name], rtol=0.0)


def test_mib_evaluation_splits_its_batches(two_ranks, single):
    counts = [rank["mib_forwards"] for rank in two_ranks[1]]
    assert sum(counts) == single["mib_forwards"] and max(counts) < single["mib_forwards"], counts


@pytest.mark.parametrize("name", ["acdc", "probing_masks", "probing_losses", "circuit_probing"])
def test_prompt_split_results_equal_one_process(two_ranks, single, name):
    # a batch's prompts are split: partial sums added in rank order, equal on every rank
    ranks = two_ranks[1]
    _close(ranks[0][name], ranks[1][name], rtol=0.0)
    # ACDC's faithfulness is a divergence from the clean outputs (KL, in nats), 0 for a
    # perfect circuit, so its own size is no scale: within 1e-6 nats below 1 (split batches
    # go through products of other shapes, which round differently)
    _close(ranks[0][name], single[name], rtol=1e-6, unit=1.0 if name == "acdc" else 1e-12)
    if name == "acdc":  # the discrete decisions: the same removed edges at every tau
        assert [r[0] for r in ranks[0][name]] == [r[0] for r in single[name]]
        assert any(r[0] for r in single[name]), "no run removed an edge: the test would prove nothing"


def test_discover_under_torchrun_rank0_prints_and_writes(two_ranks, tmp_path):
    import json

    import distributed_worker
    out, ranks = two_ranks
    (code0, stdout0, err0), (code1, stdout1, err1) = ranks[0]["discover"], ranks[1]["discover"]
    assert code0 == code1 == 0, (err0, err1)
    assert stdout1 == "" and err1 == ""  # only rank 0 reports
    assert stdout0.count("CPR") == 1
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks: a matrix product's rounding depends on the threads
    try:
        code, stdout, err = distributed_worker.discover(tmp_path)
    finally:
        torch.set_num_threads(n)
    assert code == 0, err
    assert stdout0 == stdout  # the same table as one process
    got = json.loads((out / "discover" / "summary.json").read_text())
    want = json.loads((tmp_path / "summary.json").read_text())
    for key in ("table", "cpr", "cmd", "m_full", "m_empty"):
        assert got[key] == want[key], key
    assert (out / "discover" / "edges.json").read_text() == (tmp_path / "edges.json").read_text()


def test_ranks_with_different_batches_get_a_clear_error(two_ranks):
    for rank in two_ranks[1]:
        assert "different batches" in rank["mismatch"]
