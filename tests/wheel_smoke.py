"""Install shardline as a user does and use it from outside the repository.

    .venv/bin/python tests/wheel_smoke.py        (`make check-wheel`; .ci/run runs it)

Builds the wheel, installs it (not editable) with the lock into a fresh venv,
builds a tiny random model with the development venv, then from a scratch
directory runs `shardline --help`, `from shardline import LLM, SamplingParams`,
an offline generation through the API and one through `shardline generate`,
and checks that none of the repository's folders is importable there under
its own top-level name. It needs the package index (the fresh venv installs
from it), so it runs before .ci/run takes the network away; pytest does not
collect it.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.append(str(ROOT))  # last: never shadows an installed package

from tests.models import make_model  # noqa: E402

GENERATE = """
from shardline import LLM, SamplingParams
import shardline, sys
assert "/site-packages/shardline/" in shardline.__file__, shardline.__file__
with LLM(sys.argv[1], num_kv_blocks=32) as llm:
    out = llm.generate({"prompt_token_ids": [1, 2, 3]}, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)
assert len(out[0].outputs[0].token_ids) == 4
print("generated", out[0].outputs[0].token_ids)
"""

OLD_NAMES = """
import importlib.util
taken = [n for n in ("engine", "kernels", "deployments", "cluster", "autoscaling") if importlib.util.find_spec(n)]
assert not taken, f"top-level names installed beside shardline: {taken}"
"""


def build_wheel(dest: Path) -> Path:
    """Build the wheel from a copy of the files git would commit (tracked, or new and not
    ignored), so that nothing but them goes in and setuptools' build/ stays out of the tree."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT, capture_output=True, check=True,
    ).stdout.decode().split("\0")
    src = dest / "src"
    for rel in filter(None, listed):
        if (ROOT / rel).is_file():
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, src / rel)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dest), str(src)],
        check=True, capture_output=True, timeout=300,
    )
    (wheel,) = dest.glob("shardline-*.whl")
    return wheel


def step(what: str, cmd: list[str], cwd: Path) -> str:
    """Run one check; print what it was and how long it took; stop at the first failure."""
    started = time.perf_counter()
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=1200)
    took = time.perf_counter() - started
    if done.returncode != 0:
        print(f"wheel smoke: FAILED {what} ({took:.1f} s)\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}", file=sys.stderr)
        raise SystemExit(1)
    print(f"wheel smoke: {what} ({took:.1f} s)", flush=True)
    return done.stdout


def main() -> int:
    lock = ROOT / "requirements.lock"
    with tempfile.TemporaryDirectory(prefix="shardline-wheel-") as tmp:
        scratch = Path(tmp)
        wheels, venv, model = scratch / "wheels", scratch / "venv", scratch / "model"
        wheels.mkdir()
        wheel = build_wheel(wheels)
        print(f"wheel smoke: built {wheel.name}", flush=True)
        step("create a fresh venv", [sys.executable, "-m", "venv", str(venv)], scratch)
        py = str(venv / "bin" / "python")
        pip = [py, "-m", "pip", "install", "-q", "--disable-pip-version-check", "-c", str(lock)]
        step("install torch with the lock", [*pip, "torch==2.13.0"], scratch)
        step(f"install {wheel.name}[serve] with the lock", [*pip, f"{wheel}[serve]"], scratch)
        make_model(model, num_layers=1, vocab_size=256)
        help_text = step("shardline --help", [str(venv / "bin" / "shardline"), "--help"], scratch)
        for command in ("pull", "generate", "serve", "status", "capacity"):
            assert command in help_text, f"`shardline --help` does not list {command}"
        step("no top-level engine, kernels, ...", [py, "-c", OLD_NAMES], scratch)
        print(step("LLM.generate on a tiny model", [py, "-c", GENERATE, str(model)], scratch).strip())
        step(
            "shardline generate",
            [str(venv / "bin" / "shardline"), "generate", "-q", "--model", str(model), "--max-tokens", "3", "hello"],
            scratch,
        )
    print("wheel smoke: ok")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
