"""The client as a library: what each public module exports, the docstrings of its API, and
`Client.connect` both awaited and as an async context manager (against the real stack)."""

import ast
import importlib
import inspect
import secrets
from pathlib import Path
from types import ModuleType
from typing import TypeVar

import pytest

from aodm import catchup, crypto, errors, inbox
from aodm.client import Client, Connecting
from aodm.crypto import Identity
from aodm.errors import NotFound

PUBLIC_MODULES = [
    "aodm.client",
    "aodm.crypto",
    "aodm.inbox",
    "aodm.catchup",
    "aodm.errors",
    "aodm.envelope",
    "aodm.registry_api",
    "aodm.session_api",
    "aodm.notifications",
    "aodm.replies",
    "aodm.topology",
    "aodm.encoding",
]


def defined_names(module: ModuleType) -> set[str]:
    """The public names a module defines at its top level (not the ones it imports)."""
    tree = ast.parse(Path(inspect.getfile(module)).read_text())
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(target.id for target in node.targets if isinstance(target, ast.Name))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    return {name for name in names if not name.startswith("_")}


@pytest.mark.parametrize("name", PUBLIC_MODULES)
def test_all_names_exist_and_cover_the_module(name: str) -> None:
    module = importlib.import_module(name)
    exported = module.__all__
    assert len(exported) == len(set(exported)), f"{name}.__all__ names something twice"
    assert [n for n in exported if not hasattr(module, n)] == [], f"{name}.__all__ names what it lacks"
    type_variables = {n for n in defined_names(module) if isinstance(getattr(module, n), TypeVar)}  # not API
    missing = defined_names(module) - set(exported) - type_variables
    assert missing == set(), f"{name} defines public names that its __all__ leaves out"


def public_members(cls: type) -> list[tuple[str, object]]:
    """A class's own public methods and properties, its __init__ and its context-manager methods."""
    found = []
    for name, member in vars(cls).items():
        if name.startswith("_") and name not in {"__init__", "__aenter__", "__aexit__", "__aiter__"}:
            continue
        function = member.__func__ if isinstance(member, classmethod | staticmethod) else member
        if isinstance(function, property):
            function = function.fget
        # Not what the library adds (a Protocol's __init__, say): the class's own code.
        if inspect.isfunction(function) and function.__module__ == cls.__module__:
            found.append((name, function))
    return found


def test_every_public_method_of_client_has_a_docstring() -> None:
    members = public_members(Client)
    assert len(members) > 25
    assert [name for name, member in members if not inspect.getdoc(member)] == []
    assert inspect.getdoc(Client) and inspect.getdoc(Connecting)


@pytest.mark.parametrize("module", [crypto, errors, inbox, catchup], ids=lambda m: m.__name__)
def test_the_rest_of_the_client_api_is_documented(module: ModuleType) -> None:
    undocumented = []
    for name in module.__all__:
        value = getattr(module, name)
        if inspect.isfunction(value) or inspect.isclass(value):
            if not inspect.getdoc(value):
                undocumented.append(name)
            if inspect.isclass(value) and value.__module__ == module.__name__:
                undocumented += [f"{name}.{m}" for m, member in public_members(value) if not inspect.getdoc(member)]
    assert undocumented == []


def test_the_package_says_it_is_typed() -> None:
    assert (Path(crypto.__file__).parent / "py.typed").is_file()


async def test_connect_as_an_async_context_manager_closes_the_connection(stack) -> None:
    async with Client.connect(stack.amqp_url, Identity.generate(), timeout=10) as client:
        assert isinstance(client, Client)
        assert client.bus.is_connected
        with pytest.raises(NotFound):  # a real round trip through the registry
            await client.query_handle("nobody-here")
    assert not client.bus.is_connected


async def test_the_block_closes_the_connection_when_it_raises(stack) -> None:
    with pytest.raises(RuntimeError, match="inside the block"):
        async with Client.connect(stack.amqp_url, Identity.generate()) as client:
            raise RuntimeError("inside the block")
    assert not client.bus.is_connected


async def test_connect_awaited_still_gives_a_client_and_the_client_is_a_context_manager(stack) -> None:
    client = await Client.connect(stack.amqp_url, Identity.generate(), timeout=10)
    async with client as same:
        assert same is client
        handle = f"api-{secrets.token_hex(5)}"
        info = await client.register(handle)
        assert info.handle == handle == client.acting_as
    assert not client.bus.is_connected
