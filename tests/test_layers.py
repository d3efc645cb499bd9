"""Architecture rules: imports go one way (math <- modules <- surgery <- formats <- models <- trainer <- CLI);
size budgets."""
import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "lorakit"
# lower number = lower layer; a module may import only from its own layer or lower ones
LAYERS = [
    ("lorakit.adapters.functional", 0),
    ("lorakit.adapters.modules", 1),
    ("lorakit.adapters.registry", 2),
    ("lorakit.surgery", 3),
    ("lorakit.formats", 4),
    ("lorakit.models", 5),  # base models: configs, checkpoints (uses the validated file I/O), the tiny model
    ("lorakit.inspect_file", 5),
    ("lorakit.training", 6),
    ("lorakit.tools", 6),  # file tools: resize, extract, merge, blocks, convert
    ("lorakit.evaluation", 7),  # grids, metrics, diagnostics, sweeps, reports
    ("lorakit.demo", 8),
    ("lorakit.cli", 9),
    ("lorakit.cli_tools", 9),
    ("lorakit.gui", 9),  # the web GUI: a face on the API; only the CLI starts it
]


def layer_of(module: str) -> int | None:
    for prefix, rank in LAYERS:
        if module == prefix or module.startswith(prefix + "."):
            return rank
    return None


def modules():
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC.parent).with_suffix("")
        yield ".".join(p for p in rel.parts if p != "__init__"), path


@pytest.mark.parametrize("name,path", list(modules()), ids=lambda v: str(v) if isinstance(v, str) else "")
def test_imports_point_down(name, path):
    own = layer_of(name)
    if own is None:
        return
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.ImportFrom) and node.module:
            targets = [node.module]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        for target in targets:
            rank = layer_of(target)
            assert rank is None or rank <= own, f"{name} (layer {own}) imports {target} (layer {rank})"


def test_size_budgets():
    too_long = []
    for name, path in modules():
        text = path.read_text()
        if len(text.splitlines()) > 500:
            too_long.append(f"{name}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > 60:
                    too_long.append(f"{name}.{node.name}: {length} lines")
    assert not too_long, too_long
