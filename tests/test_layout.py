"""The package's layering: what each layer may import from dkdm (function-level imports included):
the math, then networks and specs, the model, its formats; the run rules and the CLI on top."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "dkdm"


def _module(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every dkdm module ``path`` imports, resolved to absolute names."""
    here = _module(path).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            target = ".".join([*base, *(node.module.split(".") if node.module else [])])
            if target.startswith("dkdm"):
                found.add(target)
                found.update(f"{target}.{a.name}" for a in node.names
                             if (PACKAGE.parent / f"{target}.{a.name}".replace(".", "/")).with_suffix(".py").exists())
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("dkdm"))
    return found


MODULES = {_module(p): _imports(p) for p in PACKAGE.rglob("*.py")}


@pytest.mark.parametrize("layer,allowed", [
    ("dkdm.choices", set()),
    ("dkdm.diffusion", {"dkdm.errors", "dkdm.choices", "dkdm.layout"}),
    ("dkdm.nets", {"dkdm.errors", "dkdm.choices", "dkdm.layout", "dkdm.nets"}),
    ("dkdm.objective", {"dkdm.errors", "dkdm.choices", "dkdm.layout", "dkdm.diffusion"}),
    ("dkdm.consistency", {"dkdm.errors", "dkdm.choices", "dkdm.layout", "dkdm.diffusion"}),  # the few-step objective and sampler: math too
    ("dkdm.matching", {"dkdm.errors", "dkdm.choices", "dkdm.layout", "dkdm.diffusion", "dkdm.consistency"}),
    ("dkdm.flags", {"dkdm.errors", "dkdm.choices", "dkdm.layout", "dkdm.settings"}),
    ("dkdm.settings", {"dkdm.errors", "dkdm.choices", "dkdm.layout"}),
    ("dkdm.specs", {"dkdm.errors", "dkdm.choices", "dkdm.layout", "dkdm.nets"}),
    ("dkdm.students", {"dkdm.errors", "dkdm.choices", "dkdm.layout", "dkdm.nets", "dkdm.specs"}),
    ("dkdm.model", {"dkdm.errors", "dkdm.choices", "dkdm.layout", "dkdm.diffusion", "dkdm.consistency", "dkdm.nets", "dkdm.specs", "dkdm.students"}),
    ("dkdm.formats", {"dkdm.errors", "dkdm.choices", "dkdm.layout", "dkdm.diffusion", "dkdm.consistency", "dkdm.nets", "dkdm.specs", "dkdm.students", "dkdm.model",
                      "dkdm.formats", "dkdm.settings"}),
])
def test_lower_layers_import_nothing_above_them(layer, allowed):
    for name, imports in MODULES.items():
        if name == layer or name.startswith(layer + "."):
            above = {i for i in imports if not any(i == a or i.startswith(a + ".") for a in allowed)}
            assert not above, f"{name} imports {sorted(above)}"


def test_only_the_command_line_and_the_package_use_the_run_rules_and_nothing_imports_the_cli():
    for name, imports in MODULES.items():
        assert "dkdm.cli" not in imports, name
        if name not in ("dkdm", "dkdm.cli", "dkdm.runs", "dkdm.tools"):
            assert not {"dkdm.runs", "dkdm.tools"} & imports, f"{name} imports the run rules"
    cli = MODULES["dkdm.cli"] - {"dkdm", "dkdm.flags", "dkdm.choices", "dkdm.layout", "dkdm.errors", "dkdm.peers", "dkdm.runs", "dkdm.settings", "dkdm.tools",
                                 "dkdm.evaluation"}
    assert not cli, f"cli.py does more than parse and call: it imports {sorted(cli)}"



def test_the_run_rules_layer_from_the_run_directory_up_to_runs():
    """rundir (the directory's rules) < runloop (a locked run) < distillation (plan and pool) < runs;
    nothing outside the run rules imports them."""
    order = ["dkdm.rundir", "dkdm.runloop", "dkdm.distillation", "dkdm.runs"]
    for i, name in enumerate(order):
        assert not set(order[i + 1:]) & MODULES[name], f"{name} imports a run rule above it"
    for name, imports in MODULES.items():
        if name not in (*order, "dkdm", "dkdm.cli", "dkdm.tools"):
            assert not set(order) & imports, f"{name} imports the run rules"


def test_every_module_has_a_docstring_saying_its_job():
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text())
        assert ast.get_docstring(tree), f"{path.relative_to(PACKAGE)} has no docstring saying its job"
