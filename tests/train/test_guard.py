"""Guard decisions: non-finite steps skipped, persistent NaN and loss spikes call for a rollback."""

import math

from seektrain.train.guard import OK, ROLLBACK, SKIP, Guard


def test_nonfinite_skips_then_rolls_back():
    g = Guard(max_bad_steps=3, zscore=0, window=4)
    assert g.check(1.0, 1.0) == OK
    assert g.check(math.nan, 1.0) == SKIP
    assert g.check(1.0, math.inf) == SKIP
    assert g.check(1.0, 1.0) == OK  # a good step resets the count
    assert [g.check(math.nan, 1.0) for _ in range(3)] == [SKIP, SKIP, ROLLBACK]


def test_spike_needs_a_full_window_and_is_not_recorded():
    g = Guard(max_bad_steps=3, zscore=4.0, window=5)
    assert g.check(100.0, 1.0) == OK  # window not full: no judgement yet
    for loss in (2.0, 2.1, 1.9, 2.0):
        assert g.check(loss, 1.0) == OK
    g.history.popleft()
    g.history.append(2.05)
    assert g.check(2.2, 1.0) == OK  # within noise
    assert g.check(9.0, 1.0) == ROLLBACK
    assert 9.0 not in g.history
    state = g.state_dict()
    h = Guard(3, 4.0, 5)
    h.load_state_dict(state)
    assert h.state_dict() == state
