"""streamml.metrics helpers checked against prometheus_client's own behaviour."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Histogram

from streamml.metrics import observe_many

BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def exported(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for m in registry.collect()
        for s in m.samples
        if not s.name.endswith("_created")
    }


def test_observe_many_gives_the_histogram_observe_gives() -> None:
    """The predictor observes a batch's latencies at once; the exported series must be those of observing
    each value (this reads prometheus_client's internals, so it is checked against its own observe)."""
    values = [0.0, 0.005, 0.0050001, 0.01, 0.3, 1.0, 2.5, 9.99, 10.0, 10.5, 1e9, 0.2] * 3
    series = []
    for batch in (True, False):
        registry = CollectorRegistry()
        h = Histogram("lat", "latency", ["pipeline"], buckets=BUCKETS, registry=registry)
        if batch:
            observe_many(h.labels("p"), values)
            observe_many(h.labels("p"), [])
        else:
            for v in values:
                h.labels("p").observe(v)
        series.append(exported(registry))
    assert series[0] == series[1] and series[0][("lat_count", (("pipeline", "p"),))] == len(values)
