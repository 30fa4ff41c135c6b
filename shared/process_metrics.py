"""The process_* series every Prometheus client library exports (same names, same units),
read from /proc/self at each scrape, and aodm_build_info. Off Linux, without /proc, the
process_* series are left out."""

import os
import platform
import resource
from importlib import metadata

from shared import metrics

metrics.describe("process_cpu_seconds_total", "counter", "Total user and system CPU time spent in seconds.")
metrics.describe("process_resident_memory_bytes", "gauge", "Resident memory size in bytes.")
metrics.describe("process_virtual_memory_bytes", "gauge", "Virtual memory size in bytes.")
metrics.describe("process_open_fds", "gauge", "Number of open file descriptors.")
metrics.describe("process_max_fds", "gauge", "Maximum number of open file descriptors.")
metrics.describe("process_start_time_seconds", "gauge", "Start time of the process since unix epoch in seconds.")
metrics.describe("aodm_build_info", "gauge", "Always 1; the labels say which aodm version runs on which Python.")


def _version() -> str:
    try:
        return metadata.version("aodm")
    except metadata.PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown"


VERSION = _version()
_BUILD = metrics.labels(version=VERSION, python=platform.python_version())


def _stat() -> list[bytes] | None:
    """/proc/self/stat from field 3 on (the command name before it may hold spaces)."""
    try:
        with open("/proc/self/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    return raw[raw.rindex(b")") + 2:].split()


def _boot_time() -> float:
    with open("/proc/stat", "rb") as f:
        for line in f:
            if line.startswith(b"btime "):
                return float(line.split()[1])
    raise OSError("no btime in /proc/stat")


def _start_time(ticks: int) -> float | None:
    stat = _stat()
    try:
        return None if stat is None else _boot_time() + int(stat[19]) / ticks
    except OSError:
        return None


_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_STARTED = _start_time(_TICKS)  # fixed for the process: read once


def _process() -> list[tuple[str, metrics.Labels, float]]:
    stat = _stat()
    if stat is None:
        return []
    # Fields 14, 15 (utime, stime), 23 (vsize), 24 (rss) of proc(5), counted from field 3.
    series = [
        ("process_cpu_seconds_total", (), (int(stat[11]) + int(stat[12])) / _TICKS),
        ("process_resident_memory_bytes", (), float(int(stat[21]) * _PAGE)),
        ("process_virtual_memory_bytes", (), float(int(stat[20]))),
        ("process_max_fds", (), float(resource.getrlimit(resource.RLIMIT_NOFILE)[0])),
    ]
    try:
        series.append(("process_open_fds", (), float(len(os.listdir("/proc/self/fd")))))
    except OSError:
        pass
    if _STARTED is not None:
        series.append(("process_start_time_seconds", (), _STARTED))
    return series


def _build() -> list[tuple[str, metrics.Labels, float]]:
    return [("aodm_build_info", _BUILD, 1.0)]


metrics.collect(_process)
metrics.collect(_build)
