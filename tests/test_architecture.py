"""The architecture's rules, read from the source: strategies own their special cases, imports
flow one way, modules stay small."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from fedlr.lora.strategies import STRATEGIES, STRATEGY_NAMES

ROOT = Path(__file__).resolve().parents[1]
PRODUCT = ("fedlr", "client", "server", "kernels", "benchmarks")
STRATEGY_CLASSES = {cls.__name__ for cls in STRATEGIES.values()}


def sources(*folders: str) -> list[Path]:
    return sorted(p for folder in folders for p in (ROOT / folder).rglob("*.py"))


def outside_strategies() -> list[Path]:
    return [p for p in sources(*PRODUCT) if "strategies" not in p.relative_to(ROOT).parts]


def names_a_strategy(node: ast.expr) -> bool:
    """A strategy's name as a literal, or a collection of them."""
    if isinstance(node, ast.Constant):
        return node.value in STRATEGY_NAMES
    if isinstance(node, ast.Tuple | ast.List | ast.Set):
        return any(names_a_strategy(e) for e in node.elts)
    return False


def strategy_tests(tree: ast.AST) -> list[int]:
    """Lines that compare with a strategy's name, test a strategy's class, or import one."""
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare) and any(
            names_a_strategy(x) for x in [node.left, *node.comparators]
        ):
            lines.append(node.lineno)
        elif isinstance(node, ast.match_case) and names_a_strategy(
            getattr(node.pattern, "value", ast.Constant(None))
        ):
            lines.append(node.pattern.lineno)
        elif isinstance(node, ast.Call) and getattr(node.func, "id", "") in (
            "isinstance", "issubclass"
        ):
            kinds = ast.unparse(node.args[1]) if len(node.args) > 1 else ""
            if any(cls in kinds for cls in STRATEGY_CLASSES):
                lines.append(node.lineno)
        elif isinstance(node, ast.ImportFrom) and any(
            a.name in STRATEGY_CLASSES for a in node.names
        ):
            lines.append(node.lineno)
    return sorted(lines)


def test_the_rule_catches_what_it_forbids():
    caught = strategy_tests(ast.parse(
        'if s.name == "flora": pass\n'
        'if name in ("ffa", "fedsvd"): pass\n'
        "if isinstance(s, FLoRA): pass\n"
        "from fedlr.lora.strategies.fedsvd import FedSVD\n"
        'match s.name:\n    case "fair": pass\n'
        'if s.head == "train": pass\n'
    ))
    assert caught == [1, 2, 3, 4, 6]


def test_no_code_outside_the_strategies_tests_a_strategy_name_or_type():
    found = {
        str(path.relative_to(ROOT)): lines
        for path in outside_strategies()
        if (lines := strategy_tests(ast.parse(path.read_text())))
    }
    assert not found, f"make these a method or trait of the strategy: {found}"


@pytest.mark.parametrize("path", sources(*PRODUCT), ids=lambda p: str(p.relative_to(ROOT)))
def test_modules_stay_under_400_lines(path):
    assert len(path.read_text().splitlines()) <= 400


def imports_of(node: ast.AST) -> set[str]:
    if isinstance(node, ast.Import):
        return {a.name for a in node.names}
    if isinstance(node, ast.ImportFrom) and node.module:
        return {node.module}
    return set()


def imports(path: Path) -> set[str]:
    return {m for node in ast.walk(ast.parse(path.read_text())) for m in imports_of(node)}


def flower_or_apps(modules: set[str]) -> set[str]:
    return {m for m in modules if m.split(".")[0] == "flwr"
            or m.split(".")[:2] in (["fedlr", "client"], ["fedlr", "server"])}


def test_the_core_knows_nothing_of_flower_clients_or_servers():
    """fedlr's core imports neither Flower nor fedlr.client/fedlr.server; only the CLI may, and
    only inside its commands (so arguments are checked before any heavy import)."""
    for path in sources("fedlr"):
        if "cli" in path.relative_to(ROOT).parts:
            top = ast.parse(path.read_text()).body
            found = {m for node in top if isinstance(node, ast.Import | ast.ImportFrom)
                     for m in imports_of(node)}
        else:
            found = imports(path)
        bad = flower_or_apps(found)
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


def test_kernels_import_no_client_or_server():
    for path in sources("kernels"):
        bad = flower_or_apps(imports(path))
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"
