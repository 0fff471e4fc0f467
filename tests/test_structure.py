"""The package stays a house a newcomer can read: folders in the order data flows, imports only downward, no cycles,
the architecture notes true to the files and to the checkpoint the code writes, every default in one place."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
from conftest import REPO

PACKAGE = REPO / "kogpt2"
BASE = {"errors", "defaults", "arguments", "runtime"}  # top-level modules every folder may use
COMMANDS = {"finetune", "generator", "evaluate", "export", "plot"}  # top-level modules the CLIs run
# Lowest first: a module may import its own layer and the layers before it, never a later one.
LAYERS = ["base", "model", "corpus", "store", "generation", "train", "serve", "commands"]


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def layer(module: str) -> str | None:
    parts = module.split(".")[1:]
    if not parts:
        return None  # the package's lazy front door
    if len(parts) == 1 and parts[0] in BASE:
        return "base"
    if len(parts) == 1 and parts[0] in COMMANDS:
        return "commands"
    return parts[0] if parts[0] in LAYERS else f"unplaced:{parts[0]}"


def imports(path: Path, known: dict[str, Path]) -> set[str]:
    """Every package module ``path`` imports: at module level, inside functions, under TYPE_CHECKING, relative or
    absolute; ``from .pkg import mod`` counts as importing ``mod``."""
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            targets = [stem] + [f"{stem}.{a.name}" for a in node.names]
        else:
            continue
        found |= {t for t in targets if t in known and t != me}
    return found


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(path, known) for name, path in known.items()}


def test_the_import_graph_is_read_from_every_kind_of_import():
    edges = graph()
    assert {"kogpt2.model.kv_cache", "kogpt2.model.config"} <= edges["kogpt2.model.gpt"]
    assert "kogpt2.errors" in edges["kogpt2.store.checkpoint"]  # relative, two dots
    assert "kogpt2.store.opening" in edges["kogpt2.evaluate"]  # inside a function


def test_no_import_cycles():
    edges, state, cycles = graph(), {}, []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(edges[node]):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert cycles == []


def test_every_module_has_a_place_and_imports_only_downward():
    upward = []
    for source, targets in graph().items():
        if layer(source) is None:
            continue
        assert layer(source) in LAYERS, f"{source} is in no declared folder"
        for target in targets:
            if LAYERS.index(layer(target)) > LAYERS.index(layer(source)):
                upward.append(f"{source} -> {target}")
    assert upward == []


def test_the_model_folder_reads_alone():
    outside = {t for s, ts in graph().items() if layer(s) == "model" for t in ts if layer(t) not in ("model", "base")}
    assert outside == set()


def test_every_folder_says_what_it_holds():
    for folder in (p for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists() and p.name in LAYERS):
        assert ast.get_docstring(ast.parse((folder / "__init__.py").read_text(encoding="utf-8"))), folder.name


def test_no_module_imports_a_cli_script():
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not {"main", "generator"} & set(names), path.name


def architecture() -> str:
    return (REPO / "docs" / "ARCHITECTURE.md").read_text(encoding="utf-8")


def test_the_architecture_notes_list_exactly_the_modules_there_are():
    listed = set(re.findall(r"^\| `([\w/]+\.py)` \|", architecture(), flags=re.M))
    files = {str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py") if p.name != "__init__.py"}
    assert listed == files


LORA_ONLY = {"adapters", "lora", "base"}  # a --lora run's checkpoints hold these instead of model_state_dict


def test_the_architecture_notes_list_exactly_the_keys_a_checkpoint_holds(trained, tmp_path):
    import torch
    from conftest import SAMPLE_CSV, run_main

    table = architecture().split("## The `.tar` checkpoint", 1)[1]
    listed = set(re.findall(r"^\| `(\w+)` \|", table, flags=re.M))
    written = set(torch.load(sorted(trained.glob("KoGPT2_checkpoint_*.tar"))[-1], weights_only=True))
    optional = {"scaler"}  # fp16 runs only; the table says so
    assert written <= listed and listed - written == optional | LORA_ONLY
    assert run_main("--epoch", 1, "--pretrained", trained / "KoGPT2_best.tar", "--lora", 2, "--data_file_path",
                    SAMPLE_CSV, "--max_len", 64, "--save_path", tmp_path) == 0
    adapters = set(torch.load(next(tmp_path.glob("KoGPT2_checkpoint_*.tar")), weights_only=True))
    assert adapters == written - {"model_state_dict"} | LORA_ONLY


def is_literal(node: ast.expr) -> bool:
    """A number or a string written out (None and the flags' True/False are not defaults to share)."""
    try:
        value = ast.literal_eval(node)
    except ValueError:
        return False
    return value is not None and not isinstance(value, bool)


CLI_FILES = [REPO / "main.py", REPO / "generator.py", *(PACKAGE / f"{c}.py" for c in ("evaluate", "export", "plot"))]


@pytest.mark.parametrize("path", CLI_FILES, ids=lambda p: p.name)
def test_no_flag_writes_its_default_as_a_literal(path):
    """Every flag's default comes from kogpt2.defaults, so --help, the engine and a resume can never disagree."""
    literal = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument":
            for kw in node.keywords:
                if kw.arg == "default" and is_literal(kw.value):
                    literal.append(f"{node.args[0].value}={ast.unparse(kw.value)}")
    assert literal == []


def test_training_settings_take_their_defaults_from_the_defaults_module():
    tree = ast.parse((PACKAGE / "train" / "trainer.py").read_text(encoding="utf-8"))
    settings = next(n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == "TrainSettings")
    literal = [f.target.id for f in settings.body if isinstance(f, ast.AnnAssign) and f.value is not None
               and is_literal(f.value) and isinstance(ast.literal_eval(f.value), (int, float))]
    assert literal == []
