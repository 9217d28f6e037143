"""The package's import graph, read from the source (imports inside functions count), as Graphviz DOT.

    python scripts/import_graph.py > graph.dot && dot -Tpng graph.dot -o docs/architecture.png
    python scripts/import_graph.py --modules      # one node per module instead of one per folder

tests/test_layout.py checks the same graph: no cycle, and each folder imports only what docs/architecture.md allows.
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "parallel_decoding"


def module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_modules(root: Path = REPO) -> dict[str, Path]:
    """Every module of the package under ``root``, by dotted name (a package is its ``__init__``)."""
    return {module_name(p, root): p for p in sorted((root / PACKAGE).rglob("*.py"))}


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package modules that module ``name`` imports anywhere in its file."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: climb from the importing module's package
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # a name defined in a module stands for that module
                target = target.rpartition(".")[0]
            if target.startswith(PACKAGE) and target != name:
                found.add(target)
    return found


def module_graph(root: Path = REPO) -> dict[str, set[str]]:
    modules = package_modules(root)
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def folder_of(module: str, root: Path = REPO) -> str:
    """The package folder a module lives in (``engine``, ``decoding``, ...), or the module itself at the top."""
    if module in COMMAND_LINES:
        return module
    parts = module.split(".")
    if len(parts) > 2 or (len(parts) == 2 and (root / PACKAGE / parts[1]).is_dir()):
        return parts[1]
    return ".".join(parts[1:]) or PACKAGE


COMMAND_LINES = ("generate.py", "eval.py")  # the thin CLIs beside the package


def folder_graph(root: Path = REPO) -> dict[str, set[str]]:
    """One node per folder of the package (and per top-level module, such as cli), plus the command lines."""
    graph: dict[str, set[str]] = {}
    modules = package_modules(root)
    edges_of = dict(module_graph(root))
    for script in COMMAND_LINES:
        if (root / script).is_file():
            edges_of[script] = imports_of(script, root / script, modules)
    for source, targets in edges_of.items():
        edges = graph.setdefault(folder_of(source, root), set())
        edges.update(folder_of(t, root) for t in targets)
    for folder, edges in graph.items():
        edges.discard(folder)
    return graph


def to_dot(graph: dict[str, set[str]], title: str) -> str:
    lines = [
        f'digraph "{title}" {{',
        "  rankdir=LR;",
        '  node [shape=box, fontname="Helvetica"];',
        f'  label="{title}"; labelloc=t;',
    ]
    for source in sorted(graph):
        lines.append(f'  "{source}";')
        lines += [f'  "{source}" -> "{target}";' for target in sorted(graph[source])]
    return "\n".join(lines + ["}"]) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", type=Path, default=REPO, help="a checkout holding parallel_decoding/")
    parser.add_argument("--modules", action="store_true", help="one node per module")
    parser.add_argument("--title", default="parallel_decoding imports")
    args = parser.parse_args(argv)
    graph = module_graph(args.root) if args.modules else folder_graph(args.root)
    sys.stdout.write(to_dot(graph, args.title))
    return 0


if __name__ == "__main__":
    sys.exit(main())
