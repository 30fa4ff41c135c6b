"""Results as tables (stdout and docs/performance.md) and as a plot (docs/performance.png).

docs/performance.md is part hand-written: a run replaces only what lies between its
`<!-- bench:begin NAME -->` / `<!-- bench:end NAME -->` markers (NAME = results, profile,
workers), and creates the file with just those sections if it does not exist."""

import math
import re
from pathlib import Path

# Every figure a complete (non --workers) run must produce: (label, path into the results).
FIGURES = [
    ("aodm max throughput", ("runs", "aodm_max", "throughput")),
    ("baseline (a) max throughput", ("runs", "baseline_a_max", "throughput")),
    ("baseline (b) max throughput", ("runs", "baseline_b_max", "throughput")),
    *[(f"{who} latency {p} @500", ("runs", f"{who}_500", "latency_ms", p))
      for who in ("aodm", "baseline_a", "baseline_b") for p in ("p50", "p95", "p99")],
    *[(f"{who} latency {p} @70%", ("runs", f"{who}_70", "latency_ms", p))
      for who in ("aodm", "baseline_a", "baseline_b") for p in ("p50", "p95", "p99")],
    *[(f"{who} {c} rate", ("runs", f"{who}_{c}", "throughput")) for who in ("query", "rpc") for c in (1, 32)],
    *[(f"{who} {c} {p}", ("runs", f"{who}_{c}", "rtt_ms", p)) for who in ("query", "rpc") for c in (1, 32)
      for p in ("p50", "p99")],
    ("EstablishSession rate", ("seed", "EstablishSession", "rate")),
    ("RotateSessionKey rate", ("seed", "RotateSessionKey", "rate")),
    ("store rows", ("store", "rows")),
    *[(f"memory {s} {k}", ("memory", s, k)) for s in ("registry", "session-1", "notifier") for k in ("start_mib", "end_mib", "max_mib")],
]


def get(results: dict, path: tuple):
    value = results
    for key in path:
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return value


def missing_figures(results: dict) -> list[str]:
    missing = []
    for label, path in FIGURES:
        value = get(results, path)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
            missing.append(f"{label} ({'.'.join(map(str, path))} = {value!r})")
    return missing


# -- formatting ----------------------------------------------------------------------------


def num(value, digits: int = 0) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if isinstance(value, float) and digits == 0 and abs(value) < 10:
        digits = 1 if abs(value) >= 1 else 2
    return f"{value:,.{digits}f}"


def ratio(a, b) -> str:
    if a is None or b is None or not b or not math.isfinite(a) or not math.isfinite(b):
        return "–"
    r = a / b
    return f"{r:.2f}×" if r < 10 else f"{r:.1f}×"


def run_of(results: dict, name: str) -> dict:
    return results.get("runs", {}).get(name) or {}


def pipeline_rows(results: dict) -> list[list[str]]:
    a, b, m = (run_of(results, f"{w}_max") for w in ("baseline_a", "baseline_b", "aodm"))
    def spread(run: dict) -> str:
        rounds = run.get("extra", {}).get("rounds") or []
        text = num(run.get("throughput"))
        return text + (f" ({num(min(rounds))}–{num(max(rounds))})" if len(rounds) > 1 else "")

    n_rounds = len(m.get("extra", {}).get("rounds") or [1])
    rows = [[
        "SendMessage sustained msg/s, closed loop"
        + (f" (median of {n_rounds} interleaved rounds, range)" if n_rounds > 1 else ""),
        spread(m), spread(a), ratio(m.get("throughput"), a.get("throughput")),
        spread(b), ratio(m.get("throughput"), b.get("throughput")),
    ]]
    for load, label in (("500", "500 msg/s"), ("70", "70% of own max")):
        runs = [run_of(results, f"{w}_{load}") for w in ("aodm", "baseline_a", "baseline_b")]
        offered = " / ".join(num(r.get("offered_rate")) for r in runs)
        flags = ["overloaded" if r.get("overloaded") else "" for r in runs]
        n = len(runs[0].get("extra", {}).get("rounds") or [1])
        median = f" (the median of {n} interleaved rounds by p99)" if n > 1 else ""
        for p in ("p50", "p95", "p99"):
            vals = [r.get("latency_ms", {}).get(p) for r in runs]
            rows.append([
                f"publish → notification {p}, ms @ {label}" + (median if p == "p50" else "")
                + (f" (offered {offered})" if p == "p50" and load == "70" else ""),
                num(vals[0], 1) + (" ⚠" if flags[0] else ""), num(vals[1], 1) + (" ⚠" if flags[1] else ""),
                ratio(vals[0], vals[1]), num(vals[2], 1) + (" ⚠" if flags[2] else ""), ratio(vals[0], vals[2]),
            ])
    cpu = [r.get("extra", {}).get("cpu_us_per_op", {}) for r in (m, a, b)]
    own = [sum(c.get(k, 0) for k in c if k.startswith(("session", "registry", "notifier"))) for c in cpu[:1]] + \
          [c.get("baseline") for c in cpu[1:]]
    rows.append(["CPU µs per message: our processes (the services; the baseline process)",
                 num(own[0]), num(own[1]), ratio(own[0], own[1]), num(own[2]), ratio(own[0], own[2])])
    for key, label in (("session", "  of which the session worker(s)"), ("registry", "  of which the registry (activity feed)"),
                       ("notifier", "  of which the notifier")):
        value = sum(v for k, v in cpu[0].items() if k.startswith(key))
        rows.append([label, num(value), "", ratio(value, own[1]), "", ratio(value, own[2])])
    for key, label in (("broker", "CPU µs per message: RabbitMQ (shared)"),
                       ("postgres", "CPU µs per message: PostgreSQL (shared)"),
                       ("bench", "CPU µs per message: load generator")):
        vals = [c.get(key) for c in cpu]
        rows.append([label, num(vals[0]), num(vals[1]), ratio(vals[0], vals[1]), num(vals[2]), ratio(vals[0], vals[2])])
    busy = [r.get("cpu_cores", {}).get("machine") for r in (m, a, b)]
    rows.append(["machine CPU busy during the max run, cores of " + str(results.get("meta", {}).get("nproc", "?")),
                 num(busy[0], 2), num(busy[1], 2), "", num(busy[2], 2), ""])
    return rows


def read_rows(results: dict) -> list[list[str]]:
    rows = []
    for c in (1, 32):
        q, r = run_of(results, f"query_{c}"), run_of(results, f"rpc_{c}")
        n = len(q.get("extra", {}).get("rounds") or [1])
        rows.append([f"round trips/s, {c} concurrent client{'s' if c > 1 else ''}"
                     + (f" (median of {n} interleaved rounds)" if n > 1 else ""),
                     num(q.get("throughput")), num(r.get("throughput")), ratio(q.get("throughput"), r.get("throughput"))])
        for p in ("p50", "p99"):
            qv, rv = q.get("rtt_ms", {}).get(p), r.get("rtt_ms", {}).get(p)
            rows.append([f"round trip {p}, ms, {c} concurrent", num(qv, 2), num(rv, 2), ratio(qv, rv)])
    return rows


def ops_rows(results: dict) -> list[list[str]]:
    base = run_of(results, "baseline_a_max").get("throughput")
    rows = []
    for action in ("Register", "EstablishSession", "RotateSessionKey"):
        item = get(results, ("seed", action)) or {}
        rows.append([f"{action}/s (pipelined, {item.get('concurrency', '?')} in flight, {item.get('count', '?')} requests)",
                     num(item.get("rate")), num(base), ratio(item.get("rate"), base),
                     num(get(item, ("rtt_ms", "p50")), 1), num(get(item, ("rtt_ms", "p99")), 1)])
    return rows


def memory_rows(results: dict) -> list[list[str]]:
    rows = []
    base = get(results, ("memory", "baseline_mib"))
    for name, m in sorted((results.get("memory") or {}).items()):
        if not isinstance(m, dict):
            continue
        rows.append([name, num(m["start_mib"], 1), num(m["end_mib"], 1), num(m["max_mib"], 1),
                     f"{m['drift_pct']:+.1f}%", "yes" if m["flat"] else "**no**", ratio(m["max_mib"], base)])
    return rows


def worker_rows(results: dict) -> list[list[str]]:
    rows = []
    base = get(results, ("runs", "baseline_b_max", "throughput"))
    for w in results.get("workers") or []:
        rows.append([str(w["workers"]), num(w["throughput"]), ratio(w["throughput"], base),
                     num(w.get("p50_500"), 1), num(w.get("p99_500"), 1), "yes" if w.get("overloaded_500") else "no",
                     num(w.get("session_cores"), 2), num(w.get("machine_cores"), 2)])
    return rows


TABLES = {
    "pipeline": (["Figure", "aodm", "baseline (a) 1 txn/msg", "aodm ÷ (a)", "baseline (b) group commit", "aodm ÷ (b)"],
                 pipeline_rows),
    "reads": (["QueryMessage (50-message page)", "aodm", "raw RPC baseline", "aodm ÷ RPC"], read_rows),
    "ops": (["Operation", "aodm /s", "baseline (a) msg/s", "aodm ÷ (a)", "p50 ms", "p99 ms"], ops_rows),
    "memory": (["Process", "start MiB", "end MiB", "max MiB", "drift", "flat ±10%", "max ÷ baseline RSS"], memory_rows),
    "workers": (["session workers", "SendMessage msg/s", "÷ baseline (b)", "p50 ms @500", "p99 ms @500",
                 "overloaded @500", "session CPU cores", "machine CPU cores"], worker_rows),
}


def text_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    fmt = lambda r: "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=False)))  # noqa: E731
    return "\n".join([fmt(header), "  ".join("-" * w for w in widths), *map(fmt, rows)])


def md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def tables(results: dict, names: list[str]) -> list[tuple[str, list[str], list[list[str]]]]:
    out = []
    for name in names:
        header, build = TABLES[name]
        rows = build(results)
        if rows:
            out.append((name, header, rows))
    return out


# A 1-minute load average at the start above this (cores busy) means something else was
# running when the benchmark began, which it cannot see afterwards: its figures are marked
# provisional.
BUSY_AT_START = 0.5


def busy_at_start(results: dict) -> bool:
    start = results.get("meta", {}).get("loadavg_start") or "0"
    return float(start.split()[0]) > BUSY_AT_START


def status(results: dict) -> str:
    return "Provisional (the machine was busy when it started)" if busy_at_start(results) else "Measured"


def text(results: dict) -> str:
    names = ["workers"] if results.get("mode") == "workers" else ["pipeline", "reads", "ops", "memory"]
    parts = [f"aodm benchmark ({results.get('mode')}) — {status(results).upper()}"]
    parts.append(machine_line(results))
    for _, header, rows in tables(results, names):
        parts += ["", text_table(header, rows)]
    notes = run_notes(results)
    if notes:
        parts += ["", *notes]
    return "\n".join(parts)


def machine_line(results: dict) -> str:
    m = results.get("meta", {})
    return (f"{m.get('nproc')} cores ({m.get('cpu')}), {m.get('memory_gib')} GiB, load average {m.get('loadavg_start')} → "
            f"{m.get('loadavg_end')}; RabbitMQ {m.get('rabbitmq')}, PostgreSQL {m.get('postgres')}, Python {m.get('python')}")


def run_notes(results: dict) -> list[str]:
    notes = []
    for name, r in sorted(results.get("runs", {}).items()):
        if r.get("errors"):
            notes.append(f"note: {name} had errors {r['errors']}")
        if r.get("missing_notifications"):
            notes.append(f"note: {name}: {r['missing_notifications']} notifications did not arrive in time")
        if r.get("overloaded"):
            kept = r.get("extra", {}).get("kept_up", {})
            notes.append(f"note: {name}: overloaded (⚠ in the table) — offered {num(r.get('offered_rate'))}/s, more than "
                         f"it sustained; the round trip's p50 went from {num(kept.get('rtt_first_quarter_p50_ms'))} ms in "
                         f"the first quarter of the run to {num(kept.get('rtt_last_quarter_p50_ms'))} ms in the last"
                         + (f"; {r['extra']['skipped_publishes']} publishes skipped (over two seconds' worth waiting)"
                            if r.get("extra", {}).get("skipped_publishes") else ""))
        short = r.get("extra", {}).get("short_pages")
        if short:
            notes.append(f"note: {name}: {short} pages had fewer than 50 messages")
    return notes


# -- docs/performance.md -------------------------------------------------------------------


def _replace_section(doc: str, name: str, body: str) -> str:
    begin, end = f"<!-- bench:begin {name} -->", f"<!-- bench:end {name} -->"
    block = f"{begin}\n{body.rstrip()}\n{end}"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    if pattern.search(doc):
        return pattern.sub(lambda _: block, doc)
    return doc.rstrip() + "\n\n" + block + "\n"


def results_markdown(results: dict) -> str:
    m = results.get("meta", {})
    lines = [
        f"**{status(results)}** — {m.get('started')} (load average {m.get('loadavg_start')} at the start, "
        f"{m.get('loadavg_end')} at the end, the benchmark's own load).",
        "",
        f"Command: `{m.get('command')}` ({results.get('mode')}, {m.get('elapsed_s', 0):.0f} s in all).",
        "",
        "| Machine | |",
        "|---|---|",
        f"| CPU | {m.get('nproc')} × {m.get('cpu')} |",
        f"| memory | {m.get('memory_gib')} GiB |",
        f"| kernel | {m.get('kernel')} |",
        f"| RabbitMQ | {m.get('rabbitmq')} (Erlang {m.get('erlang')}) |",
        f"| PostgreSQL | {m.get('postgres')}; {m.get('pg_settings')} |",
        f"| Python | {m.get('python')}; {m.get('libraries')} |",
        f"| aodm | {m.get('git')} |",
        "",
        f"Messages: aodm SendMessage envelope {get(results, ('message_bytes', 'aodm'))} bytes; baseline message "
        f"{get(results, ('message_bytes', 'baseline'))} bytes. Store for QueryMessage: "
        f"{num(get(results, ('store', 'rows')))} messages over {num(get(results, ('store', 'sessions')))} sessions "
        f"({num((get(results, ('store', 'table_bytes')) or 0) / 2**20)} MiB with indexes). "
        f"{results.get('config', {}).get('sessions')} sessions, {results.get('config', {}).get('senders')} senders, "
        f"{results.get('config', {}).get('inflight')} requests in flight in the closed-loop runs.",
    ]
    titles = {"pipeline": "Message pipeline: SendMessage vs the minimal pipeline",
              "reads": "Reads: QueryMessage vs a raw RPC round trip",
              "ops": "Other operations (ratio to the per-message baseline's msg/s, for scale)",
              "memory": f"Memory over the soak ({num(get(results, ('runs', 'soak', 'duration')))} s at "
                        f"{num(get(results, ('runs', 'soak', 'offered_rate')))} msg/s; VmRSS)"}
    for name, header, rows in tables(results, ["pipeline", "reads", "ops", "memory"]):
        lines += ["", f"#### {titles[name]}", "", md_table(header, rows)]
    notes = run_notes(results)
    if notes:
        lines += ["", *[f"- {n.removeprefix('note: ')}" for n in notes]]
    lines += ["", "![latency percentiles and throughput over time](performance.png)"]
    return "\n".join(lines)


def profile_markdown(results: dict) -> str:
    p = results.get("profile") or {}
    if not p or p.get("error"):
        return f"Profile not taken in this run ({p.get('error', 'disabled')})."
    lines = [
        f"py-spy, {p.get('seconds')} s at {p.get('rate')} Hz on the session worker (pid {p.get('pid')}) under a closed-loop "
        f"SendMessage load ({num(p.get('throughput'))} msg/s while sampled); {p.get('samples')} busy samples "
        "(idle time excluded). Flame graph: [profile-session.svg](profile-session.svg).",
        "",
        "| Category (deepest matching frame) | % of busy samples |",
        "|---|---:|",
        *[f"| {c} | {v} |" for c, v in p["categories"]],
        "",
        "| Function (own time) | % |",
        "|---|---:|",
        *[f"| `{f}` | {v} |" for f, v in p["own"]],
        "",
        "| aodm function (inclusive) | % |",
        "|---|---:|",
        *[f"| `{f}` | {v} |" for f, v in p["aodm_inclusive"]],
    ]
    return "\n".join(lines)


def workers_markdown(results: dict) -> str:
    m = results.get("meta", {})
    found = tables(results, ["workers"])
    if not found:
        return "No --workers run yet."
    _, header, rows = found[0]
    return "\n".join([
        f"**{status(results)}** — `{m.get('command')}`, {m.get('started')}, load average {m.get('loadavg_start')} at the start.",
        "",
        md_table(header, rows),
    ])


def write_markdown(path: Path, results: dict) -> None:
    doc = path.read_text() if path.exists() else "# aodm performance\n"
    if results.get("mode") == "workers":
        doc = _replace_section(doc, "workers", workers_markdown(results))
    else:
        doc = _replace_section(doc, "results", results_markdown(results))
        doc = _replace_section(doc, "profile", profile_markdown(results))
    path.write_text(doc)


# -- docs/performance.png ------------------------------------------------------------------


def plot(path: Path, results: dict) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    runs = results.get("runs", {})
    fig, axes = plt.subplots(2, 2, figsize=(14, 9))
    fig.suptitle(f"aodm vs baseline — {'provisional' if busy_at_start(results) else 'measured'} ({results.get('mode')}, "
                 f"{results.get('meta', {}).get('started')})")

    ax = axes[0][0]
    for name, label in (("aodm_max", "aodm SendMessage"), ("baseline_a_max", "baseline (a) 1 txn/msg"),
                        ("baseline_b_max", "baseline (b) group commit")):
        series = runs.get(name, {}).get("series_rate") or []
        if series:
            ax.plot([t for t, _ in series], [v for _, v in series], label=label)
    ax.set_title("Throughput over time, closed loop (completions/s)")
    ax.set_xlabel("s since start of run")
    ax.set_ylabel("msg/s")
    ax.legend()
    ax.grid(alpha=0.3)

    ax = axes[0][1]
    styles = {"p50": "-", "p95": "--", "p99": ":"}
    for name, color in (("aodm_500", "C0"), ("aodm_70", "C3"), ("baseline_b_500", "C2")):
        series = runs.get(name, {}).get("series_latency") or []
        rate = runs.get(name, {}).get("offered_rate")
        for i, p in enumerate(("p50", "p95", "p99")):
            if series:
                ax.plot([s[0] for s in series], [s[1 + i] for s in series], styles[p], color=color,
                        label=f"{name} ({num(rate)}/s) {p}")
    ax.set_yscale("log")
    ax.set_title("publish → notification latency over time (per-second percentiles)")
    ax.set_xlabel("s since start of run")
    ax.set_ylabel("ms (log)")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3, which="both")

    ax = axes[1][0]
    groups = [("aodm_500", "aodm @500"), ("baseline_a_500", "(a) @500"), ("baseline_b_500", "(b) @500"),
              ("aodm_70", "aodm @70%"), ("baseline_a_70", "(a) @70%"), ("baseline_b_70", "(b) @70%"),
              ("query_32", "Query ×32 (rtt)"), ("rpc_32", "RPC ×32 (rtt)")]
    width = 0.27
    for i, p in enumerate(("p50", "p95", "p99")):
        values = []
        for name, _ in groups:
            r = runs.get(name, {})
            v = (r.get("latency_ms") or {}).get(p) if not name.startswith(("query", "rpc")) else (r.get("rtt_ms") or {}).get(p)
            values.append(v if isinstance(v, (int, float)) and math.isfinite(v) else 0)
        ax.bar([j + (i - 1) * width for j in range(len(groups))], values, width, label=p)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels([g[1] for g in groups], rotation=20, fontsize=8)
    ax.set_yscale("log")
    ax.set_title("Latency percentiles (ms, log)")
    ax.legend()
    ax.grid(alpha=0.3, axis="y", which="both")

    ax = axes[1][1]
    soak = runs.get("soak", {})
    for name, m in sorted((results.get("memory") or {}).items()):
        if isinstance(m, dict) and m.get("samples"):
            ax.plot([t for t, _ in m["samples"]], [v for _, v in m["samples"]], label=f"{name} RSS")
    ax.set_xlabel("s since start of soak")
    ax.set_ylabel("MiB")
    ax.set_title(f"Soak: RSS and throughput ({num(soak.get('offered_rate'))} msg/s offered)")
    ax.grid(alpha=0.3)
    twin = ax.twinx()
    series = soak.get("series_rate") or []
    if series:
        twin.plot([t for t, _ in series], [v for _, v in series], color="grey", alpha=0.4, label="msg/s")
    twin.set_ylabel("msg/s")
    lines, labels = ax.get_legend_handles_labels()
    l2, lb2 = twin.get_legend_handles_labels()
    ax.legend(lines + l2, labels + lb2, fontsize=8, loc="lower right")

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True

