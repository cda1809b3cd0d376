"""One home for each TensorRT concern, checked on the source: TensorRT is imported only by
runtime.tensorrt.lib, pycuda only by runtime.tensorrt.cuda_memory, the plugin library is looked up only
through plugins.plugin_library_path(), and no runtime module writes files by temp-file-and-rename itself
(export.contract.files does)."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
RUNTIME = ROOT / "runtime"


def _sources():
    for path in sorted(RUNTIME.rglob("*.py")):
        yield path.relative_to(ROOT).as_posix(), ast.parse(path.read_text())


def _imported(tree) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def _top(name: str) -> str:
    return name.split(".")[0]


def test_tensorrt_is_imported_in_one_place():
    offenders = [rel for rel, tree in _sources() if rel != "runtime/tensorrt/lib.py"
                 and any(_top(n) == "tensorrt" for n in _imported(tree))]
    assert not offenders, f"import tensorrt outside runtime/tensorrt/lib.py (use import_tensorrt()): {offenders}"


def test_cuda_is_called_from_one_module():
    offenders = [rel for rel, tree in _sources() if rel != "runtime/tensorrt/cuda_memory.py"
                 and any(_top(n) == "pycuda" for n in _imported(tree))]
    assert not offenders, f"pycuda used outside runtime/tensorrt/cuda_memory.py: {offenders}"


def test_the_plugin_library_is_looked_up_in_one_function():
    offenders = []
    for rel, tree in _sources():
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr in ("library_path", "search_dirs", "_find") \
                    and isinstance(node.value, ast.Name) and node.value.id == "plugins":
                offenders.append(f"{rel}: plugins.{node.attr}")
            if isinstance(node, ast.ImportFrom) and node.module == "plugins":
                offenders += [f"{rel}: from plugins import {a.name}" for a in node.names
                              if a.name != "plugin_library_path" and a.name != "PluginNotBuiltError"]
    assert not offenders, f"plugin library looked up other than by plugins.plugin_library_path(): {offenders}"


def test_no_hand_written_atomic_writes_in_tensorrt_and_serving():
    offenders = []
    for rel, tree in _sources():
        if not rel.startswith(("runtime/tensorrt/", "runtime/serving/")):
            continue
        if "tempfile" in {_top(n) for n in _imported(tree)}:
            offenders.append(f"{rel}: imports tempfile")
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                    and node.func.attr in ("replace", "umask", "mkstemp", "mkdtemp") \
                    and not (node.func.attr == "replace" and node.args and isinstance(node.args[0], ast.Constant)):
                offenders.append(f"{rel}:{node.lineno}: .{node.func.attr}(...)")
    assert not offenders, ("temp-file/rename written by hand (use export.contract.files): "
                           + "; ".join(offenders))
