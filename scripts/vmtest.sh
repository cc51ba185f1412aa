#!/usr/bin/env bash
# Runs the `vm` pytest subset inside a VM on one of Debian's kernels with cgroup v2,
# the cgroup layout most production nodes use:
#
#   VMTEST_KERNEL=6.1        bookworm's 6.1 (the default): before mark_victim had its
#                            task pointer (6.8) and before the memcg tracepoints (6.13)
#   VMTEST_KERNEL=6.12       trixie's 6.12: the OOM hook, still no memcg tracepoints
#   VMTEST_KERNEL=backports  trixie-backports' current kernel (7.x): the memcg
#                            tracepoints, so the programs take the memcg-event path,
#                            which the host (cgroup v1) is the only other to exercise
#
# qemu under software emulation (TCG); the host's / is shared read-only over 9p under
# a tmpfs overlay, so the host's Python and this repo's .venv run unchanged inside; the
# repo is shared read-write to bring the result back. Exit code: pytest's inside the VM.
#
#   scripts/vmtest.sh [pytest args...]      (default: -m vm)
#
# The kernel packages come from deb.debian.org through a private apt configuration in
# the cache (the system's apt sources are neither read nor changed); they are unpacked
# here, never installed. Cache: .vmtest/<kernel>/ (apt lists, kernel, modules,
# initramfs); .vmtest/run/ is the one run at a time (vm-init.sh reads its command there).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
KERNEL=${VMTEST_KERNEL:-6.1}
TIMEOUT=${VMTEST_TIMEOUT:-600}
MIRROR=${VMTEST_MIRROR:-http://deb.debian.org}

log() { echo "vmtest: $*" >&2; }

case "$KERNEL" in
    6.1) SOURCES="deb $MIRROR/debian bookworm main
deb $MIRROR/debian bookworm-updates main
deb $MIRROR/debian-security bookworm-security main" ;;
    6.12) SOURCES="deb $MIRROR/debian trixie main
deb $MIRROR/debian trixie-updates main
deb $MIRROR/debian-security trixie-security main" ;;
    backports) SOURCES="deb $MIRROR/debian trixie-backports main" ;;
    *) log "VMTEST_KERNEL=$KERNEL: unknown kernel; use 6.1, 6.12 or backports"; exit 2 ;;
esac
CACHE=$REPO/.vmtest/$KERNEL
mkdir -p "$CACHE"

# -- tools ----------------------------------------------------------------------------------
need=()
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
[ -x /bin/busybox ] && /bin/busybox --list 2>/dev/null | grep -qx insmod || need+=(busybox-static)
command -v zstd >/dev/null || need+=(zstd)
if ((${#need[@]})); then
    log "installing ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${need[@]}" >/dev/null
fi

# -- kernel: the suite's current package, not installed on the host, only unpacked here -----
if [ ! -f "$CACHE/kernel.ok" ]; then
    apt_dir=$CACHE/apt
    mkdir -p "$apt_dir/lists/partial" "$apt_dir/cache/archives/partial"
    printf '%s\n' "$SOURCES" > "$apt_dir/sources.list"
    APT=(-o "Dir::Etc::SourceList=$apt_dir/sources.list" -o Dir::Etc::SourceParts=/dev/null
         -o "Dir::State::Lists=$apt_dir/lists" -o "Dir::Cache=$apt_dir/cache" -o APT::Sandbox::User=root)
    apt-get "${APT[@]}" update -qq
    # linux-image-amd64 -> linux-image-<ver>-amd64; from 7.x on, the image package is
    # itself a shell over linux-binary-<ver> (vmlinuz), linux-modules-<ver> and
    # linux-base-<ver> (modules.builtin).
    image=$(apt-cache "${APT[@]}" depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
    [ -n "$image" ] || { log "cannot resolve the kernel package from linux-image-amd64 ($KERNEL)"; exit 1; }
    ver=${image#linux-image-}
    pkgs=("$image")
    for p in "linux-base-$ver" "linux-binary-$ver" "linux-modules-$ver"; do
        apt-cache "${APT[@]}" depends "$image" | grep -q "Depends: $p\$" && pkgs+=("$p")
    done
    log "fetching ${pkgs[*]}"
    rm -rf "$CACHE/pkg" "$CACHE/root"
    mkdir -p "$CACHE/pkg" "$CACHE/root"
    (cd "$CACHE/pkg" && apt-get "${APT[@]}" download -q "${pkgs[@]}" >/dev/null)
    # Only what the VM needs: the kernel, modules.builtin and the modules for a 9p/overlay
    # root, with /usr/lib/modules (usr-merged packages) read as /lib/modules.
    for deb in "$CACHE"/pkg/*.deb; do
        dpkg-deb --fsys-tarfile "$deb" | python3 -c '
import re, sys, tarfile
keep = re.compile(r"(boot/vmlinuz-.*|lib/modules/[^/]+/(vmlinuz|modules\.builtin|kernel/(drivers/virtio|fs/9p|fs/fscache|fs/netfs|fs/overlayfs|net/9p)/.*))")
with tarfile.open(fileobj=sys.stdin.buffer, mode="r|") as tar:
    for m in tar:
        name = re.sub(r"^(\./)?(usr/)?", "", m.name)
        if m.isfile() and keep.fullmatch(name):
            m.name = name
            tar.extract(m, sys.argv[1], set_attrs=False)
' "$CACHE/root"
    done
    rm -rf "$CACHE/pkg"
    # The raw vmlinux boots via PVH, ~5 s faster than the bzImage: it is the compressed
    # payload the bzImage's setup header points at (xz for 6.1, zstd for later kernels).
    vmlinuz=
    for f in "$CACHE"/root/boot/vmlinuz-* "$CACHE"/root/lib/modules/*/vmlinuz; do
        [ -f "$f" ] && vmlinuz=$f
    done
    [ -n "$vmlinuz" ] || { log "no vmlinuz in ${pkgs[*]}"; exit 1; }
    python3 - "$vmlinuz" "$CACHE/vmlinux" <<'PY'
import lzma, struct, subprocess, sys
data = open(sys.argv[1], "rb").read()
setup_sects = data[0x1F1] or 4
offset, length = struct.unpack_from("<II", data, 0x248)
start = (setup_sects + 1) * 512 + offset
payload = data[start:start + length]
if payload.startswith(b"\xfd7zXZ\x00"):
    out = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(payload)
elif payload.startswith(b"\x28\xb5\x2f\xfd"):
    # The payload ends with the decompressed size (4 bytes), which zstd reads as a bad frame.
    out = subprocess.run(["zstd", "-dcq"], input=payload[:-4], stdout=subprocess.PIPE, check=True).stdout
else:
    sys.exit(f"unknown kernel compression (payload starts {payload[:6].hex()})")
if out[:4] != b"\x7fELF":
    sys.exit("the decompressed kernel is not an ELF vmlinux")
open(sys.argv[2], "wb").write(out)
PY
    rm -f "$vmlinuz"
    touch "$CACHE/kernel.ok"
fi
KVER=$(ls "$CACHE/root/lib/modules")

# -- initramfs: busybox, the modules for a 9p/overlay root, our init -------------------------
INITRD=$CACHE/initramfs.cpio.gz
if [ ! -f "$INITRD" ] || [ scripts/vm-init.sh -nt "$INITRD" ] || [ scripts/mkcpio.py -nt "$INITRD" ] \
        || [ scripts/vmtest.sh -nt "$INITRD" ]; then
    log "building the initramfs"
    work=$(mktemp -d)
    mkdir -p "$work"/{bin,proc,sys,dev,host,rw,newroot,lib/modules}
    cp /bin/busybox "$work/bin/busybox"
    builtin=()
    for m in virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci netfs fscache \
             9pnet 9pnet_virtio 9p overlay; do
        f=$(find "$CACHE/root/lib/modules/$KVER" -name "$m.ko*" | head -1)
        if [ -z "$f" ]; then
            # Later kernels build virtio in and fold fscache into netfs (6.8).
            if [ "$m" != fscache ] || [ ! -f "$work/lib/modules/netfs.ko" ]; then
                grep -qE "/$m\.ko\$" "$CACHE/root/lib/modules/$KVER/modules.builtin" \
                    || { log "module $m neither in the kernel package nor built in"; exit 1; }
            fi
            builtin+=("$m")
            continue
        fi
        case "$f" in
            *.xz) xz -dc "$f" > "$work/lib/modules/$m.ko" ;;
            *.zst) zstd -dcq "$f" > "$work/lib/modules/$m.ko" ;;
            *) cp "$f" "$work/lib/modules/$m.ko" ;;
        esac
    done
    # vm-init.sh insmods 6.1's list and reports each of these as failed: harmless here.
    ((${#builtin[@]} == 0)) || log "built into $KVER, no module to load: ${builtin[*]}"
    cp scripts/vm-init.sh "$work/init"
    chmod +x "$work/init"
    python3 scripts/mkcpio.py "$work" "$INITRD"
    rm -rf "$work"
fi

# -- run -----------------------------------------------------------------------------------
ARGS=("$@")
[ ${#ARGS[@]} -gt 0 ] || ARGS=(-m vm)
RUN=$REPO/.vmtest/run
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
