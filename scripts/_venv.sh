# Sourced by scripts/*: make sure .venv exists with the project installed with every extra (ALL_EXTRAS).
# One install serves every script, so running one after another never reinstalls; it is redone only when
# pyproject.toml changes.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PYTHON="${PYTHON:-python3}"
ALL_EXTRAS="dev,ray"  # every extra in pyproject.toml (dev already pulls in ray); a new extra is added here
stamp="$VENV/.installed-$(cat "$ROOT/pyproject.toml" | sha1sum | cut -c1-12)-$ALL_EXTRAS"
if [ ! -f "$stamp" ]; then
  [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  "$VENV/bin/python" -m pip install --quiet -e "$ROOT[$ALL_EXTRAS]"
  "$VENV/bin/python" -m pip check
  rm -f "$VENV"/.installed-*
  touch "$stamp"
fi
