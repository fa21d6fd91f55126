"""Voting rules against hand-computed cases (DESIGN.md formulas), ties, exclusions and soft weights."""
import math

import numpy as np
import pytest

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
