"""The module layering of docs/architecture.md, checked on the source.

- pymta.core never imports pymta.services or pymta.cli;
- a service never imports another service or a cli module;
- a cli module never imports a service;
- pymta.core.proto (sans-IO engines) imports only the stdlib's pure modules,
  pymta.core.errors and pymta.core.address: no sockets, no asyncio, no files.
"""

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PKG = os.path.join(ROOT, "pymta")
PROTO_FORBIDDEN = {"socket", "asyncio", "selectors", "ssl", "subprocess", "threading", "os"}
PROTO_ALLOWED_PYMTA = {"pymta.core.errors", "pymta.core.address"}


def modules():
    for dirpath, _, files in os.walk(PKG):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(dirpath, name)
                rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                if rel.endswith(".__init__"):
                    rel = rel[: -len(".__init__")]
                yield rel, path


def imports(path):
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module
            for alias in node.names:
                yield f"{node.module}.{alias.name}"


def owner(module):
    """pymta.services.X... -> pymta.services.X"""
    parts = module.split(".")
    return ".".join(parts[:3])


ALL = sorted(modules())


@pytest.mark.parametrize("module,path", ALL, ids=[m for m, _ in ALL])
def test_layering(module, path):
    for imp in imports(path):
        if not imp.startswith("pymta."):
            if module.startswith("pymta.core.proto"):
                assert imp.split(".")[0] not in PROTO_FORBIDDEN, f"{module} imports {imp}"
            continue
        if module.startswith("pymta.core"):
            assert not imp.startswith(("pymta.services", "pymta.cli")), f"{module} imports {imp}"
        if module.startswith("pymta.core.proto"):
            base = ".".join(imp.split(".")[:3])
            assert base in PROTO_ALLOWED_PYMTA or imp.startswith("pymta.core.proto"), f"{module} imports {imp}"
        if module.startswith("pymta.services"):
            if imp.startswith("pymta.services"):
                assert owner(imp) == owner(module), f"{module} imports another service: {imp}"
            assert not imp.startswith("pymta.cli"), f"{module} imports {imp}"
        if module.startswith("pymta.cli"):
            assert not imp.startswith("pymta.services"), f"{module} imports {imp}"
