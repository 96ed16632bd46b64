"""The package's import graph: no circles, no arrow back up, no process groups in model code.

Read from the source (every import statement, also those inside functions; `if TYPE_CHECKING:` blocks are
type hints, not imports), so a lazy import cannot hide a circle.
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "usp_infer"
FAMILIES = ("ltx_video", "ltx2")
# A module may import from its own layer and those before it, never from a later one; a family never
# imports another family (what they share lives in the first layer).
LAYERS = (
    {"errors", "families", "guidance", "kernels", "config", "schedule", "request", "media", "layers", "modulation",
     "batch_keys", "estimate", "quant", "graphs"},
    {"parallel"},
    set(FAMILIES),
    {"latents", "sidecar", "batch"},
    {"runner", "bench", "calibrate"},
    {"cli", "bench_cli"},
    {"__main__"},
)


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    return isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def imports_of(source: str, package: str, known: set[str]) -> set[str]:
    """What a module of `package` imports: usp_infer modules (`from . import x` is x when x is a module)
    and outside modules (torch.distributed, ...)."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            for alias in node.names:  # `from . import model`: the module itself when it is one
                sub = f"{target}.{alias.name}"
                found.add(sub if sub in known else target)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(source))
    return found


def graph() -> dict[str, set[str]]:
    paths = sorted(PACKAGE.rglob("*.py"))
    known = {module_name(p) for p in paths}
    return {module_name(p): imports_of(p.read_text(), _package(p), known) for p in paths}


def _package(path: Path) -> str:
    name = module_name(path)
    return name if path.name == "__init__.py" else name.rpartition(".")[0]


def _group(module: str) -> str:
    return module.split(".")[1] if module.count(".") else "__init__"


def _layer(module: str) -> int | None:
    group = _group(module)
    return next((i for i, names in enumerate(LAYERS) if group in names), None)


def test_every_module_has_a_layer():
    unplaced = sorted(m for m in graph() if m != "usp_infer" and _layer(m) is None)
    assert not unplaced, f"place {unplaced} in LAYERS"


def test_no_import_circles():
    g = graph()
    edges = {m: {t for t in targets if t in g and t != m} for m, targets in g.items()}
    state: dict[str, int] = {}

    def walk(m: str, path: list[str]) -> None:
        state[m] = 1
        for t in sorted(edges[m]):
            if state.get(t) == 1:
                pytest.fail("import circle: " + " -> ".join(path[path.index(t):] + [m, t]))
            if t not in state:
                walk(t, path + [m])
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            walk(m, [])


def test_no_module_imports_one_above_it():
    g = graph()
    up = []
    for m, targets in g.items():
        for t in targets:
            if t in g and t != "usp_infer" and _layer(t) is not None and _layer(m) is not None:
                other_family = _group(m) in FAMILIES and _group(t) in FAMILIES and _group(m) != _group(t)
                if _layer(t) > _layer(m) or other_family:
                    up.append(f"{m} -> {t}")
    assert not up, "imports that run up, or from one family into another: " + ", ".join(sorted(up))


@pytest.mark.parametrize("family", FAMILIES)
def test_model_and_pipeline_modules_touch_no_process_group(family):
    shared = ["layers", "modulation", "kernels", "guidance", "schedule"]
    for module in [f"usp_infer.{family}.model", f"usp_infer.{family}.pipeline"] + [f"usp_infer.{m}" for m in shared]:
        uses = graph()[module]
        assert not any(t.startswith("torch.distributed") for t in uses), f"{module} imports torch.distributed"
        assert not any(t.startswith("usp_infer.parallel.") and t != "usp_infer.parallel.plan" for t in uses), (
            f"{module} reaches past the plan object into {sorted(t for t in uses if t.startswith('usp_infer.parallel.'))}")


def test_the_walker_sees_what_it_guards():
    """A lazy import inside a function counts; a TYPE_CHECKING import does not; `from . import x` is x;
    `..` climbs out of a family folder."""
    known = {"usp_infer.b", "usp_infer.ltx2.c", "usp_infer.d"}
    source = ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..b import X\n"
              "def f():\n    from . import c\n    import torch.distributed as dist\n    from ..d import y\n")
    found = imports_of(source, "usp_infer.ltx2", known)
    assert {"usp_infer.ltx2.c", "usp_infer.d", "torch.distributed"} <= found and "usp_infer.b" not in found
