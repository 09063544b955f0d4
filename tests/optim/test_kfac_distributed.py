"""The distributed K-FAC preconditioner's pieces that need no process group
(optim/kfac/distributed.py).
"""

import pytest

from bigbatch.optim.kfac.distributed import assign_by_cost


# No process group: dist and slow are the markers it carried under the old
# tests/test_distributed.py's module-wide pytestmark, kept so -m selections do not change.
@pytest.mark.dist
@pytest.mark.slow
def test_eigendecompositions_are_spread_over_ranks():
    costs = {
        "conv1": 76.0**3 + 6**3,
        "conv2": 151.0**3 + 16**3,
        "fc1": 401.0**3 + 120**3,
        "fc2": 121.0**3 + 84**3,
        "fc3": 85.0**3 + 10**3,
    }
    owner = assign_by_cost(costs, 2)
    assert owner["fc1"] == 0 and set(owner.values()) == {0, 1}  # the largest alone on one rank
    assert all(owner[n] == 1 for n in ("conv1", "conv2", "fc2", "fc3"))
    assert set(assign_by_cost(costs, 8).values()) == {0, 1, 2, 3, 4}


def test_layers_spread_over_groups_before_they_fill_one():
    # KAISA's groups: with groups of 2 of 8 ranks, the 4 costliest layers go to 4 different
    # groups (a rank-by-rank greedy would put them on ranks 0-3, all in groups 0 and 1).
    costs = {f"layer{i}": float(100 - i) for i in range(8)}
    owner = assign_by_cost(costs, 8, group_size=2)
    assert sorted(owner[f"layer{i}"] // 2 for i in range(4)) == [0, 1, 2, 3]
    assert sorted(owner.values()) == list(range(8))  # then each group's second rank
    # One group of all, or groups of one: the plain rank-by-rank greedy.
    assert assign_by_cost(costs, 8, 8) == assign_by_cost(costs, 8, 1) == assign_by_cost(costs, 8)
