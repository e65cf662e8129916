"""Imports go one way: ldm <- controls <- inversion <- editing, with the command line and the benchmarks on top;
weights_convert imports only ldm and controls (README, "Packages"). Every module's imports, top-level and inside
functions, are read from its source (nothing is imported) and checked against the layer of its package."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

ALLOWED = {  # package -> the first-party packages its modules may import
    "ldm": {"ldm"},
    "controls": {"ldm", "controls"},
    "inversion": {"ldm", "controls", "inversion"},
    "weights_convert": {"ldm", "controls", "weights_convert"},
    "editing": {"ldm", "controls", "inversion", "weights_convert", "editing"},
}
# the command line, the benchmarks and the lab (which runs the command line's commands): nothing imports them
TOP = ("editing.cli", "editing.commands", "editing.bench", "editing.lab")
TOP_FILES = ("editing/cli.py", "editing/commands/", "editing/bench/", "editing/lab/")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(source: str, module: str, is_package: bool) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import statement in ``source``; relative imports are resolved
    against ``module``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[:len(base) - (node.level - 1)]
                name = ".".join(base + ([node.module] if node.module else []))
                # "from . import x" may name submodules: check each as a module
                names = [f"{name}.{a.name}" for a in node.names] if not node.module else [name]
                found += [(node.lineno, n) for n in names]
            else:
                found.append((node.lineno, node.module))
    return found


def violations(path: Path, source: str | None = None) -> list[str]:
    relative = path.relative_to(ROOT).as_posix()
    package = relative.split("/")[0]
    module = module_name(path)
    source = path.read_text(encoding="utf-8") if source is None else source
    out = []
    for line, name in imported_modules(source, module, path.name == "__init__.py"):
        top = name.split(".")[0]
        if top in ALLOWED and top not in ALLOWED[package]:
            out.append(f"{relative}:{line} imports {name}: {package} may import only {sorted(ALLOWED[package])}")
        elif any(name == t or name.startswith(t + ".") for t in TOP) and not relative.startswith(TOP_FILES):
            out.append(f"{relative}:{line} imports {name}: the command line and benchmarks sit on top of editing")
    return out


def source_files() -> list[Path]:
    return sorted(p for package in ALLOWED for p in (ROOT / package).rglob("*.py"))


def test_every_package_is_checked():
    assert len(source_files()) > 80
    assert {p.relative_to(ROOT).parts[0] for p in source_files()} == set(ALLOWED)


def test_no_module_imports_against_the_layers():
    problems = [v for path in source_files() for v in violations(path)]
    assert not problems, "imports against the layers:\n" + "\n".join(problems)


@pytest.mark.parametrize("where, source, bad", [
    ("ldm/x.py", "from controls.controlnet import ControlNet\n", True),
    ("inversion/x.py", "def f():\n    from editing.p2p import P2PConfig\n", True),  # inside a function too
    ("controls/x.py", "import inversion.visii\n", True),
    ("weights_convert/x.py", "from inversion.visii import train_visii\n", True),
    ("editing/p2p/x.py", "from ..commands import p2p\n", True),  # a method importing the CLI
    ("editing/x.py", "import editing.bench.p2p\n", True),
    ("inversion/x.py", "from controls.image_condition import image_condition\nfrom .pez import PezConfig\n", False),
    ("editing/commands/x.py", "from ..options import load_model\nfrom weights_convert import convert\n", False),
    ("weights_convert/x.py", "from controls.controlnet import ControlNet\nfrom . import report\n", False),
])
def test_the_check_sees_an_import_against_the_layers(where, source, bad):
    assert bool(violations(ROOT / where, source)) == bad
