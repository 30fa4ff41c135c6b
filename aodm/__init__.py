"""aodm: encrypted direct messages between handles (the client, the command line)."""

# The package's version when it is not installed (`aodm --version` prefers the installed
# metadata); kept equal to pyproject.toml's version (tests/test_cli.py checks it).
__version__ = "0.1.0"
