"""What `pip install aodm` gets (no broker needed): a wheel of the client package alone,
which imports without the services' dependencies and without the repository's shared/; and
the services' lock (requirements/server.lock), which pins everything pyproject.toml asks for
and which these tests run on."""

import email.parser
import json
import re
import shutil
import subprocess
import sys
import textwrap
import tomllib
import zipfile
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
SERVER_ONLY = {"asyncpg", "structlog", "uvloop"}  # the services' own: the client must not need them


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel pip builds from a copy of this checkout (a build writes into its source
    directory), with shared/, services/, bench/ and tests/ in it as in a clone."""
    source = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for top in ("aodm", "shared", "services", "bench", "tests"):
        shutil.copytree(ROOT / top, source / top, ignore=shutil.ignore_patterns("__pycache__", "node_modules"))
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--disable-pip-version-check",
         "-q", str(source), "-w", str(out)],
        check=True, capture_output=True, text=True, timeout=120,
    )
    [built] = out.glob("aodm-*.whl")
    return built


def test_the_wheel_holds_the_client_package_only(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    tops = {name.split("/")[0] for name in names}
    dist_info = {top for top in tops if top.endswith(".dist-info")}
    assert tops - dist_info == {"aodm"}, f"the wheel holds {sorted(tops)}"
    assert "aodm/client.py" in names and "aodm/transport.py" in names
    assert "aodm/py.typed" in names, "the package's types are not marked as such (py.typed)"


def test_the_wheel_requires_no_server_dependency_unless_asked(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        [meta] = [name for name in archive.namelist() if name.endswith(".dist-info/METADATA")]
        headers = email.parser.Parser().parsestr(archive.read(meta).decode())
    required = [Requirement(line) for line in headers.get_all("Requires-Dist") or []]
    always = {canonicalize_name(r.name) for r in required if r.marker is None}
    assert always == {"aio-pika", "aiormq", "pamqp", "msgspec", "pynacl"}
    server = {canonicalize_name(r.name) for r in required if r.marker and r.marker.evaluate({"extra": "server"})}
    assert server >= SERVER_ONLY


IMPORT_CLIENT = textwrap.dedent('''
    import json, sys
    site = sys.argv[1]
    for name in ("asyncpg", "structlog", "uvloop", "services"):
        sys.modules[name] = None  # not installed: importing one fails
    sys.path.insert(0, site)
    import aodm, aodm.chat, aodm.checker, aodm.cli, aodm.client, aodm.demo, aodm.inbox, aodm.listen, aodm.transport
    assert aodm.__file__.startswith(site), aodm.__file__
    try:
        aodm.cli.main(["--version"])
    except SystemExit as exit:
        assert exit.code in (0, None), exit.code
    loaded = sorted(name for name, module in sys.modules.items()
                    if module is not None and name.split(".")[0] in ("asyncpg", "structlog", "uvloop", "shared", "services"))
    print(json.dumps(loaded))
''')


def test_the_client_imports_from_the_wheel_without_the_services_or_their_dependencies(wheel: Path, tmp_path: Path) -> None:
    """In a Python that finds the wheel's aodm first, beside someone else's package named
    `shared` (which must not be touched) and with asyncpg, structlog and uvloop missing."""
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    (site / "shared").mkdir()
    (site / "shared" / "__init__.py").write_text('raise ImportError("a foreign shared/ package: aodm imported it")\n')
    result = subprocess.run([sys.executable, "-I", "-c", IMPORT_CLIENT, str(site)], capture_output=True, text=True,
                            timeout=60, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    version_line, loaded = result.stdout.strip().splitlines()[-2:]
    assert version_line.startswith("aodm ") or "0.1.0" in version_line
    assert json.loads(loaded) == []


# -- the services' lock ---------------------------------------------------------------------------


def locked() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements" / "server.lock").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            match = re.fullmatch(r"([A-Za-z0-9_.-]+)==([^\s;]+)", line)
            assert match, f"requirements/server.lock: not an exact pin: {line!r}"
            pins[canonicalize_name(match[1])] = match[2]
    return pins


def test_the_lock_pins_what_the_client_and_the_services_ask_for() -> None:
    pins = locked()
    asked = PYPROJECT["project"]["dependencies"] + PYPROJECT["project"]["optional-dependencies"]["server"]
    for line in asked:
        requirement = Requirement(line)
        name = canonicalize_name(requirement.name)
        assert name in pins, f"requirements/server.lock does not pin {name}"
        assert requirement.specifier.contains(pins[name]), f"{name}=={pins[name]} is outside pyproject's {requirement}"


def test_these_tests_run_on_the_locked_versions() -> None:
    """scripts/test.sh installs with the lock as constraints, as the image installs it."""
    different = {name: (version, metadata.version(name)) for name, version in locked().items()
                 if metadata.version(name) != version}
    assert not different, f"locked vs installed (rerun scripts/test.sh): {different}"
