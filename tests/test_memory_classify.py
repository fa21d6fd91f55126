"""``Memory.classify`` on a memory built by hand, so that every vote can be worked out on paper."""
import math

import numpy as np
import pytest

from memory import Memory, voting, write_memory

CLASSES = ["ant", "bee", "cat"]


def _unit(*pairs, dim=6):
    """``sum(c * e_i)`` over ``(i, c)`` pairs; callers give unit-norm combinations."""
    v = np.zeros(dim)
    for i, c in pairs:
        v[i] = c
    return v


# Query Q1 = e0 sees a, b, c, d at similarities 0.9, 0.8, 0.7, 0.6 with labels ant, bee, bee, ant, then e
# (0.1); the cat items f, g, h are orthogonal to it. Query Q2 = e5 sees e, f, g, h (all cat) first.
ITEMS = {
    "a": (0, _unit((0, 0.9), (1, math.sqrt(1 - 0.81)))),
    "b": (1, _unit((0, 0.8), (2, 0.6))),
    "c": (1, _unit((0, 0.7), (3, math.sqrt(1 - 0.49)))),
    "d": (0, _unit((0, 0.6), (4, 0.8))),
    "e": (2, _unit((0, 0.1), (5, math.sqrt(0.99)))),
    "f": (2, _unit((5, 0.95), (1, math.sqrt(1 - 0.95 ** 2)))),
    "g": (2, _unit((5, 0.9), (2, math.sqrt(1 - 0.81)))),
    "h": (2, _unit((5, 0.85), (3, math.sqrt(1 - 0.85 ** 2)))),
}
Q1, Q2 = _unit((0, 1.0)), _unit((5, 1.0))


@pytest.fixture(scope="module")
def memory(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("classify") / "m")
    ids = list(ITEMS)
    write_memory(root, np.array([ITEMS[i][1] for i in ids]), [ITEMS[i][0] for i in ids], ids, num_shards=2,
                 class_names=CLASSES)
    with Memory.open(root) as mem:
        yield mem


def test_the_neighbours_are_the_hand_built_ones(memory):
    nb = memory.search(np.stack([Q1, Q2]), 4)
    assert nb.ids.tolist() == [["a", "b", "c", "d"], ["e", "f", "g", "h"]]
    np.testing.assert_allclose(nb.sims, [[0.9, 0.8, 0.7, 0.6], [math.sqrt(0.99), 0.95, 0.9, 0.85]], atol=1e-6)


def test_the_tie_rule_reaches_classify(memory):
    q = np.stack([Q1, Q2])
    # Q1, plurality at k = 4: ant 2 (ranks 0, 3), bee 2 (ranks 1, 2; first to 2 votes).
    assert memory.classify(q, 4, "plurality").predictions.tolist() == [0, 2]
    assert memory.classify(q, 4, "plurality", ties="nearest").predictions.tolist() == [0, 2]
    res = memory.classify(q, 4, "plurality", ties="leader")
    assert res.predictions.tolist() == [1, 2] and res.predicted_names == ["bee", "cat"]
    np.testing.assert_allclose(res.scores, [[2, 2, 0], [0, 0, 4]])
    # No tie (rank: ant 1/2 + 1/5 against bee 1/3 + 1/4): both rules agree.
    for ties in voting.TIES:
        assert memory.classify(q, 4, "rank", ties=ties).predictions.tolist() == [0, 2]
    with pytest.raises(ValueError, match="unknown tie rule 'foo'; choose one of nearest, leader"):
        memory.classify(q, 4, "plurality", ties="foo")


def test_confidence_is_the_voted_class_share_worked_by_hand(memory):
    q = np.stack([Q1, Q2])
    e = math.exp
    # Q1's first four: ant 0.9, bee 0.8, bee 0.7, ant 0.6. Q2's: four cats (all the vote).
    cases = {
        "plurality": 2 / 4,
        "rank": (1 / 2 + 1 / 5) / (1 / 2 + 1 / 5 + 1 / 3 + 1 / 4),  # 0.7 / (0.7 + 7/12) = 6/11
        "distance": (e(-0.1) + e(-0.4)) / (e(-0.1) + e(-0.4) + e(-0.2) + e(-0.3)),
        "softmax": (e(0.9 / 0.07) + e(0.6 / 0.07)) / sum(e(s / 0.07) for s in (0.9, 0.8, 0.7, 0.6)),
    }
    for method, want in cases.items():
        res = memory.classify(q, 4, method)
        # float32 similarities: within 1e-5 of the hand values (plurality and rank exactly)
        np.testing.assert_allclose(res.confidence, [want, 1.0], rtol=1e-5, err_msg=method)
        assert res.reasons.tolist() == [None, None] and not res.abstained.any()
    assert memory.classify(q, 4, "rank").confidence[0] == pytest.approx(6 / 11, rel=1e-12)
    # Under the leader rule the tied plurality vote goes to bee. With a fifth neighbour, Q1's is e (cat,
    # 0.1): bee's share falls to 2 of 5; Q2's is a (ant; a to d are orthogonal to Q2, a first by id): 4 of 5.
    res = memory.classify(q, 5, "plurality", ties="leader")
    assert res.predictions.tolist() == [1, 2] and res.confidence.tolist() == [2 / 5, 4 / 5]


def test_abstain_below_turns_unsure_predictions_into_minus_one(memory):
    q = np.stack([Q1, Q2])
    res = memory.classify(q, 4, "rank", abstain_below=0.6)  # Q1 6/11 = 0.545 < 0.6; Q2 1.0
    assert res.predictions.tolist() == [-1, 2] and res.predicted_names == [None, "cat"]
    assert res.reasons.tolist() == ["abstained", None] and res.abstained.tolist() == [True, False]
    assert res.confidence[0] == pytest.approx(6 / 11)  # the share it abstained with is kept
    np.testing.assert_allclose(res.scores[0], [0.7, 7 / 12, 0])
    # Below, not at: a confidence equal to the threshold answers (plurality 2/4 at 0.5).
    assert memory.classify(q, 4, "plurality", abstain_below=0.5).predictions.tolist() == [0, 2]
    assert memory.classify(q, 4, "plurality", abstain_below=0.50001).predictions.tolist() == [-1, 2]
    assert memory.classify(q, 4, "rank", abstain_below=1.0).predictions.tolist() == [-1, 2]
    assert memory.classify(q, 4, "rank", abstain_below=0.0).predictions.tolist() == [0, 2]
    for bad in (-0.1, 1.5, float("nan"), "0.5", True):
        with pytest.raises(ValueError, match=r"abstain_below must be a number in \[0, 1\]"):
            memory.classify(q, 4, "rank", abstain_below=bad)


def test_confidence_and_abstention_cores_by_hand():
    from memory import confidence

    scores = np.array([[1.0, 3.0, 0.0], [0.0, 0.0, 0.0], [2.0, 2.0, 0.0], [0.5, 0.0, 0.0]])
    voted = np.array([1, -1, 0, 0])
    conf = confidence.confidence(scores, voted)
    assert conf.tolist() == [0.75, 0.0, 0.5, 1.0]
    preds, reasons = confidence.abstain(voted, conf, 0.6)
    assert preds.tolist() == [1, -1, -1, 0]
    assert reasons.tolist() == [None, "no votes", "abstained", None]  # nothing voted: not an abstention
    preds, reasons = confidence.abstain(voted, conf, None)
    assert preds.tolist() == voted.tolist() and reasons.tolist() == [None, "no votes", None, None]
    with pytest.raises(ValueError, match=r"scores must be \(Q, C\)"):
        confidence.confidence(scores, voted[:2])
