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
