#!/bin/busybox sh
# /init of the x86_64 guests of `cargo xtask kernels`: the host's root (read-only, 9p) becomes
# the guest's root with fresh /proc, /sys, /dev, /tmp (tmpfs), tracefs, debugfs, bpffs and
# cgroup2; the results share (read-write, cache=none) is mounted at its host path. Runs
# RESULTS/cmd.sh with bash from the host root, its output on the second serial port, writes
# its exit status to RESULTS/rc and powers off.
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc; mount -t sysfs sysfs /sys; mount -t devtmpfs devtmpfs /dev
for m in $(cat /mods/list); do insmod /mods/$m || echo "init: insmod $m failed"; done
RD=
for w in $(cat /proc/cmdline); do case $w in vt.dir=*) RD=${w#vt.dir=};; esac; done
fail() { echo "init: $*"; poweroff -f; sleep 5; echo o > /proc/sysrq-trigger; }
O=trans=virtio,version=9p2000.L,msize=262144
N=/newroot
mount -t 9p -o $O,ro,cache=loose hostroot $N || fail "cannot mount the host root over 9p"
mount -t 9p -o $O,cache=none results $N$RD || fail "cannot mount the results share on $RD"
mount -t proc proc $N/proc
mount -t sysfs sysfs $N/sys
mount -t devtmpfs devtmpfs $N/dev
mkdir -p $N/dev/pts $N/dev/shm
mount -t devpts devpts $N/dev/pts
mount -t tmpfs tmpfs $N/dev/shm
mount -t tmpfs tmpfs $N/run
mount -t tmpfs tmpfs $N/tmp
[ -d $N/var/tmp ] && mount -t tmpfs tmpfs $N/var/tmp
mount -t tracefs tracefs $N/sys/kernel/tracing 2>/dev/null
mount -t debugfs debugfs $N/sys/kernel/debug 2>/dev/null
mount -t bpf bpf $N/sys/fs/bpf 2>/dev/null
mount -t cgroup2 cgroup2 $N/sys/fs/cgroup 2>/dev/null
ip link set lo up 2>/dev/null
hostname vmatrace-guest
echo "init: kernel $(uname -r) up at $(cut -d' ' -f1 /proc/uptime)s"
stty -F /dev/ttyS1 raw -echo 2>/dev/null
chroot $N /bin/bash $RD/cmd.sh > /dev/ttyS1 2>&1 < /dev/null
echo $? > $N$RD/rc
sync
poweroff -f
sleep 5; echo o > /proc/sysrq-trigger
