#!/usr/bin/env bash
# Build an offline bundle: every wheel segnode needs (with the deep-learning extra) plus the
# imported model weights, for a node that has no network.  Run on a connected machine with the
# same OS, CPU architecture and Python minor version as the target.
#
#   deploy/build-wheelhouse.sh [OUT_DIR] [cpu|cuda]
#
# OUT_DIR (default dist/segnode-offline) receives:
#   wheelhouse/            segnode's own wheel and every dependency, pinned as installed
#   weights/               a copy of $SEGNODE_WEIGHTS_DIR (segnode models import …), if present
#   SHA256SUMS             hashes of every file above
#   install.sh             the installer to run on the target (see deploy/offline-install.md)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-dist/segnode-offline}
FLAVOUR=${2:-cpu}
PY=${PYTHON:-python3}

case "$FLAVOUR" in
  cpu)  TORCH_INDEX=(--extra-index-url https://download.pytorch.org/whl/cpu) ;;
  cuda) TORCH_INDEX=() ;;
  *) echo "flavour must be cpu or cuda" >&2; exit 2 ;;
esac

rm -rf "$OUT" && mkdir -p "$OUT/wheelhouse"
"$PY" -m pip wheel --wheel-dir "$OUT/wheelhouse" "${TORCH_INDEX[@]}" '.[dl]'

WEIGHTS=${SEGNODE_WEIGHTS_DIR:-$HOME/.local/share/segnode/weights}
if [ -d "$WEIGHTS" ]; then
  cp -a "$WEIGHTS" "$OUT/weights"
else
  echo "note: no weights directory at $WEIGHTS; the bundle has the hu_based backend only" >&2
fi

cat > "$OUT/install.sh" <<'INSTALL'
#!/usr/bin/env bash
# Install segnode from this bundle without network: ./install.sh [PREFIX] (default /opt/segnode)
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
PREFIX=${1:-/opt/segnode}
(cd "$HERE" && sha256sum --quiet -c SHA256SUMS)
python3 -m venv "$PREFIX/.venv"
"$PREFIX/.venv/bin/pip" install --no-index --find-links "$HERE/wheelhouse" 'segnode[dl]'
if [ -d "$HERE/weights" ]; then
  mkdir -p "$PREFIX/weights" && cp -a "$HERE/weights/." "$PREFIX/weights/"
  SEGNODE_WEIGHTS_DIR="$PREFIX/weights" "$PREFIX/.venv/bin/segnode" models verify
fi
echo "installed in $PREFIX; next: deploy/segnode.service and docs/operators-guide.md"
INSTALL
chmod +x "$OUT/install.sh"

(cd "$OUT" && find wheelhouse weights -type f 2>/dev/null | sort | xargs sha256sum > SHA256SUMS)
echo "bundle in $OUT: $(ls "$OUT/wheelhouse" | wc -l) wheels, $(du -sh "$OUT" | cut -f1)"
