"""The arithmetic behind `make bench`'s numbers: percentiles, rates from stamps, swap latencies, targets."""

from __future__ import annotations

import pytest

from bench import stats


def test_percentile_interpolates_between_ranks_like_numpy() -> None:
    values = [10.0, 1.0, 4.0, 2.0, 3.0]  # unsorted on purpose
    assert stats.percentile(values, 0) == 1.0
    assert stats.percentile(values, 100) == 10.0
    assert stats.percentile(values, 50) == 3.0
    assert stats.percentile(values, 90) == pytest.approx(7.6)  # numpy.percentile(..., 90) == 7.6
    assert stats.percentile([5.0], 99) == 5.0


def test_percentile_rejects_empty_samples_and_bad_quantiles() -> None:
    with pytest.raises(ValueError, match="empty"):
        stats.percentile([], 50)
    with pytest.raises(ValueError, match=r"0\.\.100"):
        stats.percentile([1.0], 101)


def test_summarize_reports_the_distribution() -> None:
    s = stats.summarize([float(v) for v in range(1, 101)])
    assert (s.count, s.mean, s.max) == (100, 50.5, 100.0)
    assert s.p50 == pytest.approx(50.5)
    assert s.p99 == pytest.approx(99.01)


def test_group_stamps_counts_records_per_batch_stamp() -> None:
    assert stats.group_stamps([5, 3, 5, 5, 3, 9]) == [(3, 2), (5, 3), (9, 1)]


def test_rate_from_batches_leaves_out_the_last_batch() -> None:
    # 3 batches of 1000 started at t=10, 10.5 and 11.0 s: 2000 events done in 1 s.
    assert stats.rate_from_batches([(11.0, 1000), (10.0, 1000), (10.5, 1000)]) == pytest.approx(2000.0)


def test_rate_from_batches_needs_two_distinct_stamps() -> None:
    with pytest.raises(ValueError, match="two batches"):
        stats.rate_from_batches([(1.0, 500)])
    with pytest.raises(ValueError, match="do not advance"):
        stats.rate_from_batches([(1.0, 500), (1.0, 500)])


def test_rate_between_uses_the_first_and_last_points() -> None:
    points = [(30_000, 13.0), (10_000, 10.0), (20_000, 11.0)]
    assert stats.rate_between(points) == pytest.approx(20_000 / 3.0)
    with pytest.raises(ValueError, match="advance"):
        stats.rate_between([(10, 1.0), (10, 2.0)])


def test_first_stamp_by_keeps_the_earliest_stamp_per_key() -> None:
    pairs = [(1, 100.0), (2, 250.0), (1, 90.0), (2, 240.0), (3, 300.0)]
    assert stats.first_stamp_by(pairs) == {1: 90.0, 2: 240.0, 3: 300.0}


def test_swap_latencies_subtract_promotion_time_and_flag_versions_never_used() -> None:
    promoted = {3: 1000.0, 2: 500.0, 4: 1500.0}
    first_used = {1: 0.0, 2: 520.0, 3: 1250.0}
    assert stats.swap_latencies(promoted, first_used) == {2: 20.0, 3: 250.0, 4: None}


def test_windowed_p50_shows_a_growing_backlog() -> None:
    samples = [(100.0, 5.0), (100.5, 7.0), (101.2, 50.0), (101.9, 70.0), (103.0, 200.0)]
    assert stats.windowed_p50(samples, 1.0) == [(0.0, 6.0), (1.0, 60.0), (3.0, 200.0)]
    assert stats.windowed_p50([], 1.0) == []


def test_ratio_is_none_without_both_numbers() -> None:
    assert stats.ratio(30.0, 40.0) == 0.75
    assert stats.ratio(None, 40.0) is None
    assert stats.ratio(30.0, None) is None
    assert stats.ratio(30.0, 0.0) is None


def test_targets_are_checked_against_the_issue_bounds() -> None:
    result: dict[str, float | None] = {
        "predictor_eps": 26_000.0,
        "predictor_ratio": 0.5,
        "e2e_p99_ms": 100.0,
        "swap_p99_ms": 1000.1,
        "learner_ratio": None,
    }
    met = {t.name: t.met for t in stats.targets(result)}
    assert met == {
        "predictor_eps": True,
        "predictor_ratio": False,
        "e2e_p99_ms": True,  # the bound itself meets "<= 100 ms"
        "swap_p99_ms": False,
        "learner_ratio": None,  # not measured is neither met nor failed
    }
