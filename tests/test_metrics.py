"""Tests for uclr_cli.metrics: hand-computed values, an independent numpy ranker, properties."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from uclr_cli.metrics import (
    metrics_from_ranks,
    positive_ranks,
    rank_candidates,
    score_candidates,
    summarize,
)

KS = (1, 2, 3, 10)


def _t(x, dtype=torch.float32) -> torch.Tensor:
    return torch.tensor(x, dtype=dtype)


def numpy_ranks(pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
    """Reference ranker: stable sort of each row by descending score, positive placed last among equals."""
    out = np.empty(pos.shape[0], dtype=np.int64)
    for i in range(pos.shape[0]):
        scores = np.concatenate([neg[i], pos[i : i + 1]])  # positive last -> loses ties in a stable sort
        order = np.argsort(-scores, kind="stable")
        out[i] = int(np.nonzero(order == len(scores) - 1)[0][0]) + 1
    return out


# ---------------------------------------------------------------- hand-computed


def test_tie_counts_against_positive():
    ranks = positive_ranks(_t([0.5]), _t([[0.9, 0.5, 0.1]]))
    assert ranks.dtype == torch.int64
    assert ranks.tolist() == [3]


def test_hand_computed_metrics_rank_3():
    got = summarize(_t([3], torch.int64), KS)
    assert got[("hr", 1)] == 0.0 and got[("hr", 2)] == 0.0
    assert got[("hr", 3)] == 1.0 and got[("hr", 10)] == 1.0
    assert got[("mrr", 1)] == 0.0 and got[("mrr", 2)] == 0.0
    assert got[("mrr", 3)] == pytest.approx(1 / 3) and got[("mrr", 10)] == pytest.approx(0.3333333333333333)
    assert got[("ndcg", 1)] == 0.0 and got[("ndcg", 2)] == 0.0
    assert got[("ndcg", 3)] == pytest.approx(0.5) and got[("ndcg", 10)] == pytest.approx(0.5)  # 1/log2(4)


def test_hand_computed_metrics_mixed_rows():
    # rows: rank 1 (strictly best), rank 2, rank 4 (all three negatives tie or beat), rank 1
    pos = _t([0.9, 0.5, 0.0, 2.0])
    neg = _t([[0.1, 0.2, 0.3], [0.6, 0.4, 0.1], [0.0, 0.0, 0.0], [1.0, 1.0, 1.9]])
    ranks = positive_ranks(pos, neg)
    assert ranks.tolist() == [1, 2, 4, 1]
    per_row = metrics_from_ranks(ranks, KS)
    assert per_row[("hr", 1)].dtype == torch.float64
    assert per_row[("hr", 1)].tolist() == [1.0, 0.0, 0.0, 1.0]
    assert per_row[("mrr", 2)].tolist() == [1.0, 0.5, 0.0, 1.0]
    assert per_row[("ndcg", 10)].tolist() == pytest.approx([1.0, 0.6309297535714575, 0.43067655807339306, 1.0])
    got = summarize(ranks, KS)
    assert got[("hr", 1)] == pytest.approx(0.5)
    assert got[("hr", 2)] == pytest.approx(0.75)
    assert got[("hr", 3)] == pytest.approx(0.75)
    assert got[("hr", 10)] == pytest.approx(1.0)
    assert got[("mrr", 10)] == pytest.approx((1 + 0.5 + 0.25 + 1) / 4)  # 0.6875
    assert got[("ndcg", 3)] == pytest.approx((1 + 0.6309297535714575 + 0 + 1) / 4)
    assert set(got) == {(name, k) for name in ("mrr", "hr", "ndcg") for k in KS}


def test_constant_scorer_gets_worst_rank():
    ranks = positive_ranks(torch.zeros(5), torch.zeros(5, 99))
    assert ranks.tolist() == [100] * 5
    assert all(v == 0.0 for v in summarize(ranks, (1, 10, 99)).values())
    assert summarize(ranks, (100,))[("hr", 100)] == 1.0


def test_nan_scores_are_worst_for_the_positive():
    nan = float("nan")
    pos = _t([nan, 1.0, nan])
    neg = _t([[0.0, 0.1], [nan, 0.0], [nan, nan]])
    assert positive_ranks(pos, neg).tolist() == [3, 2, 3]


def test_no_negatives_gives_rank_one():
    assert positive_ranks(_t([0.3, float("nan")]), torch.empty(2, 0)).tolist() == [1, 1]


def test_summarize_empty_is_nan():
    got = summarize(torch.empty(0, dtype=torch.int64), KS)
    assert len(got) == 3 * len(KS)
    assert all(math.isnan(v) for v in got.values())


def test_bad_inputs_raise():
    with pytest.raises(ValueError):
        positive_ranks(torch.zeros(3), torch.zeros(2, 4))
    with pytest.raises(ValueError):
        metrics_from_ranks(_t([1], torch.int64), [0])


# ---------------------------------------------------- against the numpy ranker


@pytest.mark.parametrize("seed", range(5))
def test_matches_numpy_on_integer_scores_with_ties(seed):
    rng = np.random.default_rng(seed)
    pos = rng.integers(0, 5, size=200).astype(np.float32)
    neg = rng.integers(0, 5, size=(200, 7)).astype(np.float32)
    got = positive_ranks(torch.from_numpy(pos), torch.from_numpy(neg)).numpy()
    np.testing.assert_array_equal(got, numpy_ranks(pos, neg))


@pytest.mark.parametrize("seed", range(3))
def test_matches_numpy_on_random_floats(seed):
    rng = np.random.default_rng(100 + seed)
    pos = rng.standard_normal(300)
    neg = rng.standard_normal((300, 99))
    got = positive_ranks(torch.from_numpy(pos), torch.from_numpy(neg)).numpy()
    np.testing.assert_array_equal(got, numpy_ranks(pos, neg))


# ------------------------------------------------------------------ properties


@st.composite
def _score_rows(draw):
    """(pos (R,), neg (R, N)) from a small integer pool, so ties are common."""
    r, n = draw(st.integers(1, 12)), draw(st.integers(1, 8))
    ints = st.integers(-3, 3).map(float)
    pos = draw(arrays(np.float32, (r,), elements=ints))
    neg = draw(arrays(np.float32, (r, n), elements=ints))
    return torch.from_numpy(pos), torch.from_numpy(neg)


@settings(max_examples=100, deadline=None)
@given(_score_rows(), st.lists(st.integers(1, 12), min_size=1, max_size=5, unique=True))
def test_metrics_in_unit_interval_and_monotone_in_k(scores, ks):
    ranks = positive_ranks(*scores)
    ks = sorted(ks)
    per_row = metrics_from_ranks(ranks, ks)
    for v in per_row.values():
        assert bool(((v >= 0) & (v <= 1)).all())
    for name in ("hr", "mrr", "ndcg"):
        for lo, hi in zip(ks, ks[1:]):
            assert bool((per_row[(name, lo)] <= per_row[(name, hi)]).all())
    means = summarize(ranks, ks)
    assert all(0.0 <= v <= 1.0 for v in means.values())


@settings(max_examples=100, deadline=None)
@given(_score_rows(), st.integers(1, 20))
def test_perfect_scorer_gets_one(scores, k):
    _, neg = scores
    pos = neg.max(dim=1).values + 0.5
    ranks = positive_ranks(pos, neg)
    assert ranks.tolist() == [1] * len(ranks)
    assert all(v == 1.0 for v in summarize(ranks, [k]).values())


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 10), st.integers(1, 10), st.floats(-1e6, 1e6, allow_nan=False), st.data())
def test_constant_scorer_gets_zero(r, n, c, data):
    k = data.draw(st.integers(1, n))
    ranks = positive_ranks(torch.full((r,), c), torch.full((r, n), c))
    assert ranks.tolist() == [n + 1] * r
    assert all(v == 0.0 for v in summarize(ranks, [k]).values())


@settings(max_examples=100, deadline=None)
@given(_score_rows(), st.randoms(use_true_random=False))
def test_permuting_negatives_changes_nothing(scores, rnd):
    pos, neg = scores
    perm = list(range(neg.shape[1]))
    rnd.shuffle(perm)
    a = positive_ranks(pos, neg)
    b = positive_ranks(pos, neg[:, perm])
    assert torch.equal(a, b)
    assert summarize(a, KS) == summarize(b, KS)


# ---------------------------------------------------------- candidate scoring


def _candidates(seed, r=23, n=9, m=6, n_users=11, n_items=40, integer=False):
    """Random embeddings and candidate rows; integer-valued vectors give exact (tying) scores."""
    g = torch.Generator().manual_seed(seed)
    user_vecs = torch.randn(n_users, m, generator=g)
    item_vecs = torch.randn(n_items, m, generator=g)
    if integer:
        user_vecs, item_vecs = (v.mul(2).round() for v in (user_vecs, item_vecs))
    users = torch.randint(0, n_users, (r,), generator=g)
    pos = torch.randint(0, n_items, (r,), generator=g)
    negs = torch.randint(0, n_items, (r, n), generator=g)
    return user_vecs, item_vecs, users, pos, negs


def _direct_scores(user_vecs, item_vecs, users, pos, negs):
    p = torch.empty(len(users))
    q = torch.empty(negs.shape)
    for i in range(len(users)):
        u = user_vecs[users[i]]
        p[i] = (u * item_vecs[pos[i]]).sum()
        for j in range(negs.shape[1]):
            q[i, j] = (u * item_vecs[negs[i, j]]).sum()
    return p, q


@pytest.mark.parametrize("chunk", [1, 3, 1000, None])
def test_score_candidates_matches_direct_loop(chunk):
    args = _candidates(seed=7)
    want_p, want_q = _direct_scores(*args)
    got_p, got_q = score_candidates(*args, chunk=chunk)
    assert got_p.shape == want_p.shape and got_q.shape == want_q.shape
    torch.testing.assert_close(got_p, want_p, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_q, want_q, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunk", [1, 3, 1000, None])
def test_rank_candidates_equals_ranks_of_scores(chunk):
    user_vecs, item_vecs, users, pos, negs = _candidates(seed=11, r=50, n=19, integer=True)
    negs[::4, 0] = pos[::4]  # the positive itself among the negatives: an exact tie
    want = positive_ranks(*score_candidates(user_vecs, item_vecs, users, pos, negs, chunk=chunk))
    got = rank_candidates(user_vecs, item_vecs, users, pos, negs, chunk=chunk)
    assert got.dtype == torch.int64
    assert torch.equal(got, want)
    assert bool((got[::4] >= 2).all())


def test_score_candidates_accepts_int32_indices_and_no_grad():
    user_vecs, item_vecs, users, pos, negs = _candidates(seed=3)
    user_vecs.requires_grad_(True)
    p, q = score_candidates(user_vecs, item_vecs, users.int(), pos.int(), negs.int(), chunk=4)
    assert not p.requires_grad and not q.requires_grad
    want_p, want_q = _direct_scores(user_vecs.detach(), item_vecs, users, pos, negs)
    torch.testing.assert_close(p, want_p, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(q, want_q, rtol=1e-5, atol=1e-5)


def test_candidates_empty_rows():
    user_vecs, item_vecs, _, _, _ = _candidates(seed=1)
    users = torch.empty(0, dtype=torch.int64)
    p, q = score_candidates(user_vecs, item_vecs, users, users, torch.empty(0, 5, dtype=torch.int64))
    assert p.shape == (0,) and q.shape == (0, 5)
    ranks = rank_candidates(user_vecs, item_vecs, users, users, torch.empty(0, 5, dtype=torch.int64))
    assert ranks.shape == (0,) and ranks.dtype == torch.int64


def test_candidates_bad_inputs_raise():
    user_vecs, item_vecs, users, pos, negs = _candidates(seed=2)
    with pytest.raises(ValueError):
        score_candidates(user_vecs, item_vecs[:, :3], users, pos, negs)
    with pytest.raises(ValueError):
        score_candidates(user_vecs, item_vecs, users, pos[:-1], negs)
    with pytest.raises(ValueError):
        rank_candidates(user_vecs, item_vecs, users, pos, negs, chunk=0)
