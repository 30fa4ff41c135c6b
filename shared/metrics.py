"""Prometheus counters and histograms, rendered in the text exposition format.

Kept dependency-free: the services need a handful of series, not a client library."""

from collections import defaultdict

_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
_counters: dict[tuple[str, tuple[tuple[str, str], ...]], float] = defaultdict(float)
_histograms: dict[tuple[str, tuple[tuple[str, str], ...]], list[float]] = {}
_help: dict[str, tuple[str, str]] = {}
_bucket_sets: dict[str, tuple[float, ...]] = {}


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


def _labels(pairs: tuple[tuple[str, str], ...], extra: str = "") -> str:
    parts = [f'{k}="{v}"' for k, v in pairs] + ([extra] if extra else [])
    return "{" + ",".join(parts) + "}" if parts else ""


def render() -> str:
    lines: list[str] = []
    seen: set[str] = set()
    for (name, labels), value in sorted(_counters.items()):
        if name not in seen and name in _help:
            lines += [f"# HELP {name} {_help[name][1]}", f"# TYPE {name} counter"]
        seen.add(name)
        lines.append(f"{name}{_labels(labels)} {value}")
    for (name, labels), series in sorted(_histograms.items()):
        if name not in seen and name in _help:
            lines += [f"# HELP {name} {_help[name][1]}", f"# TYPE {name} histogram"]
        seen.add(name)
        for bound, count in zip(_bucket_sets.get(name, _BUCKETS), series):
            le = 'le="%s"' % bound
            lines.append(f"{name}_bucket{_labels(labels, le)} {count}")
        inf = 'le="+Inf"'
        lines.append(f"{name}_bucket{_labels(labels, inf)} {series[-2]}")
        lines.append(f"{name}_count{_labels(labels)} {series[-2]}")
        lines.append(f"{name}_sum{_labels(labels)} {series[-1]}")
    return "\n".join(lines) + "\n"
