#!/bin/sh
# SPDX-License-Identifier: GPL-2.0
#
# /init of the arm64 guest's initramfs (scripts/run-vm-arm64.sh builds it:
# busybox-static for arm64 at /bin/busybox, this script, /lsdefer.env). Runs
# under busybox sh. It mounts what the tests need (proc, sysfs, devtmpfs,
# devpts, tmpfs /tmp, debugfs, tracefs, bpffs, cgroup2), brings lo up, mounts
# the host's directories over 9p at their host paths (the repo and the build
# dir read-only, the run's output dir read-write, as vng shares them on
# x86_64), runs the same scripts/guest/run-tests.sh as the x86_64 guest, and
# powers off. A run that fails says so on the console; the host then finds no
# OUT/guest-done.
#
# /lsdefer.env: REPO OBJ OUT (host paths) and TESTS.
/bin/busybox mkdir -p /bin /sbin /usr/bin /usr/sbin
/bin/busybox --install -s /bin
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
REPO='' OBJ='' OUT='' TESTS=''
# shellcheck disable=SC1091
. /lsdefer.env

say() {
	echo "==> guest: $*"
}

mkdir -p /proc /sys /dev /tmp /run /mnt /root
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
mount -t debugfs debugfs /sys/kernel/debug
mount -t tracefs tracefs /sys/kernel/tracing
mount -t bpf bpf /sys/fs/bpf
mount -t cgroup2 cgroup2 /sys/fs/cgroup
ip link set dev lo up || say "ip link set dev lo up failed"
export HOME=/root

# tag:dir:options, one 9p share each (scripts/run-vm-arm64.sh's -fsdev).
ok=1
for share in "repo:$REPO:ro,cache=loose" "obj:$OBJ:ro,cache=loose" "out:$OUT:rw"; do
	tag=${share%%:*}
	rest=${share#*:}
	dir=${rest%%:*}
	opts=${rest#*:}
	mkdir -p "$dir"
	if ! mount -t 9p -o "trans=virtio,version=9p2000.L,msize=262144,$opts" "$tag" "$dir"; then
		say "mounting the host's $dir ($tag) failed"
		ok=0
	fi
done

if [ "$ok" = 1 ]; then
	cd /tmp || true
	rc=0
	# shellcheck disable=SC2086 # TESTS is one word or none
	sh "$REPO/scripts/guest/run-tests.sh" "$OUT" $TESTS || rc=$?
	say "run-tests.sh exit $rc"
	sync
	umount "$OUT" || true
fi
say "lsdefer-arm64-init: done"
sync
poweroff -f
