"""shardline installs as one import namespace, and its layers point one way.

The folders at the top of the repository (kernels/, engine/, ...) install as
`shardline.kernels`, `shardline.engine`, ... (setuptools package-dir). import-linter's
graph builder walks the directory of the package it is given, so the contracts run
over a view of the installed layout: `shardline/` with each folder linked in under
its subpackage name. tests/wheel_smoke.py installs the built wheel into a fresh
venv (it needs the package index, so .ci/run runs it before the network goes).
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.wheel_smoke import build_wheel

ROOT = Path(__file__).resolve().parent.parent
SUBPACKAGES = ("kernels", "engine", "deployments", "cluster", "autoscaling")
BIN = Path(sys.executable).parent


def stage_installed_layout(dest: Path, extra: dict[str, str] | None = None) -> Path:
    """`dest/shardline/` laid out as the wheel installs it, out of links to the repository.

    `extra` maps a path inside the package ("cluster/_probe.py") to source text: that
    subpackage is then a real folder of links plus the extra file.
    """
    pkg = dest / "shardline"
    pkg.mkdir(parents=True)
    for f in (ROOT / "shardline").glob("*.py"):
        (pkg / f.name).symlink_to(f)
    extra = extra or {}
    for name in SUBPACKAGES:
        added = {k.split("/", 1)[1]: v for k, v in extra.items() if k.split("/", 1)[0] == name}
        if not added:
            (pkg / name).symlink_to(ROOT / name, target_is_directory=True)
            continue
        (pkg / name).mkdir()
        for f in (ROOT / name).glob("*.py"):
            (pkg / name / f.name).symlink_to(f)
        for rel, text in added.items():
            (pkg / name / rel).write_text(text)
    return dest


def lint_imports(staged: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "lint-imports"), str(ROOT / "pyproject.toml"), "--no-cache"],
        cwd=staged,  # lint-imports puts its working directory first on sys.path
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_import_contracts_hold(tmp_path):
    done = lint_imports(stage_installed_layout(tmp_path))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "3 kept, 0 broken" in done.stdout


@pytest.mark.parametrize(
    ("path", "source", "contract"),
    [
        ("cluster/_probe.py", "from shardline.deployments import config\n", "Layers"),
        ("kernels/_probe.py", "from shardline.engine import llm\n", "Layers"),
        ("engine/_probe.py", "import ray\n", "never import ray"),
        ("autoscaling/_probe.py", "import torch\n", "plain Python"),
    ],
)
def test_import_contracts_catch_a_break(tmp_path, path, source, contract):
    """The same run fails, naming the contract, when one module imports across a layer."""
    done = lint_imports(stage_installed_layout(tmp_path, {path: source}))
    assert done.returncode != 0
    broken = [line for line in done.stdout.splitlines() if line.endswith("BROKEN")]
    assert len(broken) == 1 and contract in broken[0], done.stdout[-3000:]


def test_wheel_installs_only_the_shardline_namespace(tmp_path):
    """Nothing but `shardline` and its dist-info go into site-packages; data files and the
    launcher entry point travel with it."""
    wheel = build_wheel(tmp_path)
    names = zipfile.ZipFile(wheel).namelist()
    dist_info = next(n.split("/")[0] for n in names if n.split("/")[0].endswith(".dist-info"))
    assert {n.split("/")[0] for n in names} == {"shardline", dist_info}
    for sub in SUBPACKAGES:
        assert f"shardline/{sub}/__init__.py" in names
    assert "shardline/kernels/csrc/cpu_kernels.c" in names
    assert any(n.startswith("shardline/autoscaling/calibrations/") and n.endswith(".json") for n in names)
    meta = zipfile.ZipFile(wheel).read(f"{dist_info}/entry_points.txt").decode()
    assert "shardline = shardline.cli:main" in meta
    assert "ray = shardline.deployments.tensor_parallel:ray_launcher" in meta


def test_hugging_face_kernels_is_not_shadowed():
    """transformers (5.25+) imports Hugging Face's top-level `kernels`; the repository's kernels/
    folder must never stand in for it, in the suite or anywhere else."""
    spec = importlib.util.find_spec("kernels")
    assert spec is not None, "the lock installs Hugging Face's kernels with transformers"
    assert Path(spec.origin).resolve().parent != ROOT / "kernels", spec.origin
    from kernels import get_kernel  # noqa: F401  (the name transformers asks for)
    from transformers.integrations import hub_kernels  # noqa: F401
