"""The package's layers point one way, with no import circles, and the library imports without its applications.

Layers, lowest first: the native ops and plumbing; the adapters (method records, configs, layer, inject/merge/save,
the data-driven init); training utilities and pruning; helpers and assets for applications; the applications
(knowledge editing, the demo, the command line). A module may import only from its own layer or lower ones --
every import counts, also one inside a function.
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "sparse_adapt"

LAYERS = [
    {"_native", "_checks", "ops", "reference", "distributed", "memory", "progress"},
    {"adapters"},
    {"training", "prune", "peft", "serving"},
    {"lm", "assets"},
    {"edit", "demo", "cli", "__main__"},
]


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(name: str) -> bool:
    """A .py file, a package, or a compiled extension (sparse_adapt._C)."""
    path = ROOT / Path(*name.split("."))
    return (path.with_suffix(".py").exists() or (path / "__init__.py").exists()
            or any(path.parent.glob(path.name + ".*.so")))


def imports(path: Path):
    """The sparse_adapt modules `path` imports, anywhere in it (relative imports resolved)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):  # `if TYPE_CHECKING:` imports exist for annotations only: not imports at run time
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            node.body = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("sparse_adapt")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("sparse_adapt"):
                continue
            # `from . import x` imports the submodule x when there is one
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.add(sub if is_module(sub) else target)
    return found - {name}


def graph():
    return {module_name(p): imports(p) for p in PACKAGE.rglob("*.py")}


def layer_of(module: str) -> int:
    top = module.split(".")[1] if "." in module else ""
    if top == "_C":
        return 0
    for i, layer in enumerate(LAYERS):
        if top in layer:
            return i
    raise AssertionError(f"{module} belongs to no layer: add it to LAYERS")


def test_every_import_points_down_or_sideways():
    wrong = []
    for module, deps in graph().items():
        if module == "sparse_adapt":
            continue  # the package's namespace (its applications load lazily, see below)
        for dep in deps:
            if dep != "sparse_adapt" and layer_of(dep) > layer_of(module):
                wrong.append(f"{module} (layer {layer_of(module)}) imports {dep} (layer {layer_of(dep)})")
    assert not wrong, "\n".join(wrong)


def test_no_import_circles():
    full = graph()
    g = {m: deps & set(full) for m, deps in full.items()}
    state = {}

    def visit(m, path):
        state[m] = "open"
        for d in g.get(m, ()):
            if state.get(d) == "open":
                cycle = path[path.index(d):] + [d]
                raise AssertionError("import circle: " + " -> ".join(cycle))
            if d not in state:
                visit(d, path + [d])
        state[m] = "done"

    for m in g:
        if m not in state:
            visit(m, [m])


@pytest.mark.parametrize("absent", ["sparse_adapt.demo", "sparse_adapt.edit", "sparse_adapt.assets", "transformers"])
def test_import_sparse_adapt_loads_no_application(absent):
    code = f"import sys, sparse_adapt; sys.exit(int({absent!r} in sys.modules))"
    loaded = subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode
    assert loaded == 0, f"import sparse_adapt loaded {absent}"


def test_applications_load_on_first_use():
    code = "import sparse_adapt as sa; assert sa.demo.DemoSettings and sa.edit.Edit and sa.models.load_smollm2"
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0
