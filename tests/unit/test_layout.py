"""The tree reads like ``raydc --help``: every top-level name in raydc/ is the front door, a
stage named as its command, or one of four support packages; no stage imports another
stage's code; module-level imports have no cycle."""

from __future__ import annotations

import ast
from pathlib import Path

from raydc.pipeline.table import STAGES

PKG = Path(__file__).resolve().parents[2] / "raydc"
FRONT = {"cli", "pipeline"}
SUPPORT = {"engines", "config", "method", "infra"}
DATA = {"assets", "configs"}
# A stage may use another stage's public functions only here, each for a reason:
ALLOWED = {
    ("tune", "train"),  # a trial is a training run (build_trainer, export_model)
    ("tune", "eval"),  # a trial's metric may be an eval (run_eval, reverse_kl)
    ("mixed_policy", "eval"),  # the pure final-answer graders
}


def _top(path: Path) -> str:
    rel = path.relative_to(PKG)
    return rel.parts[0].removesuffix(".py")


def _imports(path: Path, module_level_only: bool = False) -> set[str]:
    tree = ast.parse(path.read_text())
    nodes = tree.body if module_level_only else list(ast.walk(tree))
    out = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("raydc"):
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("raydc"))
    return out


def _modules() -> dict[str, Path]:
    mods = {}
    for f in PKG.rglob("*.py"):
        parts = list(f.relative_to(PKG.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        mods[".".join(parts)] = f
    return mods


def test_every_top_level_name_is_the_front_door_a_stage_or_a_support_package():
    stages = {s.name for s in STAGES}
    names = {p.name.removesuffix(".py") for p in PKG.iterdir() if not p.name.startswith("__")}
    assert names <= FRONT | stages | SUPPORT | DATA, names - (FRONT | stages | SUPPORT | DATA)
    assert stages <= names  # every stage has its module, named as its command


def test_no_stage_imports_another_stages_code():
    stages = {s.name for s in STAGES}
    crossings = set()
    for f in PKG.rglob("*.py"):
        own = _top(f)
        if own not in stages:
            continue
        for mod in _imports(f):
            other = mod.split(".")[1] if "." in mod else ""
            if other in stages and other != own and (own, other) not in ALLOWED:
                crossings.add((f.relative_to(PKG).as_posix(), mod))
    assert not crossings


def test_support_packages_import_no_stage_and_the_method_no_plumbing():
    stages = {s.name for s in STAGES}
    for f in PKG.rglob("*.py"):
        own = _top(f)
        if own not in SUPPORT:
            continue
        for mod in _imports(f):
            top = mod.split(".")[1] if "." in mod else ""
            assert top not in stages | FRONT, (f, mod)
            if own == "method":
                assert top == "method", (f, mod)  # pure: nothing but itself


def test_module_level_imports_have_no_cycle():
    mods = _modules()
    graph = {}
    for name, f in mods.items():
        deps = set()
        for mod in _imports(f, module_level_only=True):
            # `from raydc.x import y` may name a submodule y or an attribute of x
            while mod and mod not in mods:
                mod = mod.rpartition(".")[0]
            if mod and mod != name:
                deps.add(mod)
        graph[name] = deps
    state: dict[str, int] = {}

    def visit(node, path):
        state[node] = 1
        for dep in graph.get(node, ()):
            if state.get(dep) == 1:
                cycle = path[path.index(dep) :] + [dep] if dep in path else [node, dep]
                raise AssertionError(f"import cycle: {' -> '.join(cycle)}")
            if dep not in state:
                visit(dep, path + [dep])
        state[node] = 2

    for node in graph:
        if node not in state:
            visit(node, [node])
