"""docker-compose.yml, the Dockerfile and the run scripts held to the code (no broker needed)."""

import ast
import json
import re
import tomllib
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
import yaml

from shared import config

ROOT = Path(__file__).resolve().parent.parent
APP_SERVICES = ["registry", "session", "notifier"]
PLUGINS = {"rabbitmq_management", "rabbitmq_prometheus", "rabbitmq_sharding", "rabbitmq_consistent_hash_exchange"}
HTTP_PORT = "AODM_HTTP_PORT"


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


@pytest.fixture(scope="module")
def services(compose: dict) -> dict:
    return compose["services"]


@pytest.fixture(scope="module")
def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def env_of(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {key: str(value) for key, value in env.items()}


def container_ports(service: dict) -> set[int]:
    ports: set[int] = set()
    for entry in service.get("ports", []) + service.get("expose", []):
        ports.add(int(str(entry).split(":")[-1].split("/")[0]))
    return ports


def published(service: dict) -> list:
    return [p for p in service.get("ports", []) if ":" in str(p) or isinstance(p, dict)]


def bindings(service: dict) -> list[tuple[str, int, int]]:
    """(host address, host port, container port) of each published port; "" for no address."""
    out = []
    for entry in service.get("ports", []):
        if isinstance(entry, dict):  # the long syntax
            out.append((str(entry.get("host_ip", "")), int(entry["published"]), int(entry["target"])))
            continue
        parts = str(entry).split("/")[0].split(":")  # [[address:]host:]container[/protocol]
        host = int(parts[-2]) if len(parts) > 1 and parts[-2] else 0
        out.append((":".join(parts[:-2]), host, int(parts[-1])))
    return out


def test_bindings_parser() -> None:
    service = {"ports": ["127.0.0.1:5672:5672", "8080:80", "9000", "127.0.0.1:53:53/udp",
                         {"target": 80, "published": 8081, "host_ip": "127.0.0.1"}]}
    assert bindings(service) == [("127.0.0.1", 5672, 5672), ("", 8080, 80), ("", 0, 9000), ("127.0.0.1", 53, 53),
                                 ("127.0.0.1", 8081, 80)]


def test_published_ports_listen_on_loopback_only(services: dict) -> None:
    """The file holds the broker's, the database's and Grafana's passwords: nothing it
    publishes may listen beyond the host itself unless an operator changes that."""
    for name, service in services.items():
        for address, host, container in bindings(service):
            assert address == "127.0.0.1", f"{name} publishes {container} on {address or 'every address'}:{host}"


def test_the_broker_is_reachable_from_the_host(services: dict) -> None:
    """What a host process uses by default: AMQP at the port of the default AODM_AMQP_URL
    (the CLI, scripts/up.sh) and the management dashboard."""
    published = {(host, container) for _, host, container in bindings(services["rabbitmq"])}
    amqp = urlsplit(config.VARIABLES["AODM_AMQP_URL"][0]).port or 5672
    assert {(amqp, 5672), (15672, 15672)} <= published


def test_expected_services(services: dict) -> None:
    assert set(services) >= {"rabbitmq", "postgres", *APP_SERVICES, "demo"}


@pytest.mark.parametrize("name", APP_SERVICES)
def test_service_command_module_exists(services: dict, name: str) -> None:
    command = services[name]["command"]
    assert command[:2] == ["python", "-m"], command
    module = command[2]
    assert module == f"services.{name}"
    path = ROOT / Path(*module.split(".")) / "__main__.py"
    assert path.is_file(), f"{module} has no {path.relative_to(ROOT)}: `python -m {module}` would fail"


def test_demo_runs_the_cli(services: dict, pyproject: dict) -> None:
    demo = services["demo"]
    assert demo["command"] == ["aodm", "demo"]
    assert demo.get("restart") == "no"
    assert "aodm" in pyproject["project"]["scripts"], "pyproject.toml lacks the `aodm` console script"


def test_cli_entrypoint_exists(pyproject: dict) -> None:
    target = pyproject["project"]["scripts"]["aodm"]
    module, _, function = target.partition(":")
    path = ROOT / Path(*module.split(".")).with_suffix(".py")
    assert path.is_file(), f"console script aodm = {target!r}, but {path.relative_to(ROOT)} does not exist"
    tree = ast.parse(path.read_text())
    names = {node.name for node in tree.body if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)}
    assert function in names, f"{path.relative_to(ROOT)} defines no {function}() for the aodm console script"


def test_http_port_is_a_setting() -> None:
    assert HTTP_PORT in config.VARIABLES, (
        "shared/config.py VARIABLES lacks AODM_HTTP_PORT, which docker-compose.yml and scripts/up.sh "
        "set for the /healthz, /readyz and /metrics endpoint: add it there (and to docs/operations.md)"
    )


def test_env_vars_are_known_settings(services: dict) -> None:
    unknown = {
        (name, key)
        for name, service in services.items()
        for key in env_of(service)
        if key.startswith("AODM_") and key not in config.VARIABLES
    }
    assert not unknown, f"AODM_* variables in docker-compose.yml that shared/config.py does not define: {sorted(unknown)}"


@pytest.mark.parametrize("name", [*APP_SERVICES, "demo"])
def test_env_values_parse(services: dict, name: str) -> None:
    env = env_of(services[name])
    assert {"AODM_AMQP_URL", "AODM_DATABASE_URL"} <= set(env)
    local = {key: value.replace("@rabbitmq:", "@127.0.0.1:").replace("@postgres:", "@127.0.0.1:") for key, value in env.items()}
    settings = config.load(local)
    assert settings.amqp_url == local["AODM_AMQP_URL"]
    assert settings.database_url == local["AODM_DATABASE_URL"]
    if name != "demo":
        assert env.get("AODM_LOG_FORMAT") == "json"
        assert env.get(HTTP_PORT) == "8080"
        if hasattr(settings, "http_port"):
            assert settings.http_port == 8080


def test_all_processes_agree_on_shards(services: dict) -> None:
    values = {env_of(services[name]).get("AODM_SESSION_SHARDS") for name in [*APP_SERVICES, "demo"]}
    assert len(values) == 1, f"AODM_SESSION_SHARDS differs between services: {values}"


def test_session_is_scalable(services: dict) -> None:
    session = services["session"]
    assert "container_name" not in session, "a container_name stops `docker compose up --scale session=3`"
    assert not published(session), "a host port stops `docker compose up --scale session=3`"


@pytest.mark.parametrize("name", APP_SERVICES)
def test_no_app_service_publishes_ports(services: dict, name: str) -> None:
    assert "container_name" not in services[name]
    assert not published(services[name])


def test_depends_on_waits_for_health(services: dict) -> None:
    for name, service in services.items():
        depends = service.get("depends_on", {})
        assert isinstance(depends, dict), f"{name}: depends_on must use the long form with conditions"
        for target, spec in depends.items():
            assert target in services, f"{name} depends on unknown service {target}"
            assert spec.get("condition") == "service_healthy", f"{name} -> {target} must wait for service_healthy"
            assert "healthcheck" in services[target], f"{name} waits for {target}, which has no healthcheck"
    for name in APP_SERVICES:
        assert set(services[name]["depends_on"]) >= {"rabbitmq", "postgres"}
    assert set(services["demo"]["depends_on"]) >= set(APP_SERVICES)


def test_amqp_url_points_at_rabbitmq(services: dict) -> None:
    rabbitmq = services["rabbitmq"]
    for name in [*APP_SERVICES, "demo"]:
        url = urlsplit(env_of(services[name])["AODM_AMQP_URL"])
        assert url.hostname == "rabbitmq"
        assert (url.port or 5672) in container_ports(rabbitmq)
        rabbit_env = env_of(rabbitmq)
        if "RABBITMQ_DEFAULT_USER" in rabbit_env:
            assert (url.username, url.password) == (rabbit_env["RABBITMQ_DEFAULT_USER"], rabbit_env["RABBITMQ_DEFAULT_PASS"])
    assert container_ports(rabbitmq) >= {5672, 15672, 15692}


@pytest.fixture(scope="module")
def definitions() -> dict:
    return json.loads((ROOT / "deploy" / "rabbitmq" / "definitions.json").read_text())


def _vhost(url: str) -> str:
    path = urlsplit(url).path
    return unquote(path[1:]) if len(path) > 1 else "/"


def _login(definitions: dict, url: str) -> dict:
    parts = urlsplit(url)
    users = {u["name"]: u for u in definitions["users"]}
    assert parts.username in users, f"{parts.username!r} (from {url}) is not a user in definitions.json"
    assert users[parts.username].get("password") == parts.password, f"{url}: password differs from definitions.json"
    return users[parts.username]


def _permissions(definitions: dict, user: str, vhost: str) -> dict:
    found = [p for p in definitions["permissions"] if p["user"] == user and p["vhost"] == vhost]
    assert len(found) == 1, f"definitions.json gives {user!r} no (or several) permissions on vhost {vhost!r}"
    return {key: found[0][key] for key in ("configure", "write", "read")}


def test_rabbitmq_loads_the_definitions(services: dict) -> None:
    """The broker starts with the vhost and the fixed principals of docs/security.md."""
    conf = (ROOT / "deploy" / "rabbitmq" / "rabbitmq.conf").read_text()
    settings = dict(
        (k.strip(), v.strip()) for k, _, v in (line.partition("=") for line in conf.splitlines())
        if k.strip() and not k.strip().startswith("#")
    )
    mounts = {str(m).split(":")[1]: str(m).split(":")[0] for m in services["rabbitmq"].get("volumes", [])}
    assert "load_definitions" in settings
    assert mounts.get(settings["load_definitions"]) == "./deploy/rabbitmq/definitions.json"
    conf_mount = next((target for target, source in mounts.items() if source == "./deploy/rabbitmq/rabbitmq.conf"), None)
    assert conf_mount and (conf_mount == "/etc/rabbitmq/rabbitmq.conf" or conf_mount.startswith("/etc/rabbitmq/conf.d/"))
    assert "RABBITMQ_DEFAULT_USER" not in env_of(services["rabbitmq"]), "users come from definitions.json"


def test_broker_principals(services: dict, definitions: dict) -> None:
    """Services log in with full rights on their vhost; the demo (a client) as the public
    user with exactly the public permissions; the registry's admin URL as an administrator."""
    from services.registry.credentials import PUBLIC_PERMISSIONS

    vhosts = {v["name"] for v in definitions["vhosts"]}
    for name in APP_SERVICES:
        url = env_of(services[name])["AODM_AMQP_URL"]
        assert _vhost(url) in vhosts
        user = _login(definitions, url)
        assert _permissions(definitions, user["name"], _vhost(url)) == {"configure": ".*", "write": ".*", "read": ".*"}
    demo_url = env_of(services["demo"])["AODM_AMQP_URL"]
    public = _login(definitions, demo_url)
    assert _vhost(demo_url) == _vhost(env_of(services["registry"])["AODM_AMQP_URL"])
    assert _permissions(definitions, public["name"], _vhost(demo_url)) == PUBLIC_PERMISSIONS
    assert not public.get("tags"), "the public user must not log in to the management API"
    admin_url = env_of(services["registry"]).get("AODM_BROKER_ADMIN_URL")
    assert admin_url, "the registry issues per-handle broker users by default in compose"
    admin = _login(definitions, admin_url)
    assert "administrator" in admin.get("tags", [])
    assert urlsplit(admin_url).hostname == "rabbitmq" and urlsplit(admin_url).port in container_ports(services["rabbitmq"])
    for name in ("session", "notifier", "demo"):
        assert "AODM_BROKER_ADMIN_URL" not in env_of(services[name]), f"{name} has no use for the admin login"


def test_definitions_bound_the_inboxes_as_the_services_do(services: dict, definitions: dict) -> None:
    """The broker has the inbox bound from its first boot, the same policies (at the default
    bound) that a service with the admin URL puts there (shared/inbox_bound.py)."""
    from aodm import topology

    vhost = _vhost(env_of(services["notifier"])["AODM_AMQP_URL"])
    defaults = config.load({})
    expected = topology.inbox_policies(defaults.inbox_max_messages, defaults.inbox_max_bytes)
    policies = [p for p in definitions.get("policies", []) if p["name"] == topology.INBOX_POLICY]
    assert [{k: v for k, v in p.items() if k not in ("vhost", "name")} for p in policies] == [expected["policies"]]
    operator = [p for p in definitions.get("parameters", [])
                if p["component"] == "operator_policy" and p["name"] == topology.INBOX_POLICY]
    assert [p["value"] for p in operator] == [expected["operator-policies"]]
    assert {p["vhost"] for p in policies + operator} == {vhost}


def test_database_url_points_at_postgres(services: dict) -> None:
    postgres = services["postgres"]
    pg_env = env_of(postgres)
    for name in [*APP_SERVICES, "demo"]:
        url = urlsplit(env_of(services[name])["AODM_DATABASE_URL"])
        assert url.hostname == "postgres"
        assert (url.port or 5432) in (container_ports(postgres) or {5432})
        assert url.username == pg_env["POSTGRES_USER"]
        assert url.password == pg_env["POSTGRES_PASSWORD"]
        assert url.path.lstrip("/") == pg_env["POSTGRES_DB"]


def test_long_running_services_have_healthchecks(services: dict) -> None:
    for name, service in services.items():
        if name == "demo":
            continue
        assert "healthcheck" in service, f"{name} has no healthcheck"
        assert service.get("restart") == "unless-stopped", name
    for name in APP_SERVICES:
        service = services[name]
        test = service["healthcheck"]["test"]
        assert test[:4] == ["CMD", "python", "-m", "shared.health"], test
        probe = urlsplit(test[4])
        assert probe.path == "/readyz"
        assert str(probe.port) == env_of(service)[HTTP_PORT]
        assert "stop_grace_period" in service
    assert (ROOT / "shared" / "health.py").is_file(), "the healthcheck probe `python -m shared.health` has no module"


def test_enabled_plugins_file(services: dict) -> None:
    text = (ROOT / "deploy" / "rabbitmq" / "enabled_plugins").read_text()
    match = re.fullmatch(r"\s*\[([a-z_,\s]*)\]\.\s*", text)
    assert match, f"not an Erlang term list: {text!r}"
    assert {p.strip() for p in match[1].split(",")} == PLUGINS
    mounts = services["rabbitmq"].get("volumes", [])
    assert any(
        str(m).startswith("./deploy/rabbitmq/enabled_plugins:/etc/rabbitmq/enabled_plugins") for m in mounts
    ), "docker-compose.yml does not mount deploy/rabbitmq/enabled_plugins"


def test_dockerfile_installs_the_project(pyproject: dict) -> None:
    lines = [line.strip() for line in (ROOT / "Dockerfile").read_text().splitlines()]
    instructions = [line for line in lines if line and not line.startswith("#")]
    assert instructions[0] == "FROM python:3.11-slim"
    for line in instructions:
        if line.startswith("COPY "):
            *sources, _dest = line.split()[1:]
            for source in sources:
                assert (ROOT / source).exists(), f"Dockerfile copies {source}, which does not exist"
    text = "\n".join(instructions)
    # The services' exact versions (requirements/server.lock), then the client package on them.
    assert "pip install --no-deps -r requirements/server.lock" in text
    assert "pip install --no-deps ." in text
    assert "server" in pyproject["project"]["optional-dependencies"]
    users = [line.split()[1] for line in instructions if line.startswith("USER ")]
    assert users and users[-1] not in {"root", "0"}, "the image must run as a non-root user"
    assert instructions[-1].startswith("CMD ")
    # The services run from the source tree (`python -m services.X` in the working directory).
    assert "WORKDIR /app" in text
    for top in ("aodm", "shared", "services"):
        assert f"COPY {top} ./{top}" in text, f"Dockerfile does not copy {top}/"


def test_scripts_run_pytest() -> None:
    test_sh = (ROOT / "scripts" / "test.sh").read_text()
    assert '"$VENV/bin/pytest" "$@"' in test_sh
    assert "bash scripts/test.sh" in (ROOT / ".ci" / "run").read_text()
    up_sh = (ROOT / "scripts" / "up.sh").read_text()
    assert "aodm\" demo" in up_sh and "run --rm demo" in up_sh
