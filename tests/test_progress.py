"""Progress reporting: durations, the moving-average ETA, and shard building's percentage of the input."""

from __future__ import annotations

import pytest

from sdt_dist.progress import StepClock, format_duration


@pytest.mark.parametrize(("seconds", "text"), [(0, "0s"), (59.4, "59s"), (65, "1m05s"), (3600 * 3 + 12 * 60, "3h12m"),
                                               (86400 * 2 + 4 * 3600 + 59, "2d04h")])
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text


def test_eta_is_the_moving_average_of_recent_steps_times_the_steps_left():
    clock = StepClock(max_steps=100, window=3)
    assert clock.eta_seconds(0) is None and clock.describe(0).endswith("eta ?")
    for dt in (10.0, 1.0, 2.0, 3.0):  # the first (slow) step has left the window of 3
        clock.tick(dt)
    assert clock.eta_seconds(40) == pytest.approx(2.0 * 60)
    assert clock.describe(40).endswith("eta 2m00s")


def test_read_progress_counts_the_offset_of_an_open_input_and_finished_files_in_full(tmp_path):
    from sdt_dist.data.read_progress import ReadProgress
    from sdt_dist.data.sources import Corpus

    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_bytes(b"x" * 1000)
    b.write_bytes(b"y" * 500)
    reading = ReadProgress(Corpus(files=(str(a), str(b))))
    assert reading.total == 1500 and reading.bytes_read([]) == 0
    with open(b, "rb", buffering=0) as f:
        f.read(123)
        assert reading.bytes_read([0]) == 1000 + 123
    assert reading.bytes_read([0, 1]) == 1500
    assert ReadProgress(Corpus(hub_name="stas/openwebtext-10k")).total is None
