#!/usr/bin/env bash
# make pymatrix: the tests on every supported Python (3.10-3.13), each in its own virtualenv
# (.matrix/py3.X), with the one abi3 wheel of this tree installed (built here, into .matrix/wheel):
#   - the tests not marked root, on each version (tests/root/ left out as a whole: some of its
#     modules mark their tests needs_bpf/needs_cgroups without root);
#   - the root/eBPF smoke tests (ROOT_SMOKE below) on the oldest and the newest.
# Tests run from .matrix/py3.X, so the package comes from the virtualenv, not from the tree.
# As root, a skipped test fails the run (as in .ci/run); so does a run that collected no test
# (pytest's exit code 5). One run at a time (no parallelism): the machine is shared.
#
#   scripts/pymatrix.sh [VERSION...]        (default: 3.10 3.11 3.12 3.13)
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
# shellcheck source=scripts/pythons.sh
. scripts/pythons.sh
M=$REPO/.matrix
ROOT_SMOKE=(
    tests/root/test_hot_path.py
    "tests/root/test_real_cgroups.py::test_ebpf_limiter_flips_with_small_overshoot"
    "tests/root/test_real_cgroups.py::test_parent_limit_is_the_effective_limit"
    "tests/root/test_real_cgroups.py::test_a_kept_ebpf_check_keeps_watching"
)
versions=("$@")
((${#versions[@]})) || versions=("${SUPPORTED_PYTHONS[@]}")
smoke_on=("${SUPPORTED_PYTHONS[0]}" "${SUPPORTED_PYTHONS[-1]}")
log() { echo "pymatrix: $*" >&2; }
start=$SECONDS
mkdir -p "$M"

# One wheel for every version: the point of the abi3 build.
rm -rf "$M/wheel"
builder=$(python_for 3.11)
[ -x .venv/bin/python ] && builder=.venv/bin/python
LDSHARED="${CC:-cc} -shared" "$builder" -m pip wheel -q --no-deps -w "$M/wheel" . >"$M/wheel.log" 2>&1 \
    || { tail -30 "$M/wheel.log" >&2; log "FAILED: building the wheel"; exit 1; }
wheel=$(ls "$M"/wheel/rtml_ebpf-*-cp310-abi3-*.whl)
log "wheel: ${wheel##*/} ($((SECONDS - start)) s)"

# run_pytest NAME VENV ARGS...: pytest from VENV's directory; fails on errors, on no tests, and
# as root on any skip.
run_pytest() {
    local name=$1 venv=$2 report rc t0=$SECONDS
    shift 2
    report=$venv/junit-$name.xml
    rc=0
    (cd "$venv" && env -u PYTHONPATH "$venv/bin/python" -m pytest -c "$REPO/pyproject.toml" --rootdir "$REPO" \
        -p no:cacheprovider -q -rs --junitxml="$report" "$@") || rc=$?
    if [ "$rc" = 5 ]; then
        log "FAILED: $name on ${venv##*/}: pytest collected no test"
        return 1
    elif [ "$rc" != 0 ]; then
        log "FAILED: $name on ${venv##*/}: pytest exit $rc"
        return 1
    fi
    if [ "$(id -u)" = 0 ]; then
        local skipped
        skipped=$(python3 "$REPO/scripts/junit_skips.py" "$report")
        if [ -n "$skipped" ]; then
            log "FAILED: $name on ${venv##*/}: running as root, yet these tests were skipped:"
            echo "$skipped" >&2
            return 1
        fi
    fi
    log "$name on ${venv##*/}: passed in $((SECONDS - t0)) s"
}

failed=()
for v in "${versions[@]}"; do
    t0=$SECONDS
    venv=$M/py$v
    py=$(python_for "$v")
    [ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
    "$venv/bin/python" -m pip install -q --no-compile "$wheel[test]" >"$venv/install.log" 2>&1 \
        && "$venv/bin/python" -m pip install -q --no-compile --force-reinstall --no-deps "$wheel" \
            >>"$venv/install.log" 2>&1 \
        || { tail -20 "$venv/install.log" >&2; failed+=("$v install"); continue; }
    log "py$v: installed in $((SECONDS - t0)) s"
    run_pytest no-root "$venv" "$REPO/tests" -m "not root" --ignore "$REPO/tests/root" || failed+=("$v no-root")
    if [[ " ${smoke_on[*]} " == *" $v "* ]]; then
        run_pytest root-smoke "$venv" "${ROOT_SMOKE[@]/#/$REPO/}" || failed+=("$v root-smoke")
    fi
done
if ((${#failed[@]})); then
    log "FAILED (${failed[*]}) after $((SECONDS - start)) s"
    exit 1
fi
log "all passed on ${versions[*]} in $((SECONDS - start)) s"
