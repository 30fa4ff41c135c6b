"""Percentiles and time series, in plain Python (no numpy needed to run the benchmark)."""

import math
from dataclasses import dataclass, field


def percentile(sorted_values: list[float], p: float) -> float:
    """Nearest-rank percentile of an already sorted list (NaN when empty)."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(p / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def summary(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {
        "n": len(ordered),
        "p50": percentile(ordered, 50),
        "p95": percentile(ordered, 95),
        "p99": percentile(ordered, 99),
        "max": ordered[-1] if ordered else math.nan,
    }


def rate_series(times: list[float], start: float, end: float, bucket: float) -> list[tuple[float, float]]:
    """Events per second in consecutive buckets: [(bucket start - start, rate)]."""
    n = max(1, math.ceil((end - start) / bucket))
    counts = [0] * n
    for t in times:
        i = int((t - start) // bucket)
        if 0 <= i < n:
            counts[i] += 1
    return [(i * bucket, c / bucket) for i, c in enumerate(counts)]


def latency_series(
    samples: list[tuple[float, float]], start: float, end: float, bucket: float
) -> list[tuple[float, float, float, float]]:
    """Per bucket of arrival time: (t, p50, p95, p99) of the latencies (seconds)."""
    n = max(1, math.ceil((end - start) / bucket))
    buckets: list[list[float]] = [[] for _ in range(n)]
    for at, latency in samples:
        i = int((at - start) // bucket)
        if 0 <= i < n:
            buckets[i].append(latency)
    out = []
    for i, values in enumerate(buckets):
        if values:
            values.sort()
            out.append((i * bucket, percentile(values, 50), percentile(values, 95), percentile(values, 99)))
    return out


@dataclass
class RunResult:
    """One measured run of a load against one system."""

    name: str
    kind: str  # "closed" (max throughput) | "open" (fixed offered load) | "rpc"
    duration: float
    warmup: float
    offered_rate: float | None = None
    achieved_offered_rate: float | None = None  # publishes per second actually made
    throughput: float = 0.0  # completions per second in the measured window
    completed: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    latency_ms: dict[str, float] = field(default_factory=dict)  # publish -> notification
    rtt_ms: dict[str, float] = field(default_factory=dict)  # request -> reply
    missing_notifications: int = 0
    overloaded: bool = False
    cpu_cores: dict[str, float] = field(default_factory=dict)  # average cores used per group
    series_rate: list = field(default_factory=list)  # [(t, per second)]
    series_latency: list = field(default_factory=list)  # [(t, p50, p95, p99) in ms]
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return dict(self.__dict__)
