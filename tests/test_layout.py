"""The layout's rules, checked: imports flow down the stages, no cycles, the serving path needs no
torch, and every contract constant has one home."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("export", "calibration", "runtime", "plugins")
#: stage of each package prefix; a module may import only its own stage or earlier ones
STAGES = {"export.contract": 0, "export": 1, "plugins": 1, "calibration": 2, "runtime": 3}
#: modules that must import without torch (the deployment box)
TORCH_FREE = ("export.contract", "calibration", "runtime", "plugins")


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            rel = path.relative_to(ROOT).with_suffix("")
            parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
            out[".".join(parts)] = path
    return out


def _imports(path: Path, top_level_only: bool) -> set[str]:
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    names = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def _stage(module: str) -> int | None:
    best = None
    for prefix, stage in STAGES.items():
        if module == prefix or module.startswith(prefix + "."):
            if best is None or len(prefix) > len(best[0]):
                best = (prefix, stage)
    return None if best is None else best[1]


def test_no_relative_imports_and_imports_flow_down():
    mods = _modules()
    upward = []
    for name, path in mods.items():
        tree = ast.parse(path.read_text())
        assert not any(isinstance(n, ast.ImportFrom) and n.level for n in ast.walk(tree)), f"{name}: relative import"
        for imported in _imports(path, top_level_only=False):
            if imported in mods and _stage(imported) is not None and _stage(imported) > _stage(name):
                upward.append(f"{name} -> {imported}")
    assert not upward, "imports against the flow export -> calibration -> runtime:\n" + "\n".join(sorted(upward))


def test_no_import_cycles_between_modules():
    mods = _modules()
    graph = {name: {m for m in _imports(path, top_level_only=False) if m in mods and m != name}
             for name, path in mods.items()}
    # a package's __init__ importing its own submodules is not a cycle of concern; edges into a
    # package from its own submodules are dropped
    for name in graph:
        graph[name] = {m for m in graph[name] if not name.startswith(m + ".")}
    seen, stack, cycles = {}, [], []

    def visit(node):
        seen[node] = "active"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if seen.get(nxt) == "active":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in seen:
                visit(nxt)
        stack.pop()
        seen[node] = "done"

    for node in sorted(graph):
        if node not in seen:
            visit(node)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_serving_modules_import_with_torch_unimportable():
    mods = sorted(m for m in _modules() if m.startswith(TORCH_FREE))
    script = (
        "import sys, importlib\n"
        "class NoTorch:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'torch' or name.startswith('torch.'):\n"
        "            raise ImportError('torch is not installed on this deployment box')\n"
        "sys.meta_path.insert(0, NoTorch())\n"
        f"for m in {mods!r}:\n"
        "    importlib.import_module(m)\n"
        "print('ok', len(sys.modules))\n")
    run = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]


def test_torch_free_trees_import_torch_only_inside_functions():
    offenders = []
    for name, path in _modules().items():
        if name.startswith(TORCH_FREE):
            if any(i == "torch" or i.startswith("torch.") for i in _imports(path, top_level_only=True)):
                offenders.append(name)
    assert not offenders, f"top-level torch imports in torch-free modules: {offenders}"


@pytest.mark.parametrize("constant", ["OP_TYPE", "OP_DOMAIN", "PLUGIN_VERSION", "PLUGIN_NAMESPACE", "MAX_K",
                                      "NORM_EPS", "ROW_BLOCK", "EXTRA_CANDIDATES"])
def test_every_contract_constant_is_defined_once(constant):
    homes = []
    for name, path in _modules().items():
        for node in ast.parse(path.read_text()).body:
            targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
            if any(isinstance(t, ast.Name) and t.id == constant for t in targets):
                homes.append(name)
    assert len(homes) == 1 and homes[0].startswith("export.contract"), f"{constant} defined in {homes}"
