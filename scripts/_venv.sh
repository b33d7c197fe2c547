# Shared by scripts/*: creates .venv (Python >= 3.11) and installs acall with the given
# dependency groups. Re-running is cheap: pip skips what is already satisfied.
acall_venv() {
  local py=""
  for cand in "${PYTHON:-}" python3.13 python3.12 python3.11 python3; do
    [ -n "$cand" ] || continue
    if command -v "$cand" >/dev/null 2>&1 &&
      "$cand" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
      py="$cand"; break
    fi
  done
  [ -n "$py" ] || { echo "acall needs Python >= 3.11; none found on PATH" >&2; exit 1; }
  if [ ! -x .venv/bin/python ]; then
    echo "==> creating .venv with $("$py" --version)"
    "$py" -m venv .venv
  fi
  .venv/bin/python -m pip install -q --upgrade "pip>=25.1"
  local groups=()
  for g in "$@"; do groups+=(--group "$g"); done
  .venv/bin/python -m pip install -q -e ".[redis,zstd]" "${groups[@]}"
}
