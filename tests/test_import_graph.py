"""The package's import graph, read statically from the source, has no cycle.

Every `import dipfast...` and `from dipfast... import ...` anywhere in a file is an edge, at module level
or inside a function alike (a deferred import still ties the two modules together); relative imports are
resolved, and `from pkg import name` points at the submodule `pkg.name` when there is one, else at `pkg`.
Nothing is imported, so the test reads the source as written, whatever is installed.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "dipfast"


def package_files(root: Path = ROOT) -> dict[str, Path]:
    """Module name -> source file: dipfast/ as laid out, and the top-level kernels/ as dipfast.kernels."""
    files = {}
    for source, prefix in ((root / PACKAGE, (PACKAGE,)), (root / "kernels", (PACKAGE, "kernels"))):
        for path in sorted(source.rglob("*.py")):
            parts = path.relative_to(source).with_suffix("").parts
            if parts[0] == "kernels" and prefix == (PACKAGE,):
                continue  # a local dipfast/kernels link to kernels/, read once under its own name
            if parts[-1] == "__init__":
                parts = parts[:-1]
            files[".".join(prefix + parts)] = path
    return files


def _imported(node: ast.AST, module: str, is_package: bool, modules: set[str]) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if not isinstance(node, ast.ImportFrom):
        return []
    base = node.module or ""
    if node.level:
        anchor = module.split(".") if is_package else module.split(".")[:-1]
        anchor = anchor[: len(anchor) - (node.level - 1)]
        base = ".".join(anchor + ([base] if base else []))
    targets = []
    for alias in node.names:
        submodule = f"{base}.{alias.name}"
        targets.append(submodule if submodule in modules else base)
    return targets


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """Module name -> the package modules it imports (anywhere in its file)."""
    files = package_files(root)
    modules = set(files)
    graph = {}
    for module, path in files.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        is_package = path.name == "__init__.py"
        targets = set()
        for node in ast.walk(tree):
            for target in _imported(node, module, is_package, modules):
                # `import dipfast.a.b` names a module; keep the longest prefix that is one of ours
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != module:
                    targets.add(target)
        graph[module] = targets
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None: an iterative depth-first search with colours."""
    state = {}  # absent: unvisited; 1: on the current path; 2: finished
    for start in sorted(graph):
        if start in state:
            continue
        path, stack = [start], [iter(sorted(graph[start]))]
        state[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            elif nxt not in state:
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph.get(nxt, ()))))
    return None


def test_import_graph_reads_every_edge_kind(tmp_path):
    """The reader sees module- and function-level, absolute, relative and `from pkg import submodule`."""
    pkg = tmp_path / PACKAGE
    (pkg / "sub").mkdir(parents=True)
    (tmp_path / "kernels").mkdir()
    (pkg / "__init__.py").write_text("from dipfast.a import f\n")
    (pkg / "a.py").write_text("def f():\n    from .sub import b\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "b.py").write_text("import dipfast.sub.c as c\nfrom . import c\nfrom .. import a\n")
    (pkg / "sub" / "c.py").write_text("from dipfast.kernels.k import run\n")
    (tmp_path / "kernels" / "__init__.py").write_text("")
    (tmp_path / "kernels" / "k.py").write_text("import torch\nfrom dipfast.sub import helper\n")
    graph = import_graph(tmp_path)
    assert graph == {
        "dipfast": {"dipfast.a"},
        "dipfast.a": {"dipfast.sub.b"},
        "dipfast.sub": set(),
        "dipfast.sub.b": {"dipfast.sub.c", "dipfast.a"},
        "dipfast.sub.c": {"dipfast.kernels.k"},
        "dipfast.kernels": set(),
        "dipfast.kernels.k": {"dipfast.sub"},
    }
    assert find_cycle(graph) == ["dipfast.a", "dipfast.sub.b", "dipfast.a"]
    assert find_cycle({**graph, "dipfast.sub.b": {"dipfast.sub.c"}}) is None


def test_package_has_no_import_cycle():
    graph = import_graph()
    assert "dipfast.nets.skip" in graph and "dipfast.kernels.conv_bn_lrelu" in graph  # the walk saw the package
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_importing_dipfast_leaves_the_heavy_optional_modules_unloaded():
    """Every fit and every command starts with `import dipfast`: scikit-image (and SciPy under it) took 0.25 s of
    its 0.35 s beyond torch until SSIM imported it where it is computed; Triton, Ray and matplotlib load where used."""
    import subprocess
    import sys

    heavy = ("skimage", "scipy", "triton", "ray", "matplotlib")
    code = f"import sys, dipfast; print(sorted(m for m in {heavy!r} if m in sys.modules))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "[]"
