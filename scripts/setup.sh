#!/usr/bin/env bash
# Idempotent set-up for a fresh Debian 12 machine, as root: the build and run
# dependencies from apt, then .venv with the package and its dev extras.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PKGS=(clang llvm libbpf-dev libbpf1 bpftool strace)
missing=()
for p in "${APT_PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    if [ "$(id -u)" != 0 ]; then
        echo "setup: need root to apt-get install ${missing[*]}" >&2
        exit 1
    fi
    echo "setup: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${missing[@]}" >/dev/null
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv"
    "$PY" -m venv .venv
fi
# Reinstall when the sources of the build changed (BPF C, setup, deps).
stamp=.venv/.rtml-installed
if [ ! -f "$stamp" ] || [ -n "$(find bpf setup.py pyproject.toml rtml_ebpf/_hot.c -newer "$stamp" 2>/dev/null | head -1)" ] \
        || [ ! -f rtml_ebpf/bpf/rtml.bpf.o ]; then
    echo "setup: installing rtml-ebpf (editable) with dev extras; this builds _hot and, if bpf/ changed, the BPF object"
    # _hot is one abi3 module now (_hot.abi3.so); an older per-version build would shadow it.
    rm -f rtml_ebpf/_hot.cpython-*.so
    .venv/bin/python -m pip install -q --upgrade pip >/dev/null
    .venv/bin/python -m pip install -q -e '.[dev]'
    touch "$stamp"
fi
