"""The layers, checked as code: what each entry point imports, no import cycles, no attributes read off a model.

The process boundary is what is tested in the import checks (what a fresh `import` pulls in), so they run a
fresh interpreter each; the rest reads the source with `ast`.
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"qwen_mlx": ROOT / "qwen_mlx", "qwen_mlx.app": ROOT / "app", "qwen_mlx.convert": ROOT / "convert"}


def modules_after(code: str) -> set[str]:
    """The module names a fresh interpreter holds after running `code`."""
    script = f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    return set(json.loads(out.strip().splitlines()[-1]))


def test_loading_a_model_imports_no_transformers_and_nothing_about_several_macs(checkpoint) -> None:
    path = checkpoint("dense_tied")
    modules = modules_after(f"import qwen_mlx\nqwen_mlx.load({str(path)!r}, quantize=4)")
    assert "transformers" not in modules
    assert not [m for m in modules if m.startswith("qwen_mlx.distributed")]
    assert "mlx_lm" not in modules  # loading needs nothing of mlx-lm


def test_the_single_stream_engine_imports_nothing_about_several_macs() -> None:
    modules = modules_after("import qwen_mlx.chat, qwen_mlx.engine, qwen_mlx.turn")
    assert not [m for m in modules if m.startswith("qwen_mlx.distributed")]
    # mlx-lm's caches and samplers come without its package __init__, which imports transformers.
    assert "mlx_lm.sample_utils" in modules and "transformers" not in modules


def test_mlx_lm_still_works_whole_after_our_partial_import() -> None:
    code = (
        "from qwen_mlx.cache import make_cache\n"
        "from mlx_lm import load, convert\n"
        "import mlx_lm.models.cache as c, qwen_mlx.mlxlm as ours\n"
        "assert callable(load) and callable(convert)\n"
        "assert ours.submodule('models.cache') is c\n"
    )
    assert "transformers" in modules_after(code)


def _modules() -> dict[str, tuple[Path, bool]]:
    found = {}
    for package, folder in PACKAGES.items():
        for file in folder.rglob("*.py"):
            parts = [p for p in file.relative_to(folder).with_suffix("").parts if p != "__init__"]
            found[".".join([package, *parts])] = (file, file.name == "__init__.py")
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports, at module level or inside functions."""
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, (file, is_package) in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                deps.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)] if node.level else []
                target = ".".join(base + ([node.module] if node.module else [])) if node.level else node.module
                submodules = [f"{target}.{alias.name}" for alias in node.names]
                deps.update(s for s in submodules if s in modules)
                if not all(s in modules for s in submodules):  # names defined in the module itself
                    deps.add(target)
        graph[name] = {d for d in deps if d in modules and d != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle_at_module_level_or_inside_functions() -> None:
    graph = import_graph()
    assert graph["qwen_mlx.demo"] and graph["qwen_mlx.loader"]  # the graph was read
    assert cycles(graph) == []


def test_cycles_are_found_when_there_are_some() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


@pytest.mark.parametrize("attribute", ["link", "path", "config"])
def test_nothing_reads_attributes_off_a_model(attribute: str) -> None:
    """Loading returns an explicit result (`Loaded`); no module fishes `link`, `path` or `config` off a model."""
    offenders = []
    for name, (file, _) in _modules().items():
        for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id in ("getattr", "hasattr")
                and len(node.args) >= 2
                and isinstance(node.args[1], ast.Constant)
                and node.args[1].value == attribute
            ):
                offenders.append(f"{name}:{node.lineno}")
    assert offenders == []


def test_the_readme_layout_names_every_module() -> None:
    """A newcomer finds any module from the README's layout table in one step."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    layout = readme.split("## Layout", 1)[1].split("\n## ", 1)[0]
    named = set(re.findall(r"`([^`]+)`", layout))
    modules = [
        path.relative_to(ROOT).as_posix()
        for folder in PACKAGES.values()
        for path in sorted(folder.rglob("*.py"))
        if not path.name.startswith("__")
    ]
    missing = [module for module in modules if module not in named]
    assert not missing, f"add these to the README's layout table: {missing}"
