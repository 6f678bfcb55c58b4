"""Helpers for the operations tests: Prometheus text, loadtest reports, CLI option checks."""

from __future__ import annotations

import urllib.request
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse_metrics(text: str) -> Samples:
    """Prometheus exposition text -> {(sample name, sorted labels): value}."""
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def scrape(url: str, timeout_s: float = 5.0) -> Samples:
    with urllib.request.urlopen(url, timeout=timeout_s) as r:  # noqa: S310 - a local test server
        return parse_metrics(r.read().decode())


def value(samples: Samples, name: str, **labels: str) -> float:
    """One sample; KeyError names what is there if it is missing."""
    key = (name, tuple(sorted(labels.items())))
    if key not in samples:
        near = sorted({n for n, _ in samples if n.startswith(name.split("_bucket")[0])})
        raise KeyError(f"no sample {name}{labels or ''}; samples of that name: {near}")
    return samples[key]


def delta(after: Samples, before: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def check_report(report: dict[str, Any], tasks: int, workers: int) -> None:
    """A loadtest JSON report of ``tasks`` tasks that all succeeded on ``workers`` workers, consistent in itself."""
    assert report["submitted"] == report["finished"] == report["succeeded"] == tasks, report
    assert report["failed"] == 0 and report["failures"] == {}, report["failures"]
    lat = report["latency_s"]
    assert 0 < lat["min"] <= lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"], lat
    assert lat["min"] <= lat["mean"] <= lat["max"], lat
    assert lat["max"] <= report["elapsed_s"] + 1e-6, (lat, report["elapsed_s"])  # every task ran inside the run
    rate = tasks / report["elapsed_s"]
    assert abs(report["tasks_per_s"] - rate) <= 1e-4 * rate + 1e-3, (report["tasks_per_s"], rate)
    assert sum(report["by_worker"].values()) == tasks
    assert len(report["by_worker"]) == workers, report["by_worker"]
    # the throughput timeline accounts for every task: rate x bin width, the last bin as long as the run lasted
    bin_s, rates = report["throughput_per_s"]["bin_s"], report["throughput_per_s"]["values"]
    last_s = max(report["elapsed_s"] - (len(rates) - 1) * bin_s, 1e-3)
    assert abs(sum(r * bin_s for r in rates[:-1]) + rates[-1] * last_s - tasks) < 0.01, rates
    spec = report["spec"]
    assert report["bytes"]["sent"] == tasks * spec["payload_bytes"]
    assert report["bytes"]["received"] == tasks * spec["result_bytes"]
