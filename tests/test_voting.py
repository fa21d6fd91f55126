"""Voting rules against hand-computed cases (DESIGN.md formulas), ties, exclusions and soft weights."""
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from memory import voting

LABELS = [[0, 1, 1, 2]]
SIMS = [[0.9, 0.8, 0.7, 0.6]]


def test_plurality_counts_votes():
    np.testing.assert_allclose(voting.vote(LABELS, SIMS, method="plurality", num_classes=3), [[1, 2, 1]])
    assert voting.predict(LABELS, SIMS, method="plurality", num_classes=3).tolist() == [1]


def test_distance_weights_are_exp_minus_cosine_distance():
    e = math.exp
    want = [[e(-0.1), e(-0.2) + e(-0.3), e(-0.4)]]
    np.testing.assert_allclose(voting.vote(LABELS, SIMS, method="distance", num_classes=3), want)
    want_xi = [[e(-0.2), e(-0.4) + e(-0.6), e(-0.8)]]
    np.testing.assert_allclose(voting.vote(LABELS, SIMS, method="distance", num_classes=3, xi=2.0), want_xi)


def test_softmax_is_proportional_to_exp_sim_over_tau_and_can_disagree_with_plurality():
    scores = voting.vote(LABELS, SIMS, method="softmax", num_classes=3)
    raw = np.array([[math.exp(0.9 / 0.07), math.exp(0.8 / 0.07) + math.exp(0.7 / 0.07), math.exp(0.6 / 0.07)]])
    np.testing.assert_allclose(scores / scores.sum(), raw / raw.sum(), rtol=1e-12)
    # The nearest neighbour's class wins at tau = 0.07 (0.297 for class 1 against 1.0 for class 0).
    assert voting.predict(LABELS, SIMS, method="softmax", num_classes=3).tolist() == [0]
    # A large temperature makes softmax behave like plurality.
    assert voting.predict(LABELS, SIMS, method="softmax", num_classes=3, tau=100.0).tolist() == [1]


def test_rank_weights_are_one_over_alpha_plus_zero_based_rank():
    np.testing.assert_allclose(voting.vote(LABELS, SIMS, method="rank", num_classes=3),
                               [[1 / 2, 1 / 3 + 1 / 4, 1 / 5]])
    np.testing.assert_allclose(voting.vote(LABELS, SIMS, method="rank", num_classes=3, alpha=1.0),
                               [[1.0, 1 / 2 + 1 / 3, 1 / 4]])
    assert voting.predict(LABELS, SIMS, method="rank", num_classes=3).tolist() == [1]


def test_k_uses_the_first_k_neighbours():
    assert voting.predict(LABELS, SIMS, method="plurality", num_classes=3, k=1).tolist() == [0]
    np.testing.assert_allclose(voting.vote(LABELS, SIMS, method="rank", num_classes=3, k=2), [[1 / 2, 1 / 3, 0]])


def test_tie_goes_to_the_class_whose_best_neighbour_is_nearest():
    # Two votes each; class 2's nearest neighbour is at rank 0.
    assert voting.predict([[2, 0, 0, 2]], [[0.9, 0.8, 0.7, 0.6]], method="plurality", num_classes=3).tolist() == [2]
    assert voting.predict([[0, 2, 2, 0]], [[0.9, 0.8, 0.7, 0.6]], method="plurality", num_classes=3).tolist() == [0]
    # Class id 0 is a class like any other (the released notebook's bug treated it as "no class").
    assert voting.predict([[0, 0, 1]], [[0.9, 0.8, 0.7]], method="plurality", num_classes=2).tolist() == [0]
    # Float weights summed in another order still tie: equal similarities give equal distance votes.
    sims_equal = [[0.5, 0.5, 0.5, 0.5]]
    assert voting.predict([[1, 0, 0, 1]], sims_equal, method="distance", num_classes=2).tolist() == [1]


def test_excluded_neighbours_are_skipped_and_later_ones_move_up():
    labels = [[-1, 0, 1, 1]]
    sims = [[0.95, 0.9, 0.8, 0.7]]
    np.testing.assert_allclose(voting.vote(labels, sims, method="rank", num_classes=2), [[1 / 2, 1 / 3 + 1 / 4]])
    # k counts valid neighbours: with k=2 the votes are class 0 (rank 0) and class 1 (rank 1).
    np.testing.assert_allclose(voting.vote(labels, sims, method="rank", num_classes=2, k=2), [[1 / 2, 1 / 3]])
    assert voting.predict(labels, sims, method="plurality", num_classes=2, k=1).tolist() == [0]
    # Same as a list from which the excluded item was never retrieved.
    for method in voting.METHODS:
        np.testing.assert_allclose(
            voting.vote(labels, sims, method=method, num_classes=2),
            voting.vote([[0, 1, 1]], [[0.9, 0.8, 0.7]], method=method, num_classes=2),
        )
    # A query with nothing valid predicts -1.
    assert voting.predict([[-1, -1]], [[0.9, 0.8]], method="rank", num_classes=2).tolist() == [-1]


def test_soft_weights_multiply_each_vote():
    labels, sims = [[0, 1, 1]], [[0.9, 0.8, 0.7]]
    gamma = 1.75 / (1 + 10)  # soft pruning of an item that caused 10 wrong decisions
    w = [[1.0, gamma, gamma]]
    np.testing.assert_allclose(voting.vote(labels, sims, method="plurality", num_classes=2, weights=w),
                               [[1.0, 2 * gamma]])
    assert voting.predict(labels, sims, method="plurality", num_classes=2).tolist() == [1]
    assert voting.predict(labels, sims, method="plurality", num_classes=2, weights=w).tolist() == [0]
    np.testing.assert_allclose(voting.vote(labels, sims, method="rank", num_classes=2, weights=w),
                               [[0.5, gamma / 3 + gamma / 4]])


def test_batch_is_vectorised_row_by_row():
    labels = [[0, 1, 1], [2, 2, 0], [1, -1, 0]]
    sims = [[0.9, 0.8, 0.7], [0.6, 0.5, 0.4], [0.9, 0.8, 0.7]]
    for method in voting.METHODS:
        batch = voting.vote(labels, sims, method=method, num_classes=3)
        for i in range(3):
            np.testing.assert_allclose(batch[i], voting.vote([labels[i]], [sims[i]], method=method, num_classes=3)[0])


@pytest.mark.parametrize("method", voting.METHODS)
def test_all_k_equals_predict_at_each_k(method):
    rng = np.random.default_rng(7)
    q, kmax, c = 300, 25, 4  # few classes: many exact ties in plurality
    labels = rng.integers(0, c, (q, kmax))
    labels[rng.random((q, kmax)) < 0.1] = -1
    sims = np.sort(rng.uniform(0.2, 0.9, (q, kmax)), axis=1)[:, ::-1]
    weights = rng.choice([1.0, 0.875, 0.159], (q, kmax))
    for w in (None, weights):
        allk = voting.predict_all_k(labels, sims, method=method, num_classes=c, weights=w)
        for k in range(1, kmax + 1):
            direct = voting.predict(labels, sims, method=method, num_classes=c, k=k, weights=w)
            np.testing.assert_array_equal(allk[:, k - 1], direct, err_msg=f"k={k}")


def test_bad_input_names_the_problem():
    with pytest.raises(ValueError, match="unknown voting method 'majority'"):
        voting.vote(LABELS, SIMS, method="majority", num_classes=3)
    with pytest.raises(ValueError, match="does not match labels shape"):
        voting.vote(LABELS, [[0.9, 0.8]], method="rank", num_classes=3)
    with pytest.raises(ValueError, match="weights shape"):
        voting.vote(LABELS, SIMS, method="rank", num_classes=3, weights=[[1.0]])
    with pytest.raises(ValueError, match="labels must lie in"):
        voting.vote(LABELS, SIMS, method="rank", num_classes=2)
    with pytest.raises(ValueError, match="k=5 exceeds"):
        voting.vote(LABELS, SIMS, method="rank", num_classes=3, k=5)
    with pytest.raises(ValueError, match="k must be >= 1"):
        voting.predict(LABELS, SIMS, method="rank", num_classes=3, k=0)
    with pytest.raises(ValueError, match="non-negative"):
        voting.vote(LABELS, SIMS, method="rank", num_classes=3, weights=[[1, -1, 1, 1]])
    with pytest.raises(ValueError, match=r"\(queries, neighbours\)"):
        voting.vote([0, 1], [0.9, 0.8], method="rank", num_classes=3)


# The two tie rules (DESIGN.md): ``nearest`` (ours) and ``leader`` (the released code's running leader).
# Each case ties two classes at the end; class 1 reaches the top score first, class 0 holds the nearest
# neighbour, so ``nearest`` says 0 and ``leader`` says 1. Weights in the ratio 3 : 2 : 2 : 1 (class 0 at
# ranks 0 and 3, class 1 at ranks 1 and 2): 3 + 1 = 2 + 2, and class 1 passes class 0's 3 at rank 2.
LN = math.log
TIED = {
    "plurality": ({}, [0.9, 0.8, 0.7, 0.6]),
    # w = exp(s / 0.5) = exp(2 s): sims 0.5 ln(3), 0.5 ln(2), 0.5 ln(2), 0 give 3, 2, 2, 1.
    "softmax": ({"tau": 0.5}, [0.5 * LN(3), 0.5 * LN(2), 0.5 * LN(2), 0.0]),
    # w = exp(s - 1): sims 1 + ln(w / 3) give 1, 2/3, 2/3, 1/3 (the same ratio).
    "distance": ({}, [1.0, 1 + LN(2 / 3), 1 + LN(2 / 3), 1 + LN(1 / 3)]),
}
PLURALITY_TIED_WEIGHTS = [1.5, 1.0, 1.0, 0.5]  # soft weights in the 3 : 2 : 2 : 1 ratio


@pytest.mark.parametrize("method", ["plurality", "softmax", "distance"])
def test_the_two_tie_rules_by_hand(method):
    kw, sims = TIED[method]
    labels = [[0, 1, 1, 0]]
    scores = voting.vote(labels, [sims], method=method, num_classes=2, **kw)
    assert scores[0, 0] == pytest.approx(scores[0, 1], rel=1e-12)  # tied by construction
    assert voting.predict(labels, [sims], method=method, num_classes=2, **kw).tolist() == [0]
    assert voting.predict(labels, [sims], method=method, num_classes=2, ties="nearest", **kw).tolist() == [0]
    assert voting.predict(labels, [sims], method=method, num_classes=2, ties="leader", **kw).tolist() == [1]
    # Every k: k=1 class 0; k=2 class 0 (3 against 2; plurality ties 1 : 1, class 0 there first and
    # nearest: 0 under both rules); k=3 class 1 ahead (4 against 3); k=4 the final tie.
    want = {"nearest": [0, 0, 1, 0], "leader": [0, 0, 1, 1]}
    for ties, row in want.items():
        assert voting.predict_all_k(labels, [sims], method=method, num_classes=2, ties=ties, **kw).tolist() == [row]
        got = voting.predict_all_k_methods(labels, [sims], methods=(method, "rank"), num_classes=2, ties=ties, **kw)
        assert got[method].tolist() == [row]


def test_the_two_tie_rules_by_hand_for_rank_voting():
    # alpha = 2: w = 1/2, 1/3, 1/4, then 1/5 .. 1/11 for seven single votes, and 1/12 at rank 10.
    # Class 0 (ranks 0, 10): 1/2 + 1/12 = 7/12. Class 1 (ranks 1, 2): 1/3 + 1/4 = 7/12, reached at rank 2.
    labels = [[0, 1, 1, 2, 3, 4, 5, 6, 7, 8, 0]]
    sims = [np.linspace(0.9, 0.4, 11)]
    scores = voting.vote(labels, sims, method="rank", num_classes=9)
    np.testing.assert_allclose(scores[0, :2], [7 / 12, 7 / 12])
    assert voting.predict(labels, sims, method="rank", num_classes=9, ties="nearest").tolist() == [0]
    assert voting.predict(labels, sims, method="rank", num_classes=9, ties="leader").tolist() == [1]
    leader = voting.predict_all_k(labels, sims, method="rank", num_classes=9, ties="leader")[0]
    nearest = voting.predict_all_k(labels, sims, method="rank", num_classes=9, ties="nearest")[0]
    # Class 1 leads from k = 3 (7/12 > 1/2); at k = 11 class 0 only draws level.
    assert leader.tolist() == [0, 0] + [1] * 9
    assert nearest.tolist() == [0, 0] + [1] * 8 + [0]


@pytest.mark.parametrize("ties", voting.TIES)
def test_tie_rules_under_exclusions_use_the_kept_neighbours_own_values(ties):
    # Excluded neighbours (-1) in between: their similarity (0.99) and weight (9.0) must not be read
    # for the kept neighbour that moves up into their position (the released notebook's bug).
    labels = [[0, -1, 1, 1, -1, 0]]
    sims = [1.0, 0.99, 1 + LN(2 / 3), 1 + LN(2 / 3), 0.5, 1 + LN(1 / 3)]
    want = {"nearest": 0, "leader": 1}[ties]
    assert voting.predict(labels, [sims], method="distance", num_classes=2, ties=ties).tolist() == [want]
    # With the notebook's bug the weights would be exp(-0), exp(-0.01), ...: 1 + 2/3 for class 0 against
    # exp(-0.01) + 2/3 for class 1, no tie, class 0 under both rules.
    buggy = [1.0, 0.99, 1 + LN(2 / 3), 1 + LN(2 / 3)]
    assert voting.predict([[0, 1, 1, 0]], [buggy], method="distance", num_classes=2, ties="leader").tolist() == [0]
    # Soft weights travel with their neighbour too: 1.5 + 0.5 against 1 + 1 (the 9.0 is excluded).
    w = [[1.5, 9.0, 1.0, 1.0, 9.0, 0.5]]
    flat = [[0.5] * 6]
    assert voting.predict(labels, flat, method="plurality", num_classes=2, weights=w, ties=ties).tolist() == [want]
    allk = voting.predict_all_k(labels, flat, method="plurality", num_classes=2, weights=w, ties=ties)
    assert allk[0, 3] == want  # k counts kept neighbours: the 4 kept ones vote at k = 4
    # Rank votes count kept ranks: 1/2 + 1/5 (class 0) against 1/3 + 1/4 (class 1): class 0 under both.
    assert voting.predict(labels, [sims], method="rank", num_classes=2, ties=ties).tolist() == [0]
    # With a soft weight of 0.7 on the first kept neighbour: 0.35 + 1/5 = 0.55 (class 0) against 7/12.
    w_rank = [[0.7, 9.0, 1.0, 1.0, 9.0, 1.0]]
    np.testing.assert_allclose(voting.vote(labels, [sims], method="rank", num_classes=2, weights=w_rank),
                               [[0.7 / 2 + 1 / 5, 1 / 3 + 1 / 4]])
    assert voting.predict(labels, [sims], method="rank", num_classes=2, weights=w_rank, ties=ties).tolist() == [1]


@pytest.mark.parametrize("method", voting.METHODS)
def test_soft_weights_make_a_tie_each_rule_settles(method):
    # Equal similarities (plurality, distance and softmax weigh them alike), soft weights 3 : 2 : 2 : 1.
    labels, sims, w = [[0, 1, 1, 0]], [[0.5] * 4], [PLURALITY_TIED_WEIGHTS]
    if method == "rank":
        # 1/2 + 1/5 * w3 = 1/3 + 1/4 needs w3 = 5/12; class 1 passes class 0's 1/2 at rank 2.
        w = [[1.0, 1.0, 1.0, 5 / 12]]
    scores = voting.vote(labels, sims, method=method, num_classes=2, weights=w)
    assert scores[0, 0] == pytest.approx(scores[0, 1], rel=1e-12)
    assert voting.predict(labels, sims, method=method, num_classes=2, weights=w, ties="nearest").tolist() == [0]
    assert voting.predict(labels, sims, method=method, num_classes=2, weights=w, ties="leader").tolist() == [1]
    for ties, want in (("nearest", [0, 0, 1, 0]), ("leader", [0, 0, 1, 1])):
        got = voting.predict_all_k(labels, sims, method=method, num_classes=2, weights=w, ties=ties)
        assert got.tolist() == [want]


def test_an_unknown_tie_rule_names_the_choices():
    for call in (lambda: voting.predict(LABELS, SIMS, method="rank", num_classes=3, ties="foo"),
                 lambda: voting.vote_and_predict(LABELS, SIMS, method="rank", num_classes=3, ties="foo"),
                 lambda: voting.predict_all_k(LABELS, SIMS, method="rank", num_classes=3, ties="foo"),
                 lambda: voting.predict_all_k_methods(LABELS, SIMS, num_classes=3, ties="foo")):
        with pytest.raises(ValueError, match="unknown tie rule 'foo'; choose one of nearest, leader"):
            call()


@st.composite
def neighbour_lists(draw):
    """A few queries' ranked neighbours: few classes (many exact ties), exclusions, sims on a coarse
    grid sorted best first (equal sims: equal distance and softmax weights), optional soft weights."""
    q, k, c = draw(st.integers(1, 6)), draw(st.integers(1, 12)), draw(st.integers(1, 4))
    labels = np.array(draw(st.lists(st.integers(-1, c - 1), min_size=q * k, max_size=q * k))).reshape(q, k)
    grid = np.array(draw(st.lists(st.integers(0, 8), min_size=q * k, max_size=q * k))).reshape(q, k)
    sims = -np.sort(-grid / 8.0, axis=1)
    weights = None
    if draw(st.booleans()):
        weights = np.array(draw(st.lists(st.sampled_from([0.0, 0.5, 1.0, 0.875, 1.5]),
                                         min_size=q * k, max_size=q * k))).reshape(q, k)
    return labels, sims, weights, c


@pytest.mark.parametrize("ties", voting.TIES)
@pytest.mark.parametrize("method", voting.METHODS)
@settings(max_examples=100, deadline=None, derandomize=True)
@given(case=neighbour_lists())
def test_all_k_is_predict_on_the_first_k_neighbours_under_either_tie_rule(case, method, ties):
    labels, sims, weights, c = case
    kw = dict(method=method, num_classes=c, tau=0.5, ties=ties)
    allk = voting.predict_all_k(labels, sims, weights=weights, **kw)
    for k in range(1, labels.shape[1] + 1):
        first = voting.predict(labels[:, :k], sims[:, :k], weights=None if weights is None else weights[:, :k], **kw)
        kept = (labels[:, :k] != voting.EXCLUDED).sum(axis=1)
        # k counts kept neighbours, so the first k *given* ones are predict_all_k at their kept count.
        at_kept = np.where(kept > 0, allk[np.arange(len(kept)), np.maximum(kept, 1) - 1], voting.EXCLUDED)
        np.testing.assert_array_equal(first, at_kept, err_msg=f"first {k} given")
        if (labels != voting.EXCLUDED).sum(axis=1).min() >= k:
            direct = voting.predict(labels, sims, weights=weights, k=k, **kw)
            np.testing.assert_array_equal(allk[:, k - 1], direct, err_msg=f"k={k}")


@pytest.mark.parametrize("method", voting.METHODS)
@settings(max_examples=100, deadline=None, derandomize=True)
@given(case=neighbour_lists())
def test_the_tie_rules_agree_when_the_top_score_is_not_tied(case, method):
    labels, sims, weights, c = case
    kw = dict(method=method, num_classes=c, weights=weights, tau=0.5)
    for k in range(1, labels.shape[1] + 1):
        if (labels != voting.EXCLUDED).sum(axis=1).min() < k:
            break
        scores = voting.vote(labels, sims, k=k, **kw)
        top2 = np.sort(scores, axis=1)[:, ::-1][:, :2] if c > 1 else np.c_[scores, np.full(len(scores), -1.0)]
        clear = top2[:, 0] > top2[:, 1] * (1 + 1e-6)
        nearest = voting.predict(labels, sims, k=k, ties="nearest", **kw)
        leader = voting.predict(labels, sims, k=k, ties="leader", **kw)
        np.testing.assert_array_equal(nearest[clear], leader[clear])
        np.testing.assert_array_equal(nearest[clear], scores[clear].argmax(axis=1))
