"""The benchmark's smoke run (`python -m bench --smoke`): every stage for a few seconds, in a
vhost and a database of its own with the services as real processes. It must produce every
figure with a sane ratio to its baseline and clean up after itself. No speed thresholds:
the machine is shared."""

import json
import math
import subprocess
import sys
import urllib.error

import asyncpg
import pytest

from bench import report
from bench.env import DATABASE_BASE, management
from bench.queues import LAYOUTS, table
from tests.processes import ROOT


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench")
    out, results_path = tmp / "docs", tmp / "results.json"
    run = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke", "--out", str(out), "--json", str(results_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=280,
    )
    assert run.returncode == 0, f"stdout:\n{run.stdout[-3000:]}\nstderr:\n{run.stderr[-5000:]}"
    return run, json.loads(results_path.read_text()), out


@pytest.mark.timeout(300)
def test_smoke_produces_every_figure(smoke):
    _run, results, _out = smoke
    assert report.missing_figures(results) == []
    assert results["store"]["rows"] >= results["config"]["store"]
    for action in ("Register", "EstablishSession", "RotateSessionKey"):
        assert results["seed"][action]["errors"] == {}
    for name, r in results["runs"].items():
        assert not r["errors"], f"{name}: {r['errors']}"
        assert r["missing_notifications"] == 0, name
    for name in ("query_1", "query_32", "rpc_1", "rpc_32"):
        assert not results["runs"][name]["extra"].get("short_pages"), name
    for key in ("registry", "session-1", "notifier"):
        assert results["memory"][key]["samples"], key


@pytest.mark.timeout(300)
def test_smoke_ratios_are_sane(smoke):
    _, results, _ = smoke
    runs = results["runs"]
    aodm = runs["aodm_max"]["throughput"]
    for base in ("baseline_a_max", "baseline_b_max"):
        # aodm does strictly more work per message than the minimal pipeline, on the same
        # machine: it cannot be many times faster; and it must have done something.
        assert 0 < aodm / runs[base]["throughput"] < 5, base
    for load in ("500", "70"):
        for base in ("baseline_a", "baseline_b"):
            for p in ("p50", "p99"):
                r = runs[f"aodm_{load}"]["latency_ms"][p] / runs[f"{base}_{load}"]["latency_ms"][p]
                assert 0 < r < math.inf
            assert runs[f"aodm_{load}"]["latency_ms"]["p50"] <= runs[f"aodm_{load}"]["latency_ms"]["p99"]
    for c in (1, 32):
        assert 0 < runs[f"query_{c}"]["throughput"] / runs[f"rpc_{c}"]["throughput"] < 5


@pytest.mark.timeout(300)
def test_smoke_writes_the_table_the_doc_and_the_plot(smoke):
    run, results, out = smoke
    for header in ("aodm ÷ (a)", "aodm ÷ (b)", "aodm ÷ RPC", "flat ±10%"):
        assert header in run.stdout
    label = report.status(results)
    assert label.upper() in run.stdout
    doc = (out / "performance.md").read_text()
    assert "<!-- bench:begin results -->" in doc and "<!-- bench:end results -->" in doc
    assert f"**{label}** — " in doc
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        pytest.skip("matplotlib not installed (the bench extra): no plot expected")
    assert (out / "performance.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.timeout(300)
async def test_smoke_leaves_no_vhost_or_database(smoke):
    _, results, _ = smoke
    world = results["world"]
    with pytest.raises(urllib.error.HTTPError) as gone:
        management("GET", f"/vhosts/{world['vhost']}")
    assert gone.value.code == 404
    conn = await asyncpg.connect(DATABASE_BASE)
    try:
        assert await conn.fetchval("SELECT count(*) FROM pg_database WHERE datname = $1", world["database"]) == 0
    finally:
        await conn.close()


def _table_rows(module: str, messages: int) -> list[list[str]]:
    """Run a stand-alone measurement (python -m bench.<module>); the rows of the table it prints."""
    run = subprocess.run([sys.executable, "-m", f"bench.{module}", "--messages", str(messages)], cwd=ROOT,
                         capture_output=True, text=True, timeout=110)
    assert run.returncode == 0, run.stderr[-3000:]
    return [line.split("|")[1:-1] for line in run.stdout.splitlines() if line.startswith("| ") and "×" in line]


@pytest.mark.timeout(120)
def test_queue_layout_benchmark_prints_its_table():
    # Enough messages that one queue's run spans many 10 ms CPU clock ticks of the broker.
    rows = _table_rows("queues", 3000)
    assert [int(r[0].replace(",", "")) for r in rows] == [1, 8, 64, 1000]
    assert rows[0][3].strip() == rows[0][6].strip() == "1.00×"
    assert all(float(r[i].replace(",", "")) > 0 for r in rows for i in (1, 2, 4, 5))


@pytest.mark.timeout(120)
def test_statement_benchmark_prints_its_table():
    rows = _table_rows("statement", 200)
    assert [int(r[0]) for r in rows] == [1, 4, 20, 100]
    # CPU planned once, at every call, before message requests; wall planned once, at every call.
    assert all(float(cell) > 0 for r in rows for cell in (r[1], r[2], r[4], r[6], r[7]))
    assert all(r[3].strip().endswith("×") and r[5].strip().endswith("×") for r in rows)


def test_a_run_begun_on_a_busy_machine_is_marked_provisional():
    idle = {"meta": {"loadavg_start": "0.12 0.40 0.80"}}
    busy = {"meta": {"loadavg_start": "1.29 1.43 0.86"}}
    assert report.status(idle) == "Measured"
    assert report.status(busy).startswith("Provisional")
    assert report.results_markdown(busy).startswith("**Provisional")


def test_queue_layout_table_survives_a_run_too_short_for_one_clock_tick():
    rows = [{"queues": q, "kind": k, "rate": 1000.0, "broker_us": 0.0 if q == 1 else 80.0}
            for q in LAYOUTS for k in ("persistent", "transient")]
    lines = table(rows).splitlines()
    assert lines[2].split("|")[4].strip() == "–"  # no ratio to a zero
    assert lines[3].split("|")[3].strip() == "80"
