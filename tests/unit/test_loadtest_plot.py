"""The loadtest's pictures tell the truth: readable latency labels, no spike at the end of the throughput."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from distfork.loadtest import LoadSpec, Report, figure, plot_report

pytest.importorskip("matplotlib")


def _report(latencies_s: np.ndarray, finish_times_s: np.ndarray) -> Report:
    return Report(address="ipc://x", workers=2, spec=LoadSpec(tasks=len(finish_times_s)),
                  submitted=len(finish_times_s), finished=len(finish_times_s), succeeded=len(finish_times_s),
                  failures={}, elapsed_s=float(finish_times_s.max()), latencies_s=list(latencies_s),
                  finish_times_s=list(finish_times_s), sent_bytes=0, received_bytes=0, by_worker={},
                  broker_bytes=None)


@pytest.mark.parametrize("low_ms,high_ms", [(0.3, 11.0), (21.0, 450.0), (1.5, 40.0), (0.05, 900.0), (2.0, 3.0)])
def test_latency_tick_labels_do_not_overlap(low_ms: float, high_ms: float) -> None:
    rng = np.random.default_rng(0)
    lat = np.exp(rng.uniform(np.log(low_ms), np.log(high_ms), 5000)) / 1000
    fig = figure(_report(lat, np.linspace(0.001, 1.0, 5000)))
    fig.canvas.draw()
    axis = fig.axes[0].xaxis
    boxes = [t.get_window_extent() for t in axis.get_ticklabels() + axis.get_ticklabels(minor=True)
             if t.get_visible() and t.get_text() and fig.axes[0].get_xlim()[0] <= t.get_position()[0]
             <= fig.axes[0].get_xlim()[1]]
    assert len(boxes) >= 2, "the latency axis has fewer than two labels"
    boxes.sort(key=lambda b: b.x0)
    for a, b in zip(boxes, boxes[1:], strict=False):
        assert a.x1 < b.x0, f"tick labels overlap: {a} and {b}"


@pytest.mark.parametrize("elapsed_s", [1.0, 1.0004, 1.26, 0.3201, 7.3])
def test_a_steady_run_draws_a_flat_throughput_to_the_end(elapsed_s: float) -> None:
    rate = 15_000.0
    finishes = np.arange(1, int(elapsed_s * rate) + 1) / rate
    report = _report(np.full(len(finishes), 0.003), finishes)
    rates = report.timeline()
    assert len(rates) >= 10
    assert max(rates) < 1.1 * rate and min(rates) > 0.9 * rate, rates  # no spike, no dip at the last bin
    bin_s = report.timeline_bin_s()  # every task counted once: rate x width sums to the task count
    last_s = report.elapsed_s - (len(rates) - 1) * bin_s
    assert sum(r * bin_s for r in rates[:-1]) + rates[-1] * last_s == pytest.approx(len(finishes))


def test_the_plot_is_written(tmp_path: Path) -> None:
    plot_report(_report(np.full(100, 0.002), np.linspace(0.01, 0.5, 100)), str(tmp_path / "p.png"))
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
