"""The code's shape: no import cycles in the engine or the domain, no sys.path edits outside work dirs, and a
README layout table that names files which exist."""
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


def _runtime_nodes(tree: ast.AST):
    """Every node but those under `if TYPE_CHECKING:` (imports for annotations only, never run)."""
    for child in ast.iter_child_nodes(tree):
        if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
            continue
        yield child
        yield from _runtime_nodes(child)


def _imports(module: str, path: Path, is_package: bool, known: set[str]) -> set[str]:
    """The project modules `module` imports anywhere in its file (function-level imports included)."""
    found = set()
    base = module.split(".") if is_package else module.split(".")[:-1]
    for node in _runtime_nodes(ast.parse(path.read_text(encoding="utf-8"))):
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


def test_readme_layout_table_names_existing_files():
    text = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    table = text.split("Where a part of the recipe or of the pipeline lives:", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in table.splitlines() if line.startswith("| ") and "`" in line]
    assert len(rows) >= 10
    for part in ("SAM", "EMA", "LR finder", "int8", "COCO"):
        assert any(part in row.split("|")[1] for row in rows), part
    for row in rows:
        cell = row.split("|")[2]
        paths = re.findall(r"`([\w/.]+\.py)`", cell)
        assert paths, row
        previous = REPO_ROOT / "README.md"
        for path in paths:  # a short path continues the previous one (`data/folder.py`, `data/annotations.py`)
            found = [f for f in (REPO_ROOT / path, *(a / path for a in previous.parents)) if f.is_file()]
            assert found, f"{path} in: {row}"
            previous = found[0]
