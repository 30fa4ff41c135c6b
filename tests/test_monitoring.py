"""Monitoring held to the code: the compose `monitoring` profile, prometheus.yml, the Grafana
dashboards' PromQL (every metric name must exist), the operations guide's settings table,
and real service processes: /healthz, /readyz and /metrics, their JSON log lines (at the
level of each outcome; a broker down or refusing at start), --help, and the names their
connections and consumers carry in the management API."""

import asyncio
import importlib
import json
import os
import platform
import re
import secrets
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from importlib import metadata
from pathlib import Path
from types import SimpleNamespace

import msgspec
import pytest
import yaml

from aodm import envelope, topology
from aodm.client import Client
from aodm.crypto import Identity
from aodm.encoding import b64encode
from aodm.errors import ERROR_CODES, InternalError, NotFound, Unauthorized
from aodm.registry_api import QueryHandle
from services.notifier import fanout
from services.registry.__main__ import ACTIONS
from shared import config, runtime
from shared import service as request_loop
from tests.conftest import MANAGEMENT, isolated_settings
from tests.isolation import management
from tests.processes import ServiceProcess

ROOT = Path(__file__).resolve().parent.parent
PROMETHEUS_YML = ROOT / "deploy" / "prometheus" / "prometheus.yml"
GRAFANA = ROOT / "deploy" / "grafana"
DASHBOARDS = sorted((GRAFANA / "dashboards").glob("*.json"))
OPERATIONS = ROOT / "docs" / "operations.md"
HTTP_PORT = 8080  # AODM_HTTP_PORT in docker-compose.yml

# The rabbitmq_prometheus families the dashboards may use, as RabbitMQ 3.10-3.13 name them.
# Aggregated (GET /metrics):
RABBITMQ_AGGREGATED = {
    "rabbitmq_build_info", "rabbitmq_identity_info",
    "rabbitmq_connections", "rabbitmq_connections_opened_total", "rabbitmq_connections_closed_total",
    "rabbitmq_channels", "rabbitmq_channels_opened_total", "rabbitmq_channels_closed_total",
    "rabbitmq_consumers", "rabbitmq_global_consumers", "rabbitmq_global_publishers",
    "rabbitmq_queues", "rabbitmq_queues_declared_total", "rabbitmq_queues_created_total", "rabbitmq_queues_deleted_total",
    "rabbitmq_queue_messages", "rabbitmq_queue_messages_ready", "rabbitmq_queue_messages_unacked",
    "rabbitmq_queue_consumers", "rabbitmq_queue_messages_published_total",
    "rabbitmq_global_messages_received_total", "rabbitmq_global_messages_received_confirm_total",
    "rabbitmq_global_messages_routed_total", "rabbitmq_global_messages_confirmed_total",
    "rabbitmq_global_messages_delivered_total", "rabbitmq_global_messages_acknowledged_total",
    "rabbitmq_global_messages_redelivered_total",
    "rabbitmq_global_messages_unroutable_returned_total", "rabbitmq_global_messages_unroutable_dropped_total",
    "rabbitmq_global_messages_dead_lettered_rejected_total", "rabbitmq_global_messages_dead_lettered_maxlen_total",
    "rabbitmq_global_messages_dead_lettered_expired_total",
    "rabbitmq_process_resident_memory_bytes", "rabbitmq_resident_memory_limit_bytes",
    "rabbitmq_disk_space_available_bytes", "rabbitmq_disk_space_available_limit_bytes",
    "rabbitmq_process_open_fds", "rabbitmq_process_max_fds", "rabbitmq_process_open_tcp_sockets",
    "rabbitmq_alarms_memory_used_watermark", "rabbitmq_alarms_free_disk_space_watermark",
    "rabbitmq_alarms_file_descriptor_limit",
    "rabbitmq_erlang_processes_used", "rabbitmq_erlang_processes_limit",
}
# Per queue, labels vhost and queue (GET /metrics/detailed?family=...), by family:
RABBITMQ_DETAILED = {
    "queue_coarse_metrics": {
        "rabbitmq_detailed_queue_messages", "rabbitmq_detailed_queue_messages_ready",
        "rabbitmq_detailed_queue_messages_unacked",
    },
    "queue_consumer_count": {"rabbitmq_detailed_queue_consumers"},
}
PROMETHEUS_BUILTIN = {"up", "scrape_duration_seconds", "scrape_samples_scraped"}

# -------------------------------------------------------------------------- helpers


def aodm_metrics() -> dict[str, str]:
    """name -> kind, from every metrics.describe() in the services' code."""
    found: dict[str, str] = {}
    for path in [*ROOT.glob("shared/**/*.py"), *ROOT.glob("services/**/*.py")]:
        for name, kind in re.findall(r'metrics\.describe\(\s*"([a-zA-Z_:][\w:]*)",\s*"(\w+)"', path.read_text()):
            found[name] = kind
    return found


def aodm_series_names() -> set[str]:
    names = set()
    for name, kind in aodm_metrics().items():
        names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"} if kind == "histogram" else {name}
    return names


_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGE = re.compile(r"\[[^\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENT = re.compile(r"(?<![\w.$])([a-zA-Z_:][\w:]*)(\s*\()?")
_KEYWORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan", "by", "without", "on", "ignoring",
             "group_left", "group_right"}


def promql_metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (functions, keywords, labels and
    Grafana's $variables left out)."""
    text = _STRING.sub('""', expr)
    text = _MATCHERS.sub("", text)
    text = _RANGE.sub("", text)
    text = _GROUPING.sub("", text)
    return {name for name, call in _IDENT.findall(text) if not call and name not in _KEYWORDS}


def test_promql_metric_names_parser() -> None:
    expr = ('histogram_quantile(0.95, sum by (le, action) (rate(aodm_request_duration_seconds_bucket'
            '{service=~"$service",queue=~"a{1}[.]b"}[$__rate_interval]))) / on (vhost) group_left(x) '
            'rabbitmq_queues > bool 1 unless up offset 5m or vector(0)')
    assert promql_metric_names(expr) == {"aodm_request_duration_seconds_bucket", "rabbitmq_queues", "up"}


def dashboard_exprs(dashboard: dict) -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target and every query variable."""
    exprs = []

    def walk(panels: list[dict]) -> None:
        for panel in panels:
            for target in panel.get("targets", []):
                if target.get("expr"):
                    exprs.append((f"panel {panel.get('title')!r}", target["expr"]))
            walk(panel.get("panels", []))

    walk(dashboard.get("panels", []))
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable.get("type") == "query":
            query = variable["query"]
            query = query.get("query", "") if isinstance(query, dict) else query
            match = re.fullmatch(r"\s*label_values\((.*),\s*\w+\)\s*", query)
            exprs.append((f"variable ${variable['name']}", match[1] if match else query))
    return exprs


def load_yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


@pytest.fixture(scope="module")
def compose() -> dict:
    return load_yaml(ROOT / "docker-compose.yml")


@pytest.fixture(scope="module")
def prometheus() -> dict:
    return load_yaml(PROMETHEUS_YML)


def app_services(compose: dict) -> list[str]:
    """The compose services that run an aodm service process (python -m services.X)."""
    return [
        name for name, service in compose["services"].items()
        if service.get("command", [])[:2] == ["python", "-m"] and service["command"][2].startswith("services.")
    ]


def jobs(prometheus: dict) -> dict[str, dict]:
    return {job["job_name"]: job for job in prometheus["scrape_configs"]}


def mounts(service: dict) -> dict[str, str]:
    """container path -> host path (bind mounts written as strings)."""
    out = {}
    for volume in service.get("volumes", []):
        source, target = str(volume).split(":")[:2]
        out[target] = source
    return out


# -------------------------------------------------------------- docker-compose.yml


def test_monitoring_profile(compose: dict) -> None:
    services = compose["services"]
    for name in ("prometheus", "grafana"):
        assert name in services, f"docker-compose.yml has no {name} service"
        assert services[name].get("profiles") == ["monitoring"], f"{name} must be in the monitoring profile only"
    assert services["prometheus"]["image"].startswith("prom/prometheus")
    assert services["grafana"]["image"].startswith("grafana/grafana")
    for name in [*app_services(compose), "rabbitmq", "postgres"]:
        assert not services[name].get("profiles"), f"{name} must run without a profile"
    published = {name: {str(p).split(":")[-2] for p in services[name].get("ports", [])} for name in ("prometheus", "grafana")}
    assert "9090" in published["prometheus"] and "3000" in published["grafana"]


def test_prometheus_service_reads_the_config(compose: dict) -> None:
    service = compose["services"]["prometheus"]
    config_file = next(
        (arg.split("=", 1)[1] for arg in service.get("command", []) if arg.startswith("--config.file=")),
        "/etc/prometheus/prometheus.yml",  # the image's default
    )
    assert mounts(service).get(config_file) == "./deploy/prometheus/prometheus.yml"


def test_grafana_service_is_provisioned(compose: dict) -> None:
    service = compose["services"]["grafana"]
    mounted = mounts(service)
    provisioning = {
        target: ROOT / source for target, source in mounted.items() if target.startswith("/etc/grafana/provisioning")
    }
    assert provisioning, "grafana mounts no provisioning"

    def host_path(container_path: str) -> Path | None:
        for target, source in mounted.items():
            if container_path == target or container_path.startswith(target.rstrip("/") + "/"):
                return ROOT / source / container_path[len(target):].lstrip("/")
        return None

    datasources = host_path("/etc/grafana/provisioning/datasources")
    providers = host_path("/etc/grafana/provisioning/dashboards")
    assert datasources and datasources.is_dir() and providers and providers.is_dir()
    (provider,) = [p for f in providers.glob("*.y*ml") for p in load_yaml(f)["providers"]]
    dashboards = host_path(provider["options"]["path"])
    assert dashboards and dashboards.resolve() == (GRAFANA / "dashboards").resolve(), (
        "the dashboards folder is not mounted where the provider reads"
    )
    (source,) = [d for f in datasources.glob("*.y*ml") for d in load_yaml(f)["datasources"]]
    assert source["type"] == "prometheus" and source.get("isDefault")
    url = urllib.parse.urlsplit(source["url"])
    assert url.hostname == "prometheus" and url.port == 9090
    env = service.get("environment", {})
    home = env.get("GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH")
    if home:
        assert host_path(home) and host_path(home).is_file(), f"home dashboard {home} is not a mounted file"
    assert env.get("GF_AUTH_ANONYMOUS_ENABLED") == "true" or env.get("GF_SECURITY_ADMIN_PASSWORD")


# ------------------------------------------------------------------ prometheus.yml


def test_prometheus_scrapes_rabbitmq(prometheus: dict) -> None:
    rabbit = [
        job for job in prometheus["scrape_configs"]
        if any("rabbitmq:15692" in t for sc in job.get("static_configs", []) for t in sc["targets"])
    ]
    paths = {job.get("metrics_path", "/metrics") for job in rabbit}
    assert "/metrics" in paths, "no job scrapes RabbitMQ's aggregated /metrics"
    assert paths & {"/metrics/detailed", "/metrics/per-object"}, "no job scrapes RabbitMQ's per-queue metrics"


def test_prometheus_scrapes_every_aodm_service(compose: dict, prometheus: dict) -> None:
    targets: dict[str, str] = {}  # service -> metrics path
    for job in prometheus["scrape_configs"]:
        for sd in job.get("dns_sd_configs", []):
            assert sd.get("type", "SRV") == "A" and sd["port"] == HTTP_PORT, job["job_name"]
            for name in sd["names"]:
                targets[name.removeprefix("tasks.")] = job.get("metrics_path", "/metrics")
        for sc in job.get("static_configs", []):
            for target in sc["targets"]:
                host, _, port = target.partition(":")
                if port == str(HTTP_PORT):
                    targets[host] = job.get("metrics_path", "/metrics")
    for name in app_services(compose):
        assert targets.get(name) == "/metrics", f"prometheus.yml does not scrape {name}:{HTTP_PORT}/metrics"
        env = compose["services"][name]["environment"]
        assert str(env["AODM_HTTP_PORT"]) == str(HTTP_PORT)
    session_jobs = [j for j in prometheus["scrape_configs"] for sd in j.get("dns_sd_configs", []) if "session" in sd["names"]]
    assert session_jobs, "session must be found through DNS, so every `--scale session=N` replica is scraped"


def test_target_labels_do_not_clobber_metric_labels(prometheus: dict) -> None:
    """The services' series carry service/action/outcome/kind labels: a target label of the
    same name would rename them to exported_* (honor_labels would keep them)."""
    for job in prometheus["scrape_configs"]:
        if job.get("honor_labels"):
            continue
        for rule in job.get("relabel_configs", []):
            assert rule.get("target_label") not in {"service", "action", "outcome", "kind", "queue", "vhost"}, job["job_name"]


def test_detailed_families_are_scraped(prometheus: dict) -> None:
    """Every rabbitmq_detailed_* name the dashboards use comes from a family prometheus.yml asks for."""
    families = {
        family
        for job in prometheus["scrape_configs"]
        if job.get("metrics_path") == "/metrics/detailed"
        for family in job.get("params", {}).get("family", [])
    }
    available = set().union(*(RABBITMQ_DETAILED[f] for f in families if f in RABBITMQ_DETAILED))
    used = {name for d in DASHBOARDS for _, e in dashboard_exprs(json.loads(d.read_text())) for name in promql_metric_names(e)}
    missing = {name for name in used if name.startswith("rabbitmq_detailed_")} - available
    assert not missing, f"dashboards use {sorted(missing)}, but prometheus.yml scrapes only the families {sorted(families)}"


# --------------------------------------------------------------------- dashboards


def test_dashboards_exist() -> None:
    assert {d.name for d in DASHBOARDS} >= {"aodm.json", "rabbitmq-overview.json"}


@pytest.mark.parametrize("path", DASHBOARDS, ids=[d.name for d in DASHBOARDS])
def test_dashboard_metric_names_exist(path: Path) -> None:
    dashboard = json.loads(path.read_text())
    known = aodm_series_names() | RABBITMQ_AGGREGATED | set().union(*RABBITMQ_DETAILED.values()) | PROMETHEUS_BUILTIN
    exprs = dashboard_exprs(dashboard)
    assert exprs, f"{path.name} has no queries"
    unknown = [(where, name) for where, expr in exprs for name in sorted(promql_metric_names(expr)) if name not in known]
    assert not unknown, f"{path.name}: metric names that neither aodm nor rabbitmq_prometheus exposes: {unknown}"
    for where, expr in exprs:
        assert expr.count("(") == expr.count(")") and expr.count("{") == expr.count("}"), f"{path.name} {where}: {expr}"


@pytest.mark.parametrize("path", DASHBOARDS, ids=[d.name for d in DASHBOARDS])
def test_dashboard_is_well_formed(path: Path) -> None:
    dashboard = json.loads(path.read_text())
    assert dashboard.get("uid") and dashboard.get("title")
    variables = {v["name"] for v in dashboard.get("templating", {}).get("list", [])}
    ids = []
    for panel in dashboard["panels"]:
        ids.append(panel["id"])
        pos = panel["gridPos"]
        assert pos["x"] >= 0 and pos["x"] + pos["w"] <= 24, panel["title"]
        for target in panel.get("targets", []):
            source = target.get("datasource") or panel.get("datasource")
            assert source and source.get("type") == "prometheus", panel["title"]
            uid = source.get("uid", "")
            if uid.startswith("$"):
                assert uid.strip("${}") in variables, f"{panel['title']}: data source variable {uid} is not defined"
            for used in re.findall(r"\$(\w+)", target["expr"]):
                assert used.startswith("__") or used in variables, f"{panel['title']}: ${used} is not a variable"
    assert len(ids) == len(set(ids)), f"{path.name}: duplicate panel ids"


def test_dashboard_uids_are_unique() -> None:
    uids = [json.loads(d.read_text())["uid"] for d in DASHBOARDS]
    assert len(uids) == len(set(uids))


def test_aodm_dashboard_covers_the_services() -> None:
    exprs = " ".join(e for _, e in dashboard_exprs(json.loads((GRAFANA / "dashboards" / "aodm.json").read_text())))
    for name in aodm_metrics():
        assert name in exprs, f"the aodm dashboard does not chart {name}"
    assert topology.DEAD_LETTER_QUEUE in exprs
    assert "aodm[.]session[.]shard[.]" in exprs and topology.shard_queue(0).startswith("aodm.session.shard.")
    assert topology.WORKERS_QUEUE in exprs


def test_every_metric_used_is_described() -> None:
    """metrics.inc/observe of an undescribed name would render without HELP/TYPE."""
    described = aodm_metrics()
    for path in [*ROOT.glob("shared/**/*.py"), *ROOT.glob("services/**/*.py")]:
        for name in re.findall(r'metrics\.(?:inc|observe)\(\s*"([\w:]+)"', path.read_text()):
            assert name in described, f"{path.relative_to(ROOT)} records {name}, which no metrics.describe() declares"


# ----------------------------------------------------------------- operations.md

BEGIN, END = "<!-- variables:begin -->", "<!-- variables:end -->"


def variable_table() -> str:
    """The settings table of docs/operations.md, generated from shared.config.VARIABLES."""
    rows = ["| Variable | Default | Meaning |", "| --- | --- | --- |"]
    for name, (default, _, meaning) in config.VARIABLES.items():
        shown = f"`{default}`" if default else "(empty)"
        meaning = meaning.replace("|", r"\|")
        rows.append(f"| `{name}` | {shown} | {meaning} |")
    return "\n".join(rows)


def test_operations_variable_table_matches_config() -> None:
    text = OPERATIONS.read_text()
    assert BEGIN in text and END in text, f"docs/operations.md lacks the {BEGIN} ... {END} table"
    table = text.split(BEGIN, 1)[1].split(END, 1)[0].strip()
    assert table == variable_table(), (
        "docs/operations.md's settings table is out of step with shared/config.py VARIABLES; "
        f"replace it with:\n\n{variable_table()}\n"
    )


def test_operations_documents_every_metric() -> None:
    text = OPERATIONS.read_text()
    missing = [name for name in aodm_metrics() if f"`{name}" not in text]
    assert not missing, f"docs/operations.md does not describe the metrics {missing}"


# ------------------------------------------------------------------- live: broker


def _get(url: str, timeout: float = 5) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _families(text: str) -> set[str]:
    return set(re.findall(r"^# TYPE (\S+) ", text, re.MULTILINE))


def test_rabbitmq_exposes_the_listed_families(prometheus: dict) -> None:
    """The lists above, and the exact scrapes of prometheus.yml, against the test broker."""
    host = urllib.parse.urlsplit(MANAGEMENT).hostname
    base = f"http://{host}:15692"
    try:
        _get(f"{base}/metrics", timeout=3)
    except OSError as exc:
        pytest.skip(f"RabbitMQ's Prometheus endpoint {base} does not answer: {exc}")
    exposed: set[str] = set()
    for job in prometheus["scrape_configs"]:
        if not any("rabbitmq:15692" in t for sc in job.get("static_configs", []) for t in sc["targets"]):
            continue
        query = urllib.parse.urlencode(job.get("params", {}), doseq=True)
        status, text = _get(f"{base}{job.get('metrics_path', '/metrics')}" + (f"?{query}" if query else ""), timeout=30)
        assert status == 200, f"{job['job_name']}: {status}"
        exposed |= _families(text)
    listed = RABBITMQ_AGGREGATED | set().union(*RABBITMQ_DETAILED.values())
    assert not listed - exposed, f"the broker does not expose {sorted(listed - exposed)}"


# ------------------------------------------------------- live: a service process


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _parse_metrics(text: str) -> dict[tuple[str, frozenset], float]:
    series = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = re.fullmatch(r"([a-zA-Z_:][\w:]*)(?:\{(.*)\})? (\S+)", line)
        assert match, f"not Prometheus text format: {line!r}"
        labels = frozenset(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', match[2] or ""))
        series[(match[1], labels)] = float(match[3])
    return series


async def _poll(url: str, proc: ServiceProcess, status: int = 200, timeout: float = 60) -> str:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        assert proc.alive, f"{proc.name} exited:\n{proc.log()[-3000:]}"
        try:
            code, body = await asyncio.to_thread(_get, url)
            if code == status:
                return body
        except OSError:
            pass
        assert asyncio.get_running_loop().time() < deadline, f"{url} never answered {status}:\n{proc.log()[-3000:]}"
        await asyncio.sleep(0.2)


async def test_service_process_health_metrics_and_stop(tmp_path: Path) -> None:
    async with isolated_settings() as settings:
        port = _free_port()
        base = f"http://127.0.0.1:{port}"
        proc = ServiceProcess("registry", settings, tmp_path, AODM_HTTP_PORT=str(port), AODM_FAULTS="poison").start()
        client = None
        try:
            assert await _poll(f"{base}/healthz", proc) == "ok\n"
            assert await _poll(f"{base}/readyz", proc) == "ready\n"
            assert (await asyncio.to_thread(_get, f"{base}/nothing-here"))[0] == 404
            # Before any request: every action's series at 0, the process and the build.
            fresh = _parse_metrics((await asyncio.to_thread(_get, f"{base}/metrics"))[1])
            for action in ACTIONS:
                for outcome in ("ok", "internal"):
                    key = ("aodm_requests_total", frozenset({("service", "registry"), ("action", action), ("outcome", outcome)}))
                    assert fresh[key] == 0, key
            assert fresh[("aodm_dead_lettered_total", frozenset({("service", "registry")}))] == 0
            _check_process_series(fresh, proc)

            client = await Client.connect(settings.amqp_url, Identity.generate(), timeout=30)
            with pytest.raises(NotFound):
                await client.query_handle(f"nobody-{secrets.token_hex(4)}")
            # A request whose handler always raises: retried, answered `internal`, dead-lettered.
            poison = envelope.sign(
                client.identity.signing_key, target="registry", from_=None, action="QueryHandle",
                data=msgspec.json.encode(QueryHandle("whoever")).decode(), anchor=b64encode(secrets.token_bytes(16)),
                extra_tags=[envelope.Tag("Fault", "poison")],
            )
            with pytest.raises(InternalError):
                await client.send_envelope(poison)
            # From a handle nobody registered: refused.
            forged = envelope.sign(
                client.identity.signing_key, target="registry", from_=f"ghost-{secrets.token_hex(4)}",
                action="QueryHandle", data=msgspec.json.encode(QueryHandle("whoever")).decode(),
                anchor=b64encode(secrets.token_bytes(16)),
            )
            with pytest.raises(Unauthorized):
                await client.send_envelope(forged)

            status, text = await asyncio.to_thread(_get, f"{base}/metrics")
            assert status == 200
            series = _parse_metrics(text)
            assert "# TYPE aodm_requests_total counter" in text
            assert series[("aodm_requests_total", frozenset({
                ("service", "registry"), ("action", "QueryHandle"), ("outcome", "not_found")}))] == 1
            assert series[("aodm_requests_total", frozenset({
                ("service", "registry"), ("action", "QueryHandle"), ("outcome", "internal")}))] == 1
            assert series[("aodm_requests_total", frozenset({
                ("service", "registry"), ("action", "QueryHandle"), ("outcome", "unauthorized")}))] == 1
            assert series[("aodm_request_duration_seconds_count", frozenset({
                ("service", "registry"), ("action", "QueryHandle")}))] == 3
            assert series[("aodm_request_duration_seconds_bucket", frozenset({
                ("service", "registry"), ("action", "QueryHandle"), ("le", "+Inf")}))] == 3
            assert "# TYPE aodm_dead_lettered_total counter" in text
            assert series[("aodm_dead_lettered_total", frozenset({("service", "registry")}))] == 1
            assert await client.bus.message_count(topology.DEAD_LETTER_QUEUE) == 1

            # One JSON line per handled request: action, outcome, duration, ids; its level by
            # its outcome. Every line the process wrote is JSON (the libraries' too).
            handled = [
                line for line in _json_lines(proc)
                if line.get("event") == "handled" and line.get("service") == "registry"
            ]
            levels = {(h["action"], h["outcome"], h["level"]) for h in handled}
            assert levels >= {("QueryHandle", "not_found", "info"), ("QueryHandle", "internal", "error"),
                              ("QueryHandle", "unauthorized", "warning")}
            for line in handled:
                assert line["request_id"] and isinstance(line["duration_ms"], (int, float)) and line["timestamp"]
            assert settings.amqp_url not in proc.log() and settings.database_url not in proc.log()
        finally:
            if client is not None:
                await client.close()
            code = await asyncio.to_thread(proc.terminate, 30) if proc.alive else proc.proc.returncode
        assert code == 0, f"SIGTERM should stop registry cleanly:\n{proc.log()[-3000:]}"
        assert "service stopped" in proc.log()
        with pytest.raises(OSError):
            await asyncio.to_thread(_get, f"{base}/readyz", 2)


def _json_lines(proc: ServiceProcess) -> list[dict]:
    """Every complete line the process wrote (stdout and stderr), each parsed as JSON."""
    lines = []
    for raw in proc.log().split("\n")[:-1]:  # the last piece is "" or a line still being written
        try:
            lines.append(json.loads(raw))
        except json.JSONDecodeError:
            pytest.fail(f"{proc.name} wrote a line that is not JSON: {raw!r}")
    return lines


def _check_process_series(series: dict, proc: ServiceProcess) -> None:
    def one(name: str) -> float:
        return series[(name, frozenset())]

    assert one("process_cpu_seconds_total") > 0
    assert one("process_resident_memory_bytes") > 10 * 2**20 and one("process_virtual_memory_bytes") > 0
    assert 3 <= one("process_open_fds") <= one("process_max_fds")
    assert time.time() - 600 < one("process_start_time_seconds") <= time.time()
    build = frozenset({("version", metadata.version("aodm")), ("python", platform.python_version())})
    assert series[("aodm_build_info", build)] == 1


async def _until(predicate, what: str, proc: ServiceProcess, timeout: float = 30):
    deadline = asyncio.get_running_loop().time() + timeout
    while not (result := await predicate()):
        assert asyncio.get_running_loop().time() < deadline, f"{what}: not in {timeout} s\n{proc.log()[-3000:]}"
        await asyncio.sleep(0.2)
    return result


def test_handled_lines_are_logged_at_the_level_of_their_outcome(monkeypatch: pytest.MonkeyPatch) -> None:
    """ok and the answers that refuse nothing at info, every refusal at warning, a bug at error."""
    logged: list[tuple[str, str]] = []

    class Recorder:
        def __getattr__(self, level: str):
            return lambda event, **fields: logged.append((fields["outcome"], level))

    monkeypatch.setattr(request_loop, "log", Recorder())
    processor = object.__new__(request_loop.Processor)
    processor.name = "test"
    codes = ["ok", request_loop.FENCED, *ERROR_CODES]
    processor._log([request_loop.Outcome(SimpleNamespace(redelivered=False), code=code) for code in codes], len(codes), 0.01)
    answers = {"ok", request_loop.FENCED, "not_found", "already_exists", "no_session_key"}
    expected = [(code, "info" if code in answers else "error" if code == "internal" else "warning") for code in codes]
    assert logged == expected
    assert {"unauthorized", "invalid_signature", "forbidden", "malformed_request", "not_accepted", "rate_limited"} <= {
        code for code, level in logged if level == "warning"}


@pytest.mark.parametrize("name", ["registry", "session", "notifier"])
def test_help_describes_the_service_and_every_setting(name: str) -> None:
    env = {**os.environ, "AODM_AMQP_URL": "amqp://guest:guest@127.0.0.1:1/"}  # it must not connect anyway
    done = subprocess.run([sys.executable, "-m", f"services.{name}", "--help"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    description = importlib.import_module(f"services.{name}.__main__").__doc__
    assert " ".join(description.split()) in " ".join(done.stdout.split())
    for variable, (default, _, meaning) in config.VARIABLES.items():
        assert f"  {variable}={default}\n" in done.stdout
        assert " ".join(meaning.split()) in " ".join(done.stdout.split())
    assert "service starting" not in done.stdout


async def test_broker_down_at_start_is_waited_for_in_json_lines(tmp_path: Path) -> None:
    """No broker behind the URL: the service retries with growing pauses, a JSON warning an
    attempt, says alive but not ready meanwhile, and stops cleanly on SIGTERM."""
    async with isolated_settings() as settings:
        port = _free_port()
        base = f"http://127.0.0.1:{port}"
        proc = ServiceProcess("registry", settings, tmp_path, AODM_HTTP_PORT=str(port),
                              AODM_AMQP_URL=f"amqp://guest:guest@127.0.0.1:{_free_port()}/").start()

        def attempts() -> list[dict]:
            return [line for line in _json_lines(proc) if line["event"] == "broker not reachable yet"]

        try:
            assert await _poll(f"{base}/healthz", proc) == "ok\n"

            async def three_attempts() -> bool:
                return len(attempts()) >= 3

            await _until(three_attempts, "three connection attempts logged", proc)
            assert (await asyncio.to_thread(_get, f"{base}/readyz"))[0] == 503
        finally:
            code = await asyncio.to_thread(proc.terminate, 30) if proc.alive else proc.proc.returncode
        assert code == 0, proc.log()[-3000:]
        assert proc.log().endswith("\n")
        lines, tried = _json_lines(proc), attempts()
        assert [a["attempt"] for a in tried] == list(range(1, len(tried) + 1))
        pauses = [a["retry_in_s"] for a in tried]
        assert pauses == sorted(pauses) and pauses[0] < pauses[-1] <= runtime.BROKER_RETRY_CAP_S
        assert {a["level"] for a in tried} == {"warning"} and all(a["error"] for a in tried)
        assert not [line for line in lines if line["level"] in ("error", "critical")]
        assert lines[-1]["event"] == "service stopped"


async def test_a_refused_login_is_one_json_error_line_and_exit_2(tmp_path: Path) -> None:
    async with isolated_settings() as settings:
        url = urllib.parse.urlsplit(settings.amqp_url)
        wrong = url._replace(netloc=f"{url.username or 'guest'}:not-{secrets.token_hex(4)}@{url.hostname}:{url.port or 5672}")
        proc = ServiceProcess("notifier", settings, tmp_path, AODM_AMQP_URL=urllib.parse.urlunsplit(wrong)).start()
        code = await asyncio.to_thread(proc.proc.wait, 60)
        assert code == 2, proc.log()[-3000:]
        errors = [line for line in _json_lines(proc) if line["level"] in ("error", "critical")]
        assert [e["event"] for e in errors] == ["broker refused the connection, check AODM_AMQP_URL"]
        assert wrong.password not in proc.log()


async def test_a_bad_setting_is_one_json_error_line_and_exit_2(tmp_path: Path) -> None:
    async with isolated_settings() as settings:
        proc = ServiceProcess("notifier", settings, tmp_path, AODM_PREFETCH="0").start()
        assert await asyncio.to_thread(proc.proc.wait, 60) == 2
        (line,) = _json_lines(proc)
        assert (line["event"], line["level"]) == ("configuration error", "error") and "AODM_PREFETCH" in line["error"]


async def test_connections_and_consumers_name_their_process_and_the_notifier_counts(tmp_path: Path) -> None:
    """In the management API, each service's connections and consumer tags say which
    process they are (service, host, pid); the notifier's /metrics count what it does."""
    async with isolated_settings() as settings:
        vhost = urllib.parse.unquote(urllib.parse.urlsplit(settings.amqp_url).path[1:]) or "/"
        ports = {name: _free_port() for name in ("registry", "notifier")}
        procs = {name: ServiceProcess(name, settings, tmp_path, AODM_HTTP_PORT=str(port)).start() for name, port in ports.items()}
        notifier_metrics = f"http://127.0.0.1:{ports['notifier']}/metrics"
        client = None
        try:
            for name, proc in procs.items():
                await _poll(f"http://127.0.0.1:{ports[name]}/readyz", proc)
            fresh = _parse_metrics((await asyncio.to_thread(_get, notifier_metrics))[1])
            for kind in fanout.EVENT_KINDS:
                assert fresh[("aodm_notifier_events_total", frozenset({("kind", kind)}))] == 0
            for reason in fanout.DECLARE_REASONS:
                assert fresh[("aodm_inboxes_declared_total", frozenset({("reason", reason)}))] == 0
            for reason in fanout.FAILURE_REASONS:
                assert fresh[("aodm_notifier_failures_total", frozenset({("reason", reason)}))] == 0
            for kind in fanout.NOTIFICATION_KINDS:
                assert fresh[("aodm_notifications_total", frozenset({("kind", kind), ("service", "notifier")}))] == 0
            _check_process_series(fresh, procs["notifier"])

            client = await Client.connect(settings.amqp_url, Identity.generate(), timeout=30)
            await client.register(f"seen-{secrets.token_hex(4)}")

            async def counted() -> dict | None:
                series = _parse_metrics((await asyncio.to_thread(_get, notifier_metrics))[1])
                if series[("aodm_inboxes_declared_total", frozenset({("reason", "registered")}))] == 1:
                    return series
                return None

            series = await _until(counted, "the notifier counting the registration", procs["notifier"])
            assert series[("aodm_notifier_events_total", frozenset({("kind", "HandleRegistered")}))] == 1

            names = {name: f"aodm-{name}@{socket.gethostname()}[{proc.proc.pid}]" for name, proc in procs.items()}

            async def connections() -> set[str]:
                listed = json.loads(await asyncio.to_thread(management, "GET", "/connections"))
                found = {c.get("client_properties", {}).get("connection_name") for c in listed if c["vhost"] == vhost}
                expected = {*names.values(), *(f"{n} (consumers)" for n in names.values())}
                return expected <= found

            await _until(connections, "both services' two connections listed", procs["registry"])

            async def consumers() -> dict[str, list[str]]:
                listed = json.loads(await asyncio.to_thread(management, "GET", f"/consumers/{urllib.parse.quote(vhost, safe='')}"))
                tags: dict[str, list[str]] = {}
                for consumer in listed:
                    tags.setdefault(consumer["queue"]["name"], []).append(consumer["consumer_tag"])
                wanted = (topology.REGISTRY_QUEUE, topology.ACTIVITY_QUEUE, topology.NOTIFIER_QUEUE)
                return tags if all(queue in tags for queue in wanted) else {}

            tags = await _until(consumers, "the services' consumers listed", procs["registry"])
            for queue, owner in ((topology.REGISTRY_QUEUE, "registry"), (topology.ACTIVITY_QUEUE, "registry"),
                                 (topology.NOTIFIER_QUEUE, "notifier")):
                assert [re.fullmatch(re.escape(names[owner]) + r" #\d+", tag) is not None for tag in tags[queue]] == [True], tags
        finally:
            if client is not None:
                await client.close()
            for proc in procs.values():
                if proc.alive:
                    assert await asyncio.to_thread(proc.terminate, 30) == 0


if __name__ == "__main__":  # `.venv/bin/python -m tests.test_monitoring` prints the settings table for the docs
    print(variable_table())
