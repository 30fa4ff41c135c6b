"""Prometheus counters, histograms and gauges, rendered in the text exposition format.

Kept dependency-free: the services need a handful of series, not a client library."""

from collections import defaultdict
from collections.abc import Callable, Iterable

_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
Labels = tuple[tuple[str, str], ...]
_counters: dict[tuple[str, Labels], float] = defaultdict(float)
_histograms: dict[tuple[str, Labels], list[float]] = {}
_help: dict[str, tuple[str, str]] = {}
_bucket_sets: dict[str, tuple[float, ...]] = {}
# Series read when rendered (process CPU and memory, build info): (name, labels, value).
Collector = Callable[[], Iterable[tuple[str, Labels, float]]]
_collectors: list[Collector] = []


def describe(name: str, kind: str, text: str, buckets: tuple[float, ...] | None = None) -> None:
    _help[name] = (kind, text)
    if buckets:
        _bucket_sets[name] = buckets


def inc(name: str, amount: float = 1.0, **labels: str) -> None:
    _counters[(name, tuple(sorted(labels.items())))] += amount


def observe(name: str, seconds: float, **labels: str) -> None:
    key = (name, tuple(sorted(labels.items())))
    buckets = _bucket_sets.get(name, _BUCKETS)
    series = _histograms.setdefault(key, [0.0] * (len(buckets) + 2))
    for i, bound in enumerate(buckets):
        if seconds <= bound:
            series[i] += 1
    series[-2] += 1  # count
    series[-1] += seconds  # sum


def collect(collector: Collector) -> None:
    """Series computed at each scrape rather than counted as things happen."""
    _collectors.append(collector)


def labels(**pairs: str) -> Labels:
    return tuple(sorted(pairs.items()))


def _labels(pairs: Labels, extra: str = "") -> str:
    parts = [f'{k}="{v}"' for k, v in pairs] + ([extra] if extra else [])
    return "{" + ",".join(parts) + "}" if parts else ""


def _head(name: str, seen: set[str]) -> list[str]:
    """HELP and TYPE, once per metric, for a described one."""
    if name in seen or name not in _help:
        return []
    seen.add(name)
    kind, text = _help[name]
    return [f"# HELP {name} {text}", f"# TYPE {name} {kind}"]


def render() -> str:
    lines: list[str] = []
    seen: set[str] = set()
    for (name, pairs), value in sorted(_counters.items()):
        lines += _head(name, seen)
        lines.append(f"{name}{_labels(pairs)} {value}")
    for (name, pairs), series in sorted(_histograms.items()):
        lines += _head(name, seen)
        for bound, count in zip(_bucket_sets.get(name, _BUCKETS), series, strict=False):  # series ends with +Inf, sum
            le = f'le="{bound}"'
            lines.append(f"{name}_bucket{_labels(pairs, le)} {count}")
        inf = 'le="+Inf"'
        lines.append(f"{name}_bucket{_labels(pairs, inf)} {series[-2]}")
        lines.append(f"{name}_count{_labels(pairs)} {series[-2]}")
        lines.append(f"{name}_sum{_labels(pairs)} {series[-1]}")
    for collector in _collectors:
        for name, pairs, value in collector():
            lines += _head(name, seen)
            lines.append(f"{name}{_labels(pairs)} {value}")
    return "\n".join(lines) + "\n"
