#!/usr/bin/env bash
# Runs the `vm` pytest subset inside a VM on Debian's 6.1 kernel with cgroup v2:
# the kernel before the memcg tracepoints (6.13), the cgroup layout most
# production nodes use. qemu under software emulation (TCG); the host's / is
# shared read-only over 9p under a tmpfs overlay, so the host's Python and this
# repo's .venv run unchanged inside; the repo is shared read-write to bring
# the result back. Exit code: pytest's inside the VM.
#
#   scripts/vmtest.sh [pytest args...]      (default: -m vm)
#
# Cache: .vmtest/ (kernel package, extracted kernel and modules, initramfs).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
CACHE=$REPO/.vmtest
mkdir -p "$CACHE"
TIMEOUT=${VMTEST_TIMEOUT:-600}

log() { echo "vmtest: $*" >&2; }

# -- tools ----------------------------------------------------------------------------------
need=()
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
[ -x /bin/busybox ] && /bin/busybox --list 2>/dev/null | grep -qx insmod || need+=(busybox-static)
if ((${#need[@]})); then
    log "installing ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${need[@]}" >/dev/null
fi

# -- kernel: Debian's current 6.1 package, not installed on the host, only unpacked here -----
if [ ! -f "$CACHE/kernel.ok" ]; then
    pkg=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-6\.1/ {print $2; exit}')
    if [ -z "$pkg" ]; then
        apt-get update -qq
        pkg=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-6\.1/ {print $2; exit}')
    fi
    [ -n "$pkg" ] || { log "cannot resolve the 6.1 kernel package from linux-image-amd64"; exit 1; }
    log "fetching $pkg"
    rm -rf "$CACHE/pkg" "$CACHE/root"
    mkdir -p "$CACHE/pkg" "$CACHE/root"
    (cd "$CACHE/pkg" && apt-get download -q "$pkg" >/dev/null 2>&1)
    dpkg-deb --fsys-tarfile "$CACHE"/pkg/*.deb | tar -x -C "$CACHE/root" \
        --wildcards './boot/vmlinuz-*' './lib/modules/*/kernel/drivers/virtio/*' './lib/modules/*/kernel/fs/9p/*' \
        './lib/modules/*/kernel/fs/fscache/*' './lib/modules/*/kernel/fs/netfs/*' \
        './lib/modules/*/kernel/fs/overlayfs/*' './lib/modules/*/kernel/net/9p/*'
    rm -rf "$CACHE/pkg"
    # The raw vmlinux boots via PVH, ~5 s faster than the bzImage: it is the xz stream inside.
    python3 - "$CACHE"/root/boot/vmlinuz-* "$CACHE/vmlinux" <<'PY'
import lzma, sys
data = open(sys.argv[1], "rb").read()
start = data.find(b"\xfd7zXZ\x00")
if start < 0:
    sys.exit("no xz stream in the bzImage")
out = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(data[start:])
if out[:4] != b"\x7fELF":
    sys.exit("the xz stream is not an ELF vmlinux")
open(sys.argv[2], "wb").write(out)
PY
    touch "$CACHE/kernel.ok"
fi
KVER=$(ls "$CACHE/root/lib/modules")

# -- initramfs: busybox, the modules for a 9p/overlay root, our init -------------------------
INITRD=$CACHE/initramfs.cpio.gz
if [ ! -f "$INITRD" ] || [ scripts/vm-init.sh -nt "$INITRD" ] || [ scripts/mkcpio.py -nt "$INITRD" ]; then
    log "building the initramfs"
    work=$(mktemp -d)
    mkdir -p "$work"/{bin,proc,sys,dev,host,rw,newroot,lib/modules}
    cp /bin/busybox "$work/bin/busybox"
    for m in virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci netfs fscache \
             9pnet 9pnet_virtio 9p overlay; do
        f=$(find "$CACHE/root/lib/modules/$KVER" -name "$m.ko*" | head -1)
        [ -n "$f" ] || { log "module $m missing from the kernel package"; exit 1; }
        case "$f" in
            *.xz) xz -dc "$f" > "$work/lib/modules/$m.ko" ;;
            *) cp "$f" "$work/lib/modules/$m.ko" ;;
        esac
    done
    cp scripts/vm-init.sh "$work/init"
    chmod +x "$work/init"
    python3 scripts/mkcpio.py "$work" "$INITRD"
    rm -rf "$work"
fi

# -- run -----------------------------------------------------------------------------------
ARGS=("$@")
[ ${#ARGS[@]} -gt 0 ] || ARGS=(-m vm)
RUN=$CACHE/run
rm -rf "$RUN"
mkdir -p "$RUN"
{
    printf 'cd %q\n' "$REPO"
    printf 'export RTML_IN_VM=1 RTML_NO_SKIP=1 PYTHONDONTWRITEBYTECODE=1 PATH=%q HOME=/root\n' "$PATH"
    if [ -n "${VMTEST_CMD:-}" ]; then
        echo "$VMTEST_CMD"
    else
        printf '%q ' "$REPO/.venv/bin/python" -m pytest -p no:cacheprovider --color=no -o addopts=-ra tests "${ARGS[@]}"
        echo
    fi
} > "$RUN/cmd"

log "booting Linux $KVER (TCG, cgroup v2); timeout ${TIMEOUT}s"
t0=$(date +%s)
set +e
timeout --kill-after=10 "$TIMEOUT" qemu-system-x86_64 \
    -accel tcg -cpu max -smp 2 -m 2G -nographic -no-reboot -nodefaults -serial stdio \
    -kernel "$CACHE/vmlinux" -initrd "$INITRD" \
    -append "console=ttyS0 quiet loglevel=3 pci=noacpi panic=-1 rdinit=/init rtml_repo=$REPO" \
    -fsdev local,id=hostroot,path=/,security_model=none,readonly=on,multidevs=remap \
    -device virtio-9p-pci,fsdev=hostroot,mount_tag=hostroot \
    -fsdev local,id=repo,path="$REPO",security_model=none,multidevs=remap \
    -device virtio-9p-pci,fsdev=repo,mount_tag=repo \
    -device virtio-rng-pci
qemu_rc=$?
set -e
log "VM ran $(( $(date +%s) - t0 )) s (qemu exit $qemu_rc)"
if [ ! -f "$RUN/rc" ]; then
    log "no result from inside the VM (timed out or crashed)"
    exit 1
fi
rc=$(cat "$RUN/rc")
log "pytest inside the VM exited $rc"
exit "$rc"
