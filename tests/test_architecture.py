"""The boundaries the folders stand for, read from the source's imports:
``broker/`` imports nothing outward, no two of its modules import each
other, however indirectly (the core delivers into outboxes and sees
connections as ``ports.Client``), and authentication does not depend on
authorization (the built-in database's ACL source lives in ``acl/``)."""

from __future__ import annotations

import ast
from pathlib import Path

import attrs
import pytest

from bastionmq.broker.ports import CertificateFacts, PeerCertificate

REPO = Path(__file__).resolve().parent.parent
BROKER = REPO / "broker"
#: What broker/ may not import: the folders that plug into it, and the app.
OUTWARD = ("bastionmq.listeners", "bastionmq.auth", "bastionmq.acl")


def module_name(path: Path, folder: Path = BROKER) -> str:
    parts = path.relative_to(folder).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join((f"bastionmq.{folder.name}", *parts))


def imports_of(path: Path, folder: Path = BROKER) -> set[str]:
    """Every module ``path`` imports, absolute, type-checking imports included."""
    package = module_name(path, folder)
    if path.name != "__init__.py":
        package = package.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            target = node.module or ""
            if node.level:
                target = f"{base}.{target}" if target else base
            found.add(target)
            # "from . import x" and "from .store import journal" may name modules.
            found.update(f"{target}.{alias.name}" for alias in node.names)
    return found


def broker_graph() -> dict[str, set[str]]:
    modules = {module_name(path): path for path in BROKER.rglob("*.py")}
    return {name: {target for target in imports_of(path) if target in modules and target != name}
            for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph``, as the modules along it, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state:
                cycle = visit(target)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_the_graph_sees_the_imports():
    graph = broker_graph()
    assert "bastionmq.broker.outbox" in graph["bastionmq.broker.connection"]
    assert "bastionmq.broker.codec" in graph["bastionmq.broker.core"]
    assert "bastionmq.broker.store.journal" in graph["bastionmq.broker.store"]


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_broker_modules_import_each_other_without_a_cycle():
    graph = broker_graph()
    # A package's __init__ re-exports its modules: those edges are the package's own.
    for name in graph:
        if (BROKER / Path(*name.split(".")[2:]) / "__init__.py").exists():
            for module in list(graph[name]):
                if module.startswith(name + "."):
                    graph[name].discard(module)
    assert find_cycle(graph) is None


def test_the_core_does_not_import_the_connection():
    assert "bastionmq.broker.connection" not in broker_graph()["bastionmq.broker.core"]


@pytest.mark.parametrize("path", sorted(BROKER.rglob("*.py")), ids=lambda p: str(p.relative_to(REPO)))
def test_broker_imports_nothing_outward(path):
    outward = sorted(target for target in imports_of(path)
                     if target == "bastionmq" or target.startswith(OUTWARD)
                     or target.startswith(("bastionmq.app", "bastionmq.config", "bastionmq.cli")))
    assert outward == []


@pytest.mark.parametrize("path", sorted((REPO / "auth").rglob("*.py")),
                         ids=lambda p: str(p.relative_to(REPO)))
def test_authentication_does_not_import_authorization(path):
    assert sorted(target for target in imports_of(path, REPO / "auth")
                  if target.startswith("bastionmq.acl")) == []


def test_a_peer_certificate_names_every_fact():
    """PeerCertificate spells out each CertificateFacts field as a property:
    a field added to the facts must be added there too."""
    missing = [field.name for field in attrs.fields(CertificateFacts)
               if not isinstance(getattr(PeerCertificate, field.name, None), property)]
    assert missing == []
