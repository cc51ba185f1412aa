#!/bin/busybox sh
# PID 1 of the vmtest VM (scripts/vmtest.sh): a 9p + overlay root made of the
# host's /, cgroup v2 with the memory controller, then the command in
# <repo>/.vmtest/run/cmd; its exit code goes to <repo>/.vmtest/run/rc.
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci netfs fscache \
         9pnet 9pnet_virtio 9p overlay; do
    [ -f /lib/modules/$m.ko ] || continue  # built into this kernel
    insmod /lib/modules/$m.ko || echo "vm-init: insmod $m failed"
done
ip link set lo up 2>/dev/null || echo "vm-init: no loopback"  # tests talk to the agent's HTTP on 127.0.0.1
REPO=$(sed -n 's/.*rtml_repo=\([^ ]*\).*/\1/p' /proc/cmdline)

mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=524288,cache=loose hostroot /host
mount -t tmpfs -o size=1g tmpfs /rw
mkdir -p /rw/upper /rw/work
mount -t overlay overlay -o lowerdir=/host,upperdir=/rw/upper,workdir=/rw/work /newroot
mount -t proc proc /newroot/proc
mount -t sysfs sys /newroot/sys
mount -t devtmpfs dev /newroot/dev
mount -t tmpfs tmpfs /newroot/tmp
mount -t tmpfs tmpfs /newroot/run
# The repo, read-write, after /tmp so that a clone under /tmp is not hidden by it;
# cache=loose so that reads fill the page cache (the working-set test).
mkdir -p "/newroot$REPO"
mount -t 9p -o trans=virtio,version=9p2000.L,msize=524288,cache=loose repo "/newroot$REPO"
mount -t cgroup2 cgroup2 /newroot/sys/fs/cgroup
echo +memory > /newroot/sys/fs/cgroup/cgroup.subtree_control
mount -t bpf bpf /newroot/sys/fs/bpf
mount -t tracefs tracefs /newroot/sys/kernel/tracing 2>/dev/null
echo "vm-init: $(uname -r), cgroup2 controllers: $(cat /newroot/sys/fs/cgroup/cgroup.controllers)"

chroot /newroot /bin/sh "$REPO/.vmtest/run/cmd"
echo $? > "/newroot$REPO/.vmtest/run/rc"
sync
poweroff -f
