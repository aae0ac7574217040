# Sourced by scripts/test, scripts/run and bench/run_all: `bootstrap VAR...` builds the cached
# environment (once) and sets the array `paths` to the values asked for, in order. The bootstrap
# writes only those values to standard output; its progress and errors go to standard error.
bootstrap() {
    local boot="${PYTHON_BOOT:-python3.11}" out
    if ! command -v "$boot" >/dev/null; then
        echo "$0: $boot was not found. Install Python 3.11, or set PYTHON_BOOT to a Python 3.11 interpreter." >&2
        exit 1
    fi
    local args=()
    for name in "$@"; do args+=(--print "$name"); done
    # "end" keeps a trailing empty value (no chromium) from being dropped with the final newlines.
    out="$("$boot" scripts/bootstrap.py "${args[@]}" && echo end)" || exit $?
    mapfile -t paths <<<"${out%end}"
    unset 'paths[-1]'  # the empty line left where "end" was
    if (( ${#paths[@]} != $# )); then
        echo "$0: the bootstrap printed ${#paths[@]} lines for $# values ($*):" >&2
        printf '  %s\n' "${paths[@]}" >&2
        exit 1
    fi
}
