# Sourced by scripts/serve and scripts/test: make .venv (once) and install the project into it.
# Re-installs when pyproject.toml changed since the last install, or when the last install did
# not finish. A .venv that cannot run, runs an older Python, or was made for another checkout
# (copied, moved, or left by a failed first run) is rebuilt, and the script says so.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
extras="${1:-}"
python="${PYTHON:-python3}"

venv_problem() {
  # Prints why $venv is unusable (nothing when it is fine).
  [ -e "$venv" ] || return 0
  if [ ! -x "$venv/bin/python" ]; then
    echo "it has no runnable bin/python"
    return 0
  fi
  local prefix
  if ! prefix="$("$venv/bin/python" -c 'import sys; assert sys.version_info >= (3, 11), sys.version; print(sys.prefix)' 2>&1)"; then
    local detail="${prefix##*$'\n'}"
    echo "its Python does not run or is older than 3.11${detail:+ ($detail)}"
    return 0
  fi
  if [ "$(cd "$prefix" 2>/dev/null && pwd -P)" != "$(cd "$venv" && pwd -P)" ]; then
    echo "it belongs to another location ($prefix)"
  fi
}

problem="$(venv_problem)"
if [ -n "$problem" ]; then
  echo "scripts: $venv is unusable: $problem; rebuilding it" >&2
  rm -rf "$venv"
fi
if [ ! -x "$venv/bin/python" ]; then
  if ! "$python" -c 'import sys; assert sys.version_info >= (3, 11)' 2>/dev/null; then
    echo "scripts: $python is missing or older than 3.11; set PYTHON=/path/to/python3.11+" >&2
    exit 1
  fi
  "$python" -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --upgrade pip
fi
stamp="$venv/.installed${extras:+-$extras}"
if [ ! -f "$stamp" ] || [ "$root/pyproject.toml" -nt "$stamp" ]; then
  rm -f "$stamp"
  if ! "$venv/bin/python" -m pip install --quiet -e "$root${extras:+[$extras]}"; then
    echo "scripts: installing into $venv failed (see above); fix the cause and run again," \
      "or 'rm -rf $venv' to start over" >&2
    exit 1
  fi
  touch "$stamp"
fi
