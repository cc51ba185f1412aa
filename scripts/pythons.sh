# Sourced by scripts/dist.sh and scripts/pymatrix.sh: where the supported interpreters are, and
# PATHs without compilers.
#
#   python_for 3.10      -> the path of a CPython 3.10 (pyenv's, else python3.10 on PATH), or fails
#   path_without DIR PATTERN...  -> DIR holds links to every program in /usr/bin and /usr/sbin
#                          whose name matches none of the glob PATTERNs (a PATH without them)
SUPPORTED_PYTHONS=(3.10 3.11 3.12 3.13)

python_for() {
    local v=$1 root=${PYENV_ROOT:-$HOME/.pyenv} p
    for p in "$root"/versions/"$v".*/bin/python"$v"; do
        [ -x "$p" ] && { echo "$p"; return 0; }
    done
    p=$(command -v "python$v" 2>/dev/null) && [ -x "$p" ] && { echo "$p"; return 0; }
    echo "no CPython $v: install it (pyenv install $v, or apt-get install python$v python$v-venv)" >&2
    return 1
}

path_without() {
    local dir=$1 f name pat skip
    shift
    rm -rf "$dir"
    mkdir -p "$dir"
    for f in /usr/bin/* /usr/sbin/*; do
        name=${f##*/}
        skip=
        for pat in "$@"; do
            # shellcheck disable=SC2254
            case $name in $pat) skip=1; break ;; esac
        done
        [ -n "$skip" ] || [ -e "$dir/$name" ] || ln -s "$f" "$dir/$name"
    done
}

# Compilers and toolchains, for path_without: what "no compiler on PATH" leaves out.
NO_COMPILERS=('cc' 'c89*' 'c99*' 'gcc*' 'g++*' 'c++*' 'cpp*' 'clang*' 'llvm*' 'tcc' '*-linux-gnu-*' 'ld' 'ld.*' 'as')
NO_CLANG=('clang*' 'llvm*')

# The file that exports an interpreter's C API: its libpython, or the executable itself where
# Python was built without --enable-shared.
libpython_of() {
    "$1" -c 'import os, sys, sysconfig as s
shared = s.get_config_var("Py_ENABLE_SHARED")
print(os.path.join(s.get_config_var("LIBDIR"), s.get_config_var("INSTSONAME")) if shared else os.path.realpath(sys.executable))'
}
