"""The module's map: chatx.py's sections (`# ---- name ----` banners) sit in
dependency order, so each uses only the sections above it."""

from __future__ import annotations

import ast
import re
from pathlib import Path

SOURCE = Path(__file__).resolve().parent.parent / "chatx.py"
BANNER = re.compile(r"^# ---- (.+?) -+\s*$")
SCOPES = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)


def sections(source: str) -> list[tuple[int, str]]:
    """(line, name) of every banner; what sits above the first is "the preamble"."""
    found = [(0, "the preamble")]
    found += [(number, match[1]) for number, line in enumerate(source.splitlines(), 1) if (match := BANNER.match(line))]
    return found


def section_at(banners: list[tuple[int, str]], line: int) -> int:
    return max(index for index, (start, _) in enumerate(banners) if start < line)


def bound_names(statement: ast.stmt) -> set[str]:
    """The module-level names a top-level statement binds (also inside a top-level try or if)."""
    if isinstance(statement, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return {statement.name}
    if isinstance(statement, (ast.Import, ast.ImportFrom)):
        return {(alias.asname or alias.name).split(".")[0] for alias in statement.names}
    if isinstance(statement, (ast.Try, ast.If)):
        inner = statement.body + statement.orelse + getattr(statement, "finalbody", [])
        inner += [line for handler in getattr(statement, "handlers", []) for line in handler.body]
        return set().union(*(bound_names(line) for line in inner))
    targets = statement.targets if isinstance(statement, ast.Assign) else [getattr(statement, "target", None)]
    return {node.id for target in targets if target is not None for node in ast.walk(target) if isinstance(node, ast.Name)}


def local_names(scope: ast.AST) -> set[str]:
    """Names a function, lambda or comprehension binds for itself (nested scopes apart)."""
    names: set[str] = set()
    if isinstance(scope, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
        arguments = scope.args
        every = arguments.posonlyargs + arguments.args + arguments.kwonlyargs + [arguments.vararg, arguments.kwarg]
        names |= {argument.arg for argument in every if argument is not None}
        body = scope.body if isinstance(scope.body, list) else [scope.body]
    else:
        body = [generator.target for generator in scope.generators]
    declared_global: set[str] = set()
    pending = list(body)
    while pending:
        node = pending.pop()
        if isinstance(node, ast.Name) and isinstance(node.ctx, (ast.Store, ast.Del)):
            names.add(node.id)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
            continue  # its body is a scope of its own (decorators and defaults are rare enough to ignore)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(alias.asname or alias.name).split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ExceptHandler) and node.name:
            names.add(node.name)
        elif isinstance(node, ast.Global):
            declared_global |= set(node.names)
        elif isinstance(node, SCOPES):
            continue
        pending.extend(ast.iter_child_nodes(node))
    return names - declared_global


def references(node: ast.AST, shadowed: frozenset[str] = frozenset()) -> list[ast.Name]:
    """The names `node` reads from the module, annotations left out: under
    `from __future__ import annotations` they are strings nobody evaluates."""
    if isinstance(node, SCOPES):
        shadowed = shadowed | local_names(node)
    found: list[ast.Name] = []
    if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load) and node.id not in shadowed:
        found.append(node)
    for field_name, value in ast.iter_fields(node):
        if field_name in ("annotation", "returns"):
            continue
        for child in value if isinstance(value, list) else [value]:
            if isinstance(child, ast.AST):
                found += references(child, shadowed)
    return found


def later_section_references(source: str) -> list[str]:
    banners = sections(source)
    module = ast.parse(source)
    home: dict[str, int] = {}
    for statement in module.body:
        for name in bound_names(statement):
            home.setdefault(name, section_at(banners, statement.lineno))
    found = []
    for statement in module.body:
        if not isinstance(statement, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            continue
        here = section_at(banners, statement.lineno)
        for name in references(statement):
            there = home.get(name.id, here)
            if there > here:
                found.append(f"line {name.lineno}: {statement.name} ({banners[here][1]}) uses "
                             f"{name.id} ({banners[there][1]})")
    return found


def test_each_section_of_chatx_uses_only_the_sections_above_it():
    assert later_section_references(SOURCE.read_text()) == []


def test_the_layering_check_sees_a_reference_to_a_later_section_but_not_an_annotation_or_a_local():
    source = (
        "# ---- first ----\n"
        "def early(later_value: Late) -> Late:\n"
        "    late = 1\n"
        "    return late + [Late for Late in ()].__len__() + (lambda Late: Late)(0) + late_helper()\n"
        "def reaches_down():\n"
        "    return Late()\n"
        "# ---- second ----\n"
        "class Late:\n"
        "    pass\n"
        "def late_helper():\n"
        "    return early(None)\n"
    )
    assert later_section_references(source) == ["line 4: early (first) uses late_helper (second)",
                                                 "line 6: reaches_down (first) uses Late (second)"]
