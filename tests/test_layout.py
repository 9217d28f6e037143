"""The layout docs/architecture.md describes, held by the code: which folder may import which, no import cycle
(imports inside functions count), small functions, thin command lines."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
from import_graph import folder_of, module_graph  # noqa: E402  (scripts/ is not a package)

PACKAGE = REPO / "parallel_decoding"
MAX_FUNCTION_LINES = 80
MAX_CLI_LINES = 250

# What each folder of the package must not import (docs/architecture.md says why).
FORBIDDEN = {
    "decoding": ("engine", "runs", "evaluation", "tasks", "bench", "serve"),
    "engine": ("runs", "evaluation", "tasks", "bench", "serve"),
    "tasks": ("decoding", "engine", "runs", "evaluation", "bench", "serve"),
    "evaluation": ("decoding", "engine", "bench", "serve"),
    "runs": ("evaluation", "bench", "serve"),
    "serve": ("evaluation", "bench"),
    "integrations": ("runs", "evaluation", "tasks", "bench", "serve"),
}


def _graph() -> dict[str, set[str]]:
    return module_graph(REPO)


def _folder(module: str) -> str | None:
    folder = folder_of(module, REPO)
    return folder if (PACKAGE / folder).is_dir() else None


def test_no_import_cycle_counting_imports_inside_functions():
    graph = _graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(node, path):
        state[node] = 1
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                cycles.append(path[path.index(target) :] + [target])
            elif target not in state:
                visit(target, path + [target])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


@pytest.mark.parametrize("folder", sorted(FORBIDDEN))
def test_folder_imports_only_what_the_architecture_allows(folder):
    graph = _graph()
    wrong = sorted(
        f"{source} imports {target}"
        for source, targets in graph.items()
        if _folder(source) == folder
        for target in targets
        if _folder(target) in FORBIDDEN[folder]
    )
    assert not wrong, wrong


def test_the_package_root_imports_nothing_until_a_name_is_used():
    assert _graph()["parallel_decoding"] == set()


def test_no_package_function_is_longer_than_the_limit():
    long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, long


@pytest.mark.parametrize("cli", ["generate.py", "eval.py"])
def test_command_lines_are_thin(cli):
    lines = len((REPO / cli).read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_CLI_LINES, f"{cli} has {lines} lines"


def test_public_api_is_exported_from_the_package_root():
    import parallel_decoding

    for name in (
        "normal_decode",
        "parallel_decode",
        "decode_branches",
        "chat_prompt_ids",
        "build_prompt",
        "load_dataset",
        "GenerationConfig",
        "SkeletonLogitsProcessor",
        "MarkerVocab",
        "parse_skeleton",
    ):
        assert name in parallel_decoding.__all__ and callable(getattr(parallel_decoding, name)), name
