import math

import pytest

from llmray.train.guards import GuardConfig, StabilityGuard, TrainingDiverged, Verdict


def warmed(cfg: GuardConfig, value=2.0) -> StabilityGuard:
    guard = StabilityGuard(cfg)
    for step in range(cfg.min_history):
        assert guard.check(step + 1, value, 1.0) is Verdict.STEP
    return guard


def test_nonfinite_is_skipped_then_aborts_when_persistent():
    guard = StabilityGuard(GuardConfig(max_consecutive_nonfinite=3))
    assert guard.check(1, math.nan, 1.0) is Verdict.SKIP_NONFINITE
    assert guard.check(2, 1.0, math.inf) is Verdict.SKIP_NONFINITE
    assert guard.check(3, 1.0, 1.0) is Verdict.STEP  # the streak is broken
    guard.check(4, math.nan, 1.0)
    guard.check(5, math.nan, 1.0)
    with pytest.raises(TrainingDiverged, match="3 non-finite steps in a row"):
        guard.check(6, math.nan, 1.0)
    assert guard.counts["nonfinite_skips"] == 5


def test_ratio_spike_is_skipped_and_not_added_to_history():
    guard = warmed(GuardConfig(spike_mode="ratio", spike_ratio=3.0, min_history=4, window=4))
    assert guard.check(5, 5.9, 1.0) is Verdict.STEP
    assert guard.check(6, 40.0, 1.0) is Verdict.SKIP_SPIKE
    assert 40.0 not in guard.history
    assert guard.counts["spike_skips"] == 1


def test_sigma_mode_uses_mean_plus_k_std():
    guard = StabilityGuard(GuardConfig(spike_mode="sigma", spike_sigma=3.0, min_history=4, window=10))
    for step, value in enumerate([1.0, 1.2, 0.8, 1.0]):
        guard.check(step + 1, value, 1.0)
    assert guard.check(5, 1.4, 1.0) is Verdict.STEP  # within 3 sigma (std ~0.14)
    assert guard.check(6, 2.0, 1.0) is Verdict.SKIP_SPIKE


def test_rollback_after_consecutive_spikes_and_abort_after_max_rollbacks():
    guard = warmed(GuardConfig(min_history=3, rollback_after=2, max_rollbacks=1))
    assert guard.check(4, 100.0, 1.0) is Verdict.SKIP_SPIKE
    assert guard.check(5, 100.0, 1.0) is Verdict.ROLLBACK
    assert guard.check(6, 100.0, 1.0) is Verdict.SKIP_SPIKE
    with pytest.raises(TrainingDiverged, match="after 1 rollbacks"):
        guard.check(7, 100.0, 1.0)


def test_no_spike_detection_before_min_history_or_when_off():
    guard = StabilityGuard(GuardConfig(min_history=5))
    assert guard.check(1, 1.0, 1.0) is Verdict.STEP
    assert guard.check(2, 1000.0, 1.0) is Verdict.STEP
    off = warmed(GuardConfig(spike_mode="off", min_history=2))
    assert off.check(3, 1e9, 1.0) is Verdict.STEP


def test_state_round_trip():
    guard = warmed(GuardConfig(min_history=3, window=5))
    guard.check(4, math.nan, 1.0)
    other = StabilityGuard(GuardConfig(min_history=3, window=5))
    other.load_state_dict(guard.state_dict())
    assert other.state_dict() == guard.state_dict()
    assert other.check(5, 100.0, 1.0) is guard.check(5, 100.0, 1.0)
