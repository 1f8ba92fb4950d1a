#!/bin/busybox sh
# /init of the arm64 guests of `cargo xtask kernels`: busybox only. The shares (read-only)
# and the results share (read-write, cache=none) are mounted at their host paths; /tmp is a
# tmpfs; tracefs, debugfs, bpffs and cgroup2 are mounted. Runs RESULTS/cmd.sh with busybox sh,
# its output to RESULTS/output.log, writes its exit status to RESULTS/rc and powers off.
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc; mount -t sysfs sysfs /sys; mount -t devtmpfs devtmpfs /dev
for m in $(cat /mods/list); do insmod /mods/$m || echo "init: insmod $m failed"; done
RD=; SHARES=
for w in $(cat /proc/cmdline); do
  case $w in vt.dir=*) RD=${w#vt.dir=};; vt.shares=*) SHARES=${w#vt.shares=};; esac
done
fail() { echo "init: $*"; poweroff -f; sleep 5; echo o > /proc/sysrq-trigger; }
O=trans=virtio,version=9p2000.L,msize=262144
i=0
for s in $(echo "$SHARES" | tr ',' ' '); do
  mkdir -p $s && mount -t 9p -o $O,ro,cache=loose share$i $s || fail "cannot mount share $s"
  i=$((i+1))
done
mkdir -p $RD && mount -t 9p -o $O,cache=none results $RD || fail "cannot mount the results share on $RD"
mount -t tmpfs tmpfs /tmp; mount -t tmpfs tmpfs /run
mkdir -p /dev/pts /dev/shm; mount -t devpts devpts /dev/pts; mount -t tmpfs tmpfs /dev/shm
mount -t tracefs tracefs /sys/kernel/tracing 2>/dev/null
mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null
mount -t bpf bpf /sys/fs/bpf 2>/dev/null
mount -t cgroup2 cgroup2 /sys/fs/cgroup 2>/dev/null
ip link set lo up 2>/dev/null
hostname vmatrace-guest
echo "init: kernel $(uname -r) up at $(cut -d' ' -f1 /proc/uptime)s"
sh $RD/cmd.sh > $RD/output.log 2>&1 < /dev/null
echo $? > $RD/rc
sync
poweroff -f
sleep 5; echo o > /proc/sysrq-trigger
