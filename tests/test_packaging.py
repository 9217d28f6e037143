"""The install: pyproject.toml agrees with requirements.txt, CI runs the README's install step, the README's Python
API block runs as written (taken from README.md here, so the two cannot drift), the package imports from anywhere."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text(encoding="utf-8")


def _requirement_lines(text: str) -> list:
    return [line.split("#")[0].strip() for line in text.splitlines() if line.split("#")[0].strip()]


def _normalized(requirement: str) -> str:
    return re.sub(r"\s+", "", requirement).replace("'", '"')


def test_pyproject_pins_are_requirements_txt():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    declared = project["dependencies"] + project["optional-dependencies"]["test"]
    pinned = _requirement_lines((REPO / "requirements.txt").read_text(encoding="utf-8"))
    assert sorted(map(_normalized, declared)) == sorted(map(_normalized, pinned))
    assert "torch>=2.4,<=2.13.0" in declared  # pip keeps the CPU build on disk here, and a user's CUDA build


def test_every_dependency_has_a_tested_upper_bound():
    tomllib = pytest.importorskip("tomllib")
    kernel = tomllib.loads((REPO / "flash-attention" / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    requirements = _requirement_lines((REPO / "requirements.txt").read_text(encoding="utf-8"))
    requirements += kernel["dependencies"] + [r for extra in kernel["optional-dependencies"].values() for r in extra]
    unbounded = [r for r in requirements if not re.search(r"<=?\s*[\d.]+", r.split(";")[0])]
    assert not unbounded, f"no upper bound: {unbounded}"


def test_ci_installs_into_fresh_virtual_environments():
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    assert ci.count('python3 -m venv "$work/$1"') == 1 and ci.count("\nfresh_venv ") == 2
    assert "python -m pip install -q torch==2.13.0\n" in ci  # the CPU build on disk, before anything pulls a CUDA one
    assert 'python -m pip install -q -e ".[test]" ./flash-attention "transformers==5.17.0"\n' in ci
    assert ci.count("python -m pytest -q\n") == 2 and "python generate.py --task retrieval\n" in ci


def test_ci_runs_the_readme_install_step():
    quick_start = re.search(r"## Quick start\n+```bash\n(.*?)```", README, re.S).group(1)
    install = quick_start.splitlines()[0].split(" && ")[0]
    assert install == 'pip install -e ".[test]" ./flash-attention'
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    assert f"python -m pip install -q {install.removeprefix('pip install ')}\n" in ci
    assert "python -m pytest -q\n" in ci and "python -m pytest -q" in quick_start


def test_gitignore_covers_a_virtual_environment():
    assert ".venv/" in (REPO / ".gitignore").read_text(encoding="utf-8").splitlines()


def test_readme_python_api_block_runs_as_written():
    section = README.split("## Python API", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert "build_prompt(" in code  # the block shows the task and format prompt, not a bare question
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "Answer format: steps that do not depend on each other form a parallel block." in proc.stdout
    assert re.search(r"^4 branches; fallback: None \d+ tokens in [\d.]+ s$", proc.stdout, re.M), proc.stdout
    assert "same answer as normal decoding:" in proc.stdout


def test_installed_package_imports_from_any_directory(tmp_path):
    # Asked outside the checkout: its own parallel_decoding.egg-info (left by a build) must not count as installed.
    probe = "import importlib.metadata as m; m.distribution('parallel-decoding')"
    if subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True).returncode != 0:
        pytest.skip('parallel_decoding is not pip-installed here (pip install -e ".[test]" ./flash-attention)')
    code = "import parallel_decoding, parallel_decoding.tasks.retrieval, parallel_decoding.runs.results; print('ok')"
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout == "ok\n", proc.stderr


def test_default_data_of_a_regular_install_is_the_working_directory(tmp_path):
    """A non-editable install has no data/ beside the package: the default dataset comes from ./data, so the
    commands work from the repo root (and say which file is missing elsewhere)."""
    import shutil

    site = tmp_path / "site-packages"
    shutil.copytree(REPO / "parallel_decoding", site / "parallel_decoding",
                    ignore=shutil.ignore_patterns("__pycache__"))
    code = (f"import sys; sys.path.insert(0, {str(site)!r})\n"
            "import parallel_decoding.tasks as t\n"
            "assert t.__file__.startswith(sys.path[0]), t.__file__\n"
            "print(t.default_data_path('retrieval'), len(t.load_dataset('retrieval', t.default_data_path('retrieval'))))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"{REPO / 'data' / 'retrieval_4.jsonl'} 50\n"
