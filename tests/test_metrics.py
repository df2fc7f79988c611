"""Tests for funcpatch.metrics. Expected numbers are worked out by hand in the comments."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from funcpatch.metrics import (
    MIB_PERCENTAGES,
    FaithfulnessUndefinedError,
    answer_diff,
    answer_value,
    area_under_curve,
    cmd,
    correct_answer_greater_than_incorrect_percent,
    correct_answer_percent,
    cpr,
    faithfulness,
    faithfulness_curve,
    kl_divergence,
    logit_diff,
    logit_diff_percent,
    logprob_diff,
    measurements_auc,
    mib_edge_counts,
    prob_diff,
    roc,
    roc_auc,
)

D = torch.float64
L = torch.tensor([[1.0, 2.0, 3.0], [0.0, 5.0, 1.0]], dtype=D)
A = torch.tensor([[2], [1]])
W = torch.tensor([[0], [2]])


def close(x, y, tol=1e-9):
    return abs(float(x) - float(y)) <= tol


# ----------------------------------------------------------------------------- answer metrics


def test_logit_diff_by_hand():
    # prompt 0: 3 - 1 = 2; prompt 1: 5 - 1 = 4; mean 3
    assert logit_diff(L, A, W).item() == 3.0
    assert logit_diff(L, A, W, per_prompt=True).tolist() == [2.0, 4.0]
    assert logit_diff(L, A, W).shape == ()


def test_logit_diff_several_answers_and_ragged():
    # prompt 0: mean(2, 3) - 1 = 1.5; prompt 1: mean(0, 5) - 1 = 1.5
    assert logit_diff(L, torch.tensor([[1, 2], [0, 1]]), W).item() == 1.5
    # ragged: prompt 0: 3 - mean(1, 2) = 1.5; prompt 1: mean(0, 5) - 1 = 1.5
    ans = [torch.tensor([2]), torch.tensor([0, 1])]
    wrong = [torch.tensor([0, 1]), torch.tensor([2])]
    assert logit_diff(L, ans, wrong, per_prompt=True).tolist() == [1.5, 1.5]
    # mixed tensor / list
    assert logit_diff(L, A, [torch.tensor([0]), torch.tensor([2])]).item() == 3.0


def test_logit_diff_with_seq_dim():
    l3 = torch.tensor([[[1.0, 2.0, 3.0], [3.0, 0.0, 0.0]]], dtype=D)  # [1, 2, 3]
    # same answers at each position: (3 - 1) and (0 - 3) -> mean -0.5
    assert logit_diff(l3, torch.tensor([[2]]), torch.tensor([[0]])).item() == -0.5
    # answers per position: (3 - 1) and (3 - 0) -> 2.5
    per_pos_a = torch.tensor([[[2], [0]]])
    per_pos_w = torch.tensor([[[0], [1]]])
    assert logit_diff(l3, per_pos_a, per_pos_w).item() == 2.5
    assert logit_diff(l3, per_pos_a, per_pos_w, per_prompt=True).tolist() == [2.5]
    # ragged list with seq dim
    assert logit_diff(l3, [torch.tensor([2])], [torch.tensor([0])]).item() == -0.5


def test_single_unbatched_prompt():
    assert logit_diff(L[1], A[1], W[1]).item() == 4.0
    assert logit_diff(L[1], A[1], W[1], per_prompt=True).shape == ()


def test_prob_and_logprob_diff_by_hand():
    # probabilities row 0: [1, 2, 1] / 4, row 1: [3, 1, 4] / 8
    l = torch.log(torch.tensor([[1.0, 2.0, 1.0], [3.0, 1.0, 4.0]], dtype=D))
    a, w = torch.tensor([[1], [2]]), torch.tensor([[0], [0]])
    # row 0: 0.5 - 0.25 = 0.25; row 1: 0.5 - 0.375 = 0.125; mean 0.1875
    assert close(prob_diff(l, a, w), 0.1875)
    assert torch.allclose(prob_diff(l, a, w, per_prompt=True), torch.tensor([0.25, 0.125], dtype=D))
    # row 0: log(0.5 / 0.25) = log 2; row 1: log(0.5 / 0.375) = log(4/3)
    assert close(logprob_diff(l, a, w), (math.log(2) + math.log(4 / 3)) / 2)
    assert close(answer_value(l, a, "prob"), 0.5)
    assert close(answer_value(l, a, "logprob"), math.log(0.5))
    assert close(answer_value(l, a, "softmax"), 0.5)  # auto-circuit alias
    assert close(answer_diff(l, a, w, "prob"), 0.1875)


def test_answer_value_logit_by_hand():
    assert answer_value(L, A).item() == 4.0  # (3 + 5) / 2
    assert answer_value(L, A, per_prompt=True).tolist() == [3.0, 5.0]
    assert answer_value(L, [torch.tensor([0, 2]), torch.tensor([1])]).item() == 3.5  # (2 + 5) / 2


def test_logit_diff_percent_by_hand():
    patched = torch.tensor([[1.0, 2.0, 3.0], [0.0, 2.0, 1.0]], dtype=D)
    # patched diffs [2, 1] (mean 1.5), clean diffs [2, 4] (mean 3): diff of means 50 %
    assert close(logit_diff_percent(patched, L, A, W), 50.0)
    # per prompt: 2/2 = 100 %, 1/4 = 25 %
    assert torch.allclose(logit_diff_percent(patched, L, A, W, per_prompt=True),
                          torch.tensor([100.0, 25.0], dtype=D))
    assert close(logit_diff_percent(L, L, A, W), 100.0)


def test_kl_divergence_by_hand():
    target = torch.log(torch.tensor([[0.5, 0.5], [0.2, 0.8]], dtype=D))
    patched = torch.log(torch.tensor([[0.25, 0.75], [0.2, 0.8]], dtype=D))
    # row 0: 0.5 log(0.5/0.25) + 0.5 log(0.5/0.75) = 0.5 log(4/3); row 1: 0
    row0 = 0.5 * math.log(4 / 3)
    assert close(kl_divergence(patched, target), row0 / 2)
    assert torch.allclose(kl_divergence(patched, target, per_prompt=True), torch.tensor([row0, 0.0], dtype=D))
    # zero target probability contributes 0, not nan
    t0 = torch.tensor([[0.0, -math.inf]], dtype=D)  # q = [1, 0]
    p0 = torch.log(torch.tensor([[0.5, 0.5]], dtype=D))
    assert close(kl_divergence(p0, t0), math.log(2))


def test_kl_divergence_with_seq_is_batchmean_over_positions():
    target = torch.log(torch.tensor([[[0.5, 0.5], [0.5, 0.5]]], dtype=D))  # [1, 2, 2]
    patched = torch.log(torch.tensor([[[0.25, 0.75], [0.5, 0.5]]], dtype=D))
    assert close(kl_divergence(patched, target), 0.25 * math.log(4 / 3))


def test_correct_answer_percent_by_hand():
    l = torch.tensor([[1.0, 2.0, 3.0], [0.0, 5.0, 1.0], [4.0, 0.0, 0.0], [1.0, 1.0, 0.0]])
    a = torch.tensor([[2], [1], [1], [1]])
    # argmax: 2 (hit), 1 (hit), 0 (miss), tie 0/1 -> 0 (miss)
    assert correct_answer_percent(l, a).item() == 50.0
    assert correct_answer_percent(l, a, per_prompt=True).tolist() == [100.0, 100.0, 0.0, 0.0]
    # several answers: argmax is one of them
    a2 = torch.tensor([[0, 2], [0, 2], [0, 1], [1, 0]])
    assert correct_answer_percent(l, a2, per_prompt=True).tolist() == [100.0, 0.0, 100.0, 100.0]


def test_correct_answer_greater_than_incorrect_by_hand():
    l = torch.tensor([[1.0, 2.0, 3.0], [0.0, 5.0, 1.0], [4.0, 0.0, 0.0], [1.0, 1.0, 0.0]])
    a = torch.tensor([[1], [2], [1], [0]])
    w = torch.tensor([[0], [0], [2], [2]])
    # 2 > 1 yes; 1 > 0 yes; 0 > 0 no (tie); 1 > 0 yes -> 75 %
    assert correct_answer_greater_than_incorrect_percent(l, a, w).item() == 75.0
    # min correct > max wrong: answers {1, 2} (min 2) vs wrong {0} (1) -> yes;
    # answers {0, 1} (min 0) vs {2} (1) -> no
    l2 = l[:2]
    assert correct_answer_greater_than_incorrect_percent(
        l2, torch.tensor([[1, 2], [0, 1]]), torch.tensor([[0], [2]]), per_prompt=True
    ).tolist() == [100.0, 0.0]


# ----------------------------------------------------------------------------- errors


def test_unknown_kind():
    with pytest.raises(ValueError, match="Unknown kind 'probability'"):
        answer_value(L, A, "probability")


def test_answer_shape_and_dtype_errors():
    with pytest.raises(ValueError, match="batch size 3 but logits have batch size 2"):
        logit_diff(L, torch.tensor([[0], [1], [2]]), W)
    with pytest.raises(TypeError, match="integer tensor"):
        logit_diff(L, A.double(), W)
    with pytest.raises(TypeError, match="integer tensor"):
        logit_diff(L, torch.tensor([[True], [False]]), W)
    with pytest.raises(ValueError, match=r"token id 3, outside the vocab \[0, 3\)"):
        logit_diff(L, torch.tensor([[3], [1]]), W)
    with pytest.raises(ValueError, match="token id -1"):
        logit_diff(L, A, torch.tensor([[-1], [0]]))
    with pytest.raises(ValueError, match="shape"):
        logit_diff(L, torch.tensor([2, 1]), W)
    with pytest.raises(ValueError, match="no token ids"):
        logit_diff(L, torch.zeros(2, 0, dtype=torch.long), W)
    with pytest.raises(ValueError, match="list of 1 tensors"):
        logit_diff(L, [torch.tensor([0])], W)
    with pytest.raises(ValueError, match=r"answers\[1\]"):
        logit_diff(L, [torch.tensor([0]), torch.tensor([7])], W)
    with pytest.raises(TypeError, match="integer tensor or a list"):
        logit_diff(L, "abc", W)
    with pytest.raises(ValueError, match="positions"):
        logit_diff(torch.zeros(1, 2, 3), torch.zeros(1, 3, 1, dtype=torch.long), torch.zeros(1, 1, dtype=torch.long))


def test_logit_errors():
    with pytest.raises(TypeError, match="floating-point"):
        logit_diff(torch.ones(2, 3, dtype=torch.long), A, W)
    with pytest.raises(ValueError, match="shape"):
        logit_diff(torch.ones(1, 2, 2, 3), A, W)
    with pytest.raises(ValueError, match="same shape"):
        kl_divergence(torch.ones(2, 3), torch.ones(2, 4))
    with pytest.raises(ValueError, match="same shape"):
        logit_diff_percent(torch.ones(2, 3), torch.ones(1, 3), A, W)
    with pytest.raises(ValueError, match="1-d tensor"):
        logit_diff(torch.ones(3), A, W)
    with pytest.raises(ValueError, match="empty batch"):
        logit_diff(torch.ones(0, 3), A[:0], W[:0])


# ----------------------------------------------------------------------------- torch.func


def test_grad_and_vmap_compose():
    a, w = A, W
    mask = torch.ones(3, dtype=D)
    g = torch.func.grad(lambda m: logit_diff(L * m, a, w))(mask)
    # mean over prompts of (3 m2 - m0) and (5 m1 - m2): d/dm = [-0.5, 2.5, 1.0]
    assert torch.allclose(g, torch.tensor([-0.5, 2.5, 1.0], dtype=D))

    # per-prompt gradients with vmap, answers batched too
    per = torch.func.vmap(torch.func.grad(lambda m, l, aa, ww: logit_diff(l * m, aa, ww)),
                          in_dims=(None, 0, 0, 0))(mask, L, a, w)
    assert torch.allclose(per, torch.tensor([[-1.0, 0.0, 3.0], [0.0, 5.0, -1.0]], dtype=D))
    assert torch.allclose(per.mean(0), g)

    kl = torch.func.vmap(lambda x, y: kl_divergence(x, y))(L, L.flip(0))
    assert torch.allclose(kl, kl_divergence(L, L.flip(0), per_prompt=True))


# ----------------------------------------------------------------------------- properties


def _rand(seed, *shape):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=D) * 3


@st.composite
def logits_and_answers(draw):
    batch = draw(st.integers(1, 4))
    vocab = draw(st.integers(2, 7))
    n_a, n_w = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    seed = draw(st.integers(0, 2**31 - 1))
    logits = _rand(seed, batch, vocab)
    ids = st.integers(0, vocab - 1)
    a = torch.tensor(draw(st.lists(st.lists(ids, min_size=n_a, max_size=n_a), min_size=batch, max_size=batch)))
    w = torch.tensor(draw(st.lists(st.lists(ids, min_size=n_w, max_size=n_w), min_size=batch, max_size=batch)))
    return logits, a, w


@settings(max_examples=50, deadline=None)
@given(law=logits_and_answers())
def test_answer_diffs_antisymmetric_and_logprob_equals_logit(law):
    l, a, w = law
    for fn in (logit_diff, prob_diff, logprob_diff):
        assert torch.allclose(fn(l, a, w), -fn(l, w, a))
        assert torch.allclose(fn(l, a, w, per_prompt=True), -fn(l, w, a, per_prompt=True))
    assert torch.allclose(logprob_diff(l, a, w), logit_diff(l, a, w))
    assert -1.0 <= prob_diff(l, a, w).item() <= 1.0
    # list form equals tensor form
    assert torch.allclose(logit_diff(l, list(a), list(w)), logit_diff(l, a, w))
    assert torch.allclose(logit_diff(l, a, a), torch.zeros((), dtype=D))


@settings(max_examples=50, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), batch=st.integers(1, 4), vocab=st.integers(1, 9), shift=st.floats(-5, 5))
def test_kl_nonnegative_and_zero_on_identity(seed, batch, vocab, shift):
    p, q = _rand(seed, batch, vocab), _rand(seed + 1, batch, vocab)
    assert kl_divergence(p, q).item() >= -1e-12
    assert (kl_divergence(p, q, per_prompt=True) >= -1e-12).all()
    assert kl_divergence(p, p).item() == 0.0
    # invariant to adding a constant to every logit
    assert torch.allclose(kl_divergence(p + shift, q), kl_divergence(p, q), atol=1e-9)


@settings(max_examples=50, deadline=None)
@given(law=logits_and_answers())
def test_accuracy_metrics_in_range(law):
    l, a, w = law
    c = correct_answer_percent(l, a, per_prompt=True)
    g = correct_answer_greater_than_incorrect_percent(l, a, w, per_prompt=True)
    for v in (c, g):
        assert set(v.tolist()) <= {0.0, 100.0}
    # if the argmax is an answer and all wrong answers differ from the answers... hand rule:
    top = l.argmax(-1)
    for i in range(l.shape[0]):
        assert c[i].item() == (100.0 if top[i].item() in a[i].tolist() else 0.0)
        lo = min(l[i, j].item() for j in a[i].tolist())
        hi = max(l[i, j].item() for j in w[i].tolist())
        assert g[i].item() == (100.0 if lo > hi else 0.0)


# ----------------------------------------------------------------------------- curves


def test_area_under_curve_by_hand():
    # (0,0)-(1,1): 0.5; (1,1)-(2,1): 1 -> 1.5, order of points does not matter
    assert area_under_curve([0, 1, 2], [0, 1, 1]) == 1.5
    assert area_under_curve([2, 0, 1], [1, 0, 1]) == 1.5
    assert area_under_curve(torch.tensor([0.0, 1.0]), torch.tensor([2.0, 2.0])) == 2.0
    assert area_under_curve([3], [7]) == 0.0
    # log x with eps 1: x' = log10(x + 1) = 0, 1, 2; trapezoids 1*(1+1)/2 + 1*(1+3)/2 = 3
    assert close(area_under_curve([0, 9, 99], [1, 1, 3], log_x=True, log_eps=1.0), 3.0)
    # default eps: log10(0.001) = -3, log10(1.001)
    assert close(area_under_curve([0, 1], [1, 1], log_x=True), math.log10(1.001) + 3)


def test_area_under_curve_errors():
    with pytest.raises(ValueError, match="3 values but ys has 2"):
        area_under_curve([0, 1, 2], [0, 1])
    with pytest.raises(ValueError, match="at least one"):
        area_under_curve([], [])
    with pytest.raises(ValueError, match="log_eps"):
        area_under_curve([0, 1], [0, 1], log_x=True, log_eps=0)
    with pytest.raises(ValueError, match="x \\+ log_eps > 0"):
        area_under_curve([-1, 1], [0, 1], log_x=True)
    with pytest.raises(ValueError, match="non-finite"):
        area_under_curve([0, float("nan")], [0, 1])


def test_measurements_auc_auto_circuit_semantics():
    # baseline y(0) = 1: heights 0, 1, 1 -> 1*(0+1)/2 + 2*(1+1)/2 = 2.5
    assert measurements_auc([(1, 2), (0, 1), (3, 2)]) == 2.5
    # log x: the (0, 1) segment is skipped; log10 x = 0, 1, 2, heights 1, 2, 2 -> 1.5 + 2
    assert close(measurements_auc([(0, 1), (1, 2), (10, 3), (100, 3)], log_x=True), 3.5)
    # below the baseline -> clamped to eps
    assert measurements_auc([(0, 5), (1, 0)]) == 1e-3
    # log y with y_min 0.1: log10(max(y, .1)) - log10(.1) = 0, 1 ; baseline y0 = 0.1
    assert close(measurements_auc([(0, 0.1), (1, 1.0)], log_y=True, y_min=0.1), (-0.1 + 0.9) / 2)
    with pytest.raises(ValueError, match="x = 0"):
        measurements_auc([(1, 1), (2, 2)])
    with pytest.raises(ValueError, match="y_min"):
        measurements_auc([(0, 1), (2, 2)], log_y=True)


def test_roc_by_hand():
    ps = {"a": torch.tensor([4.0, -3.0]), "b": torch.tensor([[2.0], [1.0]])}
    ref = {"a": torch.tensor([True, False]), "b": torch.tensor([[True], [False]])}
    fpr, tpr = roc(ps, ref)
    # edges by |score|: T F T F
    assert fpr.tolist() == [0.0, 0.0, 0.5, 0.5, 1.0]
    assert tpr.tolist() == [0.0, 0.5, 0.5, 1.0, 1.0]
    assert close(roc_auc(ps, ref), 0.75)


def test_roc_ties_and_extremes():
    ref = {"a": torch.tensor([True, False, True, False])}
    fpr, tpr = roc({"a": torch.tensor([2.0, 2.0, 1.0, 1.0])}, ref)
    assert fpr.tolist() == [0.0, 0.5, 1.0] and tpr.tolist() == [0.0, 0.5, 1.0]
    assert roc_auc({"a": torch.tensor([1.0, 1.0, 1.0, 1.0])}, ref) == 0.5
    assert roc_auc({"a": torch.tensor([-5.0, 0.1, 3.0, 0.2])}, ref) == 1.0  # |score| is used
    assert roc_auc({"a": torch.tensor([0.0, 5.0, 0.1, 3.0])}, ref) == 0.0


def test_roc_errors():
    s = {"a": torch.tensor([1.0, 2.0])}
    with pytest.raises(ValueError, match="at least one of each"):
        roc(s, {"a": torch.tensor([True, True])})
    with pytest.raises(ValueError, match="missing from it: \\['a'\\]"):
        roc(s, {"b": torch.tensor([True, False])})
    with pytest.raises(ValueError, match="shape"):
        roc(s, {"a": torch.tensor([True, False, True])})
    with pytest.raises(TypeError, match="bool"):
        roc(s, {"a": torch.tensor([1, 0])})
    with pytest.raises(ValueError, match="NaN"):
        roc({"a": torch.tensor([1.0, float("nan")])}, {"a": torch.tensor([True, False])})


@st.composite
def scores_and_ref(draw):
    n = draw(st.integers(2, 30))
    vals = draw(st.lists(st.integers(-6, 6), min_size=n, max_size=n))
    labels = draw(st.lists(st.booleans(), min_size=n, max_size=n).filter(lambda l: any(l) and not all(l)))
    cut = draw(st.integers(1, n - 1))
    s = torch.tensor(vals, dtype=D)
    lab = torch.tensor(labels)
    return {"p": s[:cut], "q": s[cut:]}, {"p": lab[:cut], "q": lab[cut:]}


@settings(max_examples=60, deadline=None)
@given(sr=scores_and_ref())
def test_roc_auc_is_the_mann_whitney_probability(sr):
    ps, ref = sr
    s = torch.cat([ps["p"], ps["q"]]).abs().tolist()
    lab = torch.cat([ref["p"], ref["q"]]).tolist()
    pos = [x for x, l in zip(s, lab) if l]
    neg = [x for x, l in zip(s, lab) if not l]
    u = sum(1.0 if p > q else 0.5 if p == q else 0.0 for p in pos for q in neg)
    assert close(roc_auc(ps, ref), u / (len(pos) * len(neg)))
    fpr, tpr = roc(ps, ref)
    assert fpr[0] == 0 and tpr[0] == 0 and fpr[-1] == 1 and tpr[-1] == 1
    assert (fpr.diff() >= 0).all() and (tpr.diff() >= 0).all()
    # reversing the ranking mirrors the AUC
    top = max(s)
    rev = {k: top - v.abs() for k, v in ps.items()}
    assert close(roc_auc(rev, ref), 1 - roc_auc(ps, ref))


@settings(max_examples=40, deadline=None)
@given(n=st.integers(2, 40), k=st.integers(1, 39), seed=st.integers(0, 1000))
def test_perfect_ranking_auc_is_one(n, k, seed):
    k = min(k, n - 1)
    s = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).to(D) + 1.0  # distinct
    ref = s > (n - k)  # exactly the top-k scores are the true circuit
    assert roc_auc({"m": s}, {"m": ref}) == 1.0


# ----------------------------------------------------------------------------- MIB faithfulness


def test_faithfulness_by_hand():
    assert faithfulness(3.0, 1.0, 5.0) == 0.5
    assert faithfulness(5.0, 1.0, 5.0) == 1.0
    assert faithfulness(1.0, 1.0, 5.0) == 0.0
    t = faithfulness(torch.tensor([3.0, 9.0]), torch.tensor(1.0), torch.tensor(5.0))
    assert t.tolist() == [0.5, 2.0]


def test_faithfulness_undefined():
    with pytest.raises(FaithfulnessUndefinedError, match="m_full == m_empty"):
        faithfulness(1.0, 2.0, 2.0)
    with pytest.raises(ValueError):
        faithfulness(torch.tensor(1.0), torch.tensor(2.0), torch.tensor(2.0))
    with pytest.raises(ZeroDivisionError):
        faithfulness_curve({c: 0.0 for c in range(11)}, 10, 1.0, 1.0)


def test_mib_edge_counts():
    assert MIB_PERCENTAGES == (0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100)
    assert mib_edge_counts(1000) == [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000]
    assert mib_edge_counts(32491) == [32, 64, 162, 324, 649, 1624, 3249, 6498, 16245, 32491]


def test_faithfulness_curve_cpr_cmd_by_hand():
    counts = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000]
    metric = {c: c / 100 for c in counts}  # m_empty 0, m_full 10 -> f = c / 1000 = the fraction
    ps, f = faithfulness_curve(metric, 1000, 0.0, 10.0)
    assert ps == list(MIB_PERCENTAGES)
    assert all(close(v, c / 1000) for v, c in zip(f, counts))
    # f(x) = x is linear, so the trapezoid rule is exact: (1 - 0.001^2) / 2
    assert close(cpr(ps, f), 0.4999995)
    # |1 - x| = 1 - x: 0.999 - 0.4999995
    assert close(cmd(ps, f), 0.4990005)
    # perfect circuit: CPR = x range, CMD = 0
    assert close(cpr(ps, [1.0] * 10), 0.999)
    assert cmd(ps, [1.0] * 10) == 0.0


def test_cpr_cmd_small():
    # x = 0, 0.5, 1; f = 0, 1, 1 -> 0.25 + 0.5; |1 - f| = 1, 0, 0 -> 0.25
    assert cpr([0, 50, 100], [0.0, 1.0, 1.0]) == 0.75
    assert cmd([0, 50, 100], [0.0, 1.0, 1.0]) == 0.25
    # overshooting counts against CMD
    assert cmd([0, 100], [1.0, 3.0]) == 1.0


def test_faithfulness_curve_and_area_errors():
    with pytest.raises(KeyError, match=r"edge counts \[1000\].*mib_edge_counts"):
        faithfulness_curve({c: 1.0 for c in [1, 2, 5, 10, 20, 50, 100, 200, 500]}, 1000, 0.0, 1.0)
    with pytest.raises(ValueError, match="strictly increasing"):
        cpr([10, 5], [1.0, 1.0])
    with pytest.raises(ValueError, match="outside"):
        cpr([10, 150], [1.0, 1.0])
    with pytest.raises(ValueError, match="2 values but f has 3"):
        cmd([1, 2], [1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="two points"):
        cpr([1], [1.0])
    with pytest.raises(ValueError, match="non-negative int"):
        mib_edge_counts(-5)
