#!/usr/bin/env bash
# One entry point for a fresh machine: finds Python >= 3.12, makes .venv, installs megahybrid, then
#   ./run.sh train [megahybrid train args]   - train the embedded default (CPU, no network)
#   ./run.sh test  [pytest args]             - the CPU test suite (what CI runs)
#   ./run.sh <any megahybrid subcommand>     - e.g. ./run.sh describe jamba
set -euo pipefail
cd "$(dirname "$0")"

find_python() {
  local c
  for c in python3.14 python3.13 python3.12 \
           "$(command -v pyenv >/dev/null 2>&1 && ls -d "$(pyenv root)"/versions/3.1[2-9]*/bin/python3 2>/dev/null | sort -V | tail -1)" \
           python3; do
    [ -n "$c" ] || continue
    if command -v "$c" >/dev/null 2>&1 && "$c" -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; then
      echo "$c"; return 0
    fi
  done
  echo "run.sh: no Python >= 3.12 found (megatron-core needs it); install python3.12 or pyenv's 3.12" >&2
  return 1
}

if [ ! -x .venv/bin/python ]; then
  py=$(find_python)
  echo "run.sh: creating .venv with $($py --version)"
  "$py" -m venv .venv
fi
stamp=.venv/.megahybrid-installed
want=$(sha256sum pyproject.toml | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "run.sh: installing megahybrid and its dependencies into .venv (torch is ~3 GB the first time)"
  .venv/bin/python -m pip install -q --upgrade pip >/dev/null
  .venv/bin/python -m pip install -q -e '.[dev]'
  echo "$want" > "$stamp"
fi

cmd=${1:-train}
[ $# -gt 0 ] && shift
case "$cmd" in
  test)
    set +e
    .venv/bin/python -m pytest tests -q -p no:cacheprovider "$@"
    rc=$?
    set -e
    # pytest exits 5 when it collected no tests: that is a failure for CI, say so plainly.
    [ $rc -eq 5 ] && echo "run.sh: pytest collected no tests" >&2
    exit $rc ;;
  *)
    exec .venv/bin/megahybrid "$cmd" "$@" ;;
esac
