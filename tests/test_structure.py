"""The package stays readable: modules short enough to read in one sitting, and none reaching into a CLI script."""
import ast

from conftest import REPO

PACKAGE = REPO / "kogpt2"


def test_no_module_is_over_300_lines():
    long = {p.name: n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text(encoding="utf-8").splitlines())) > 300}
    assert long == {}


def test_no_module_imports_a_cli_script():
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not {"main", "generator"} & set(names), path.name


def test_every_module_is_in_the_architecture_notes():
    notes = (REPO / "docs" / "ARCHITECTURE.md").read_text(encoding="utf-8")
    missing = [p.name for p in PACKAGE.glob("*.py") if p.name != "__init__.py" and f"`{p.name}`" not in notes]
    assert missing == []
