"""Imports flow one way: cli -> trainer -> server -> reward_rules -> contract, contract does no
I/O, the trainer never loads the web app, and only `server.store.Store` touches Redis keys."""

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# What each package may not import: the layers above it, and for the pure ones, anything that
# touches a network, a disk format or a model.
FORBIDDEN = {
    "trainer": {"cli"},
    "contract": {
        "server",
        "trainer",
        "reward_rules",
        "redis",
        "httpx",
        "fastapi",
        "torch",
        "transformers",
        "vllm",
        "faiss",
        "os",
        "pathlib",
        "subprocess",
        "socket",
    },
    "reward_rules": {"server", "trainer", "redis", "httpx", "fastapi", "torch", "vllm"},
    "server": {"trainer", "cli"},
}


def imported(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_a_package_imports_nothing_above_it(package: str) -> None:
    offending = {
        str(path.relative_to(ROOT)): sorted(imported(path) & FORBIDDEN[package])
        for path in sorted((ROOT / package).rglob("*.py"))
    }
    assert {path: names for path, names in offending.items() if names} == {}


def test_the_trainer_never_loads_the_web_app() -> None:
    offending = []
    for path in sorted((ROOT / "trainer").rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        modules = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
        if "server.app" in modules or "server.routes" in modules:
            offending.append(str(path.relative_to(ROOT)))
    assert offending == []


def test_only_the_store_touches_redis_keys() -> None:
    reaching = re.compile(r"\bstore\.(redis|keys)\b")
    offending = [
        str(path.relative_to(ROOT))
        for package in ("server", "trainer")
        for path in sorted((ROOT / package).rglob("*.py"))
        if reaching.search(path.read_text(encoding="utf-8"))
    ]
    assert offending == []
