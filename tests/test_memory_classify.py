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
