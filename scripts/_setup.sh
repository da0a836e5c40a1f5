# Shared by scripts/demo and scripts/test: a virtualenv with the project installed, and the
# browser assets the broker serves.
# Safe to run twice: it only reinstalls when pyproject.toml changed.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${SCANONCE_VENV:-$ROOT/.venv}"
EXTRAS="${1:-}"

need_root() { if [ "$(id -u)" -ne 0 ]; then echo sudo; fi; }

if ! command -v python3 >/dev/null; then
  echo "python3 (3.11+) is required" >&2; exit 1
fi
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
STAMP="$VENV/.scanonce-installed${EXTRAS:+-$EXTRAS}"
WANT="$(sha256sum "$ROOT/pyproject.toml" | cut -d' ' -f1)"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
  "$VENV/bin/python" -m pip install -q --upgrade pip
  if [ -n "$EXTRAS" ]; then
    "$VENV/bin/python" -m pip install -q -e "$ROOT[$EXTRAS]"
  else
    "$VENV/bin/python" -m pip install -q -e "$ROOT"
  fi
  echo "$WANT" > "$STAMP"
fi
export PATH="$VENV/bin:$PATH"

# The browser assets the broker serves (the OHIF Viewer, Swagger UI): pinned npm packages whose
# sha256 is checked (broker/web/assets.lock), unpacked under .cache/web (or $SCANONCE_VIEWER_DIR).
if ! command -v npm >/dev/null; then
  SUDO="$(need_root)"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq npm >/dev/null
fi
"$VENV/bin/scanonce" web install
