"""Where a run stands in time: elapsed wall time and an ETA from a moving average of recent step times."""

from __future__ import annotations

import time
from collections import deque


def format_duration(seconds: float) -> str:
    """`42s`, `7m05s`, `3h12m`, `2d04h`: short enough for a log line, exact enough for planning."""
    s = int(round(max(seconds, 0.0)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


class StepClock:
    """Elapsed time since `start()`, and the remaining steps times the mean of the last `window` step times
    (a moving average follows the run's speed as freezing removes layers; a first step that compiles or warms
    caches falls out of it)."""

    def __init__(self, max_steps: int, window: int = 20) -> None:
        self.max_steps = max_steps
        self._times: deque[float] = deque(maxlen=window)
        self._t0 = time.perf_counter()

    def tick(self, step_seconds: float) -> None:
        self._times.append(step_seconds)

    def eta_seconds(self, step: int) -> float | None:
        if not self._times:
            return None
        return sum(self._times) / len(self._times) * max(self.max_steps - step, 0)

    def describe(self, step: int) -> str:
        eta = self.eta_seconds(step)
        return (f"elapsed {format_duration(time.perf_counter() - self._t0)} | "
                f"eta {'?' if eta is None else format_duration(eta)}")
