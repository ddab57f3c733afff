"""The packages import each other one way (the diagram in README.md, Layout): configs, mesh and data
import none of model, trainer, objectives, hf_io, planner; model none of the packages above it; the
trainer reaches an objective only through the `Objective` protocol (objectives/protocol.py, the one
module of objectives/ it may import); objectives never import the trainer; hf_io shares the checkpoint
layout with the trainer through configs/checkpoint_layout.py instead of importing it. Every import in
a package's files counts, those inside functions too. Entry points import anything: planner/, bench/,
a package's `__main__.py` and a module's `if __name__ == "__main__":` block (`python -m model.summary`).
"""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
LOWER = ("configs", "mesh", "data")
# package -> the packages (or single modules) none of its files may import
FORBIDDEN = {
    **{package: ("model", "trainer", "objectives", "hf_io", "planner") for package in LOWER},
    "model": ("trainer", "objectives", "hf_io", "planner"),
    "objectives": ("trainer", "hf_io", "planner"),
    "trainer": ("objectives", "hf_io", "planner"),
    "hf_io": ("trainer", "objectives", "planner"),
}
ALLOWED = {"trainer": ("objectives.protocol",)}  # exceptions to FORBIDDEN: the typed seam


def _is_main_block(node: ast.AST) -> bool:
    """`if __name__ == "__main__":`"""
    return (
        isinstance(node, ast.If)
        and isinstance(node.test, ast.Compare)
        and isinstance(node.test.left, ast.Name)
        and node.test.left.id == "__name__"
        and any(isinstance(c, ast.Constant) and c.value == "__main__" for c in node.test.comparators)
    )


def _library_nodes(node: ast.AST):
    """`node` and everything under it, except `if __name__ == "__main__":` blocks."""
    yield node
    for child in ast.iter_child_nodes(node):
        if not _is_main_block(child):
            yield from _library_nodes(child)


def imported_modules(path: pathlib.Path) -> list[tuple[int, str]]:
    """(line, module) of every import statement of the file's library code, nested ones included."""
    found = []
    for node in _library_nodes(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            found += [(node.lineno, node.module)]
            found += [
                (node.lineno, f"{node.module}.{alias.name}")
                for alias in node.names
                if (ROOT / node.module.replace(".", "/") / f"{alias.name}.py").exists()
            ]
    return found


def _within(module: str, names) -> bool:
    return any(module == name or module.startswith(name + ".") for name in names)


def violations(package: str) -> list[str]:
    bad = []
    for path in sorted((ROOT / package).rglob("*.py")):
        if path.name == "__main__.py":
            continue
        for line, module in imported_modules(path):
            if _within(module, FORBIDDEN[package]) and not _within(module, ALLOWED.get(package, ())):
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    return bad


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_imports_run_one_way(package):
    assert violations(package) == []


def test_the_check_sees_nested_and_from_imports(tmp_path):
    """`from objectives import sft` is an import of objectives.sft, an import inside a function counts,
    one of the command-line block does not."""
    source = tmp_path / "example.py"
    source.write_text(
        "def f():\n    from objectives import sft\n    import hf_io.team\n\n"
        "if __name__ == '__main__':\n    import trainer.cli\n"
    )
    assert imported_modules(source) == [(2, "objectives"), (2, "objectives.sft"), (3, "hf_io.team")]
