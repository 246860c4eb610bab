"""The code's shape: no import cycles in the engine or the domain (TYPE_CHECKING imports included), no sys.path
edits outside work dirs, no function over 80 lines, and a README layout table whose files define each part."""
from __future__ import annotations

import ast
import re
from pathlib import Path

from conftest import REPO_ROOT

PACKAGES = {"clsengine": REPO_ROOT / "external" / "clsengine",
            "workbench": REPO_ROOT / "models" / "image_classification" / "workbench"}


def _module_name(package: str, root: Path, path: Path) -> str:
    parts = [package, *path.relative_to(root).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(module: str, path: Path, is_package: bool, known: set[str]) -> set[str]:
    """The project modules `module` imports anywhere in its file (function-level imports included)."""
    found = set()
    base = module.split(".") if is_package else module.split(".")[:-1]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):  # TYPE_CHECKING imports too
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            prefix = ".".join(base[:len(base) - node.level + 1]) if node.level else ""
            target = ".".join(p for p in (prefix, node.module or "") if p)
            names = [target] + [f"{target}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name != module:
                found.add(name)
    return found


def import_graph() -> dict[str, set[str]]:
    files = {}
    for package, root in PACKAGES.items():
        for path in root.rglob("*.py"):
            files[_module_name(package, root, path)] = path
    known = set(files)
    return {m: _imports(m, p, p.name == "__init__.py", known) for m, p in files.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of imports between modules (a package importing its own submodules is not one: importing a
    submodule runs its package's __init__ first by design)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt.startswith(node + ".") or node.startswith(nxt + "."):
                continue  # package <-> its own submodule
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycle():
    graph = import_graph()
    assert "clsengine.loop" in graph and "clsengine.checkpoint_saver" in graph["clsengine.loop"]
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"p": {"p.x"}, "p.x": {"p"}}) is None


def test_the_engine_never_imports_the_domain():
    graph = import_graph()
    leaks = {m: sorted(i for i in imports if i.startswith("workbench"))
             for m, imports in graph.items() if m.startswith("clsengine")}
    assert not any(leaks.values()), leaks


def test_no_sys_path_edits_outside_work_dir_scripts():
    scripts = REPO_ROOT / "models" / "image_classification" / "scripts"
    edits = [str(p.relative_to(REPO_ROOT)) for folder in ("external", "models", "tools", "tests")
             for p in (REPO_ROOT / folder).rglob("*.py")
             if scripts not in p.parents and p.name != Path(__file__).name
             and re.search(r"sys\.path\.(insert|append)", p.read_text(encoding="utf-8"))]
    assert edits == []


def _defined_names(path: Path) -> set[str]:
    """Top-level functions, classes and assigned names of a module."""
    names = set()
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
    return names


def test_readme_layout_table_names_files_that_define_each_part():
    text = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    table = text.split("Where a part of the recipe or of the pipeline lives", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in table.splitlines() if line.startswith("| ") and "`" in line]
    assert len(rows) >= 15
    for part in ("SAM", "EMA", "LR finder", "int8", "COCO", "time-budget", "factories"):
        assert any(part in row for row in rows), part
    for row in rows:
        part, cell = row.split("|")[1:3]
        paths = re.findall(r"`([\w/.]+\.py)`", cell)
        assert paths, row
        files, previous = [], REPO_ROOT / "README.md"
        for path in paths:  # a short path continues the previous one (`data/folder.py`, `data/annotations.py`)
            found = [f for f in (REPO_ROOT / path, *(a / path for a in previous.parents)) if f.is_file()]
            assert found, f"{path} in: {row}"
            files.append(previous := found[0])
        names = [n for n in re.findall(r"`(\w+)`", part) if n != "auto"]  # the template value `auto`
        assert names, f"no defining name in: {row}"
        defined = set().union(*(_defined_names(f) for f in files))
        missing = [n for n in names if n not in defined]
        assert not missing, f"{missing} not defined in {paths}: {row}"


MAX_FUNCTION_LINES = 80


def test_no_function_longer_than_80_lines_outside_tests_and_benchmarks():
    """Benchmark tools (tools/benchmark_*.py) print tables from long argument lists; everything else reads
    in one screen."""
    long = []
    for folder in ("external", "models", "tools"):
        for path in (REPO_ROOT / folder).rglob("*.py"):
            if path.name.startswith("benchmark_"):
                continue
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    lines = node.end_lineno - node.lineno + 1
                    if lines > MAX_FUNCTION_LINES:
                        long.append(f"{path.relative_to(REPO_ROOT)}:{node.lineno} {node.name} ({lines} lines)")
    assert long == []
