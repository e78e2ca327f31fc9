#!/bin/sh
# loft guest init: /init in the initramfs, /sbin/init (-> /init) on the ext4 root.
# Busybox-static user space. Contract (see firmware/README.md):
#   1. mount proc, sysfs, devtmpfs, tmpfs (/etc/fstab, one `mount -a`)
#   2. if the kernel cmdline has loft_boot_timer=PORT: write byte 0x02 to PORT
#      ("user space reached"; the patched kernel wrote 0x01 when it started init)
#   3. print GUEST-INIT-READY
#   4. print one "guest-info: key=value ..." line
#   5. run the optional command (words after " -- " on the cmdline = our argv,
#      else guest_cmd="..." from the cmdline, which the kernel puts in our env)
#   6. print GUEST-CMD-EXIT=<rc> (also after an `exit N` in the command), sync,
#      reboot -f (reboot=k: out 0x64 <- 0xfe)
#
# Cost model on a kvm_pvm host: a syscall is ~0.3 ms, but creating a process
# (fork/exec: page tables, page faults) costs far more, seconds when the host
# is busy. So: as few processes as possible (mount -a, dd, reboot; echo, printf,
# read, sync are shell builtins or run in-process), and small files are read
# with the `read` builtin (one syscall per byte, still cheaper than a `cat`).
export PATH=/bin:/sbin:/usr/bin:/usr/sbin

mount -a 2>/dev/null

read -r cmdline < /proc/cmdline

# --- boot timer: byte 0x02 = user space reached ---------------------------
boot_timer=off
case " $cmdline " in
*" loft_boot_timer="*)
	port=${cmdline#*loft_boot_timer=}
	port=${port%% *}
	case "$port" in
	'' | *[!0-9a-fA-FxX]*) echo "init: bad loft_boot_timer='$port', ignored" ;;
	*)
		boot_timer=$port
		# printf is a builtin: no process; dd is the only one spawned here.
		printf '\002' > /tmp/.loft-boot-timer
		dd if=/tmp/.loft-boot-timer of=/dev/port bs=1 seek=$((port)) count=1 conv=notrunc 2>/dev/null \
			|| echo "init: boot-timer write to /dev/port failed"
		;;
	esac
	;;
esac

# --- guest agent: loft_agent=PORT on the kernel command line --------------
# /sbin/loft-agent (firmware/build-agent.sh) runs the host's commands, vsock port PORT.
agent_pid=
case " $cmdline " in
*" loft_agent="*)
	agent_port=${cmdline#*loft_agent=}
	agent_port=${agent_port%% *}
	case "$agent_port" in
	'' | *[!0-9]*) echo "init: bad loft_agent='$agent_port', ignored" ;;
	*)
		/sbin/loft-agent --port "$agent_port" </dev/null &
		agent_pid=$!
		;;
	esac
	;;
esac

echo "GUEST-INIT-READY"

# --- facts for the tests -----------------------------------------------
read -r uptime _ < /proc/uptime
read -r kernel < /proc/sys/kernel/osrelease
read -r _ mem _ < /proc/meminfo                      # line 1: MemTotal: N kB
read -r root_dev _ root_fs _ < /proc/mounts          # line 1: the / mount
read -r online < /sys/devices/system/cpu/online      # "0", "0-3", "0-1,4-5"
cpus=0
old_ifs=$IFS
IFS=,
for r in $online; do
	case "$r" in
	*-*) cpus=$((cpus + ${r#*-} - ${r%-*} + 1)) ;;
	?*) cpus=$((cpus + 1)) ;;
	esac
done
IFS=$old_ifs
case "$root_fs" in
rootfs | ramfs | tmpfs) initramfs=1 ;;
*) initramfs=0 ;;
esac
echo "guest-info: cpus=$cpus mem_kib=$mem root_dev=$root_dev root_fs=$root_fs initramfs=$initramfs kernel=$kernel boot_timer=$boot_timer uptime_s=$uptime argc=$#"

# --- optional command ----------------------------------------------------
# finish: report the exit code and stop the VM. No ACPI, so `poweroff -f` would
# only halt the CPU; `reboot -f` runs the kernel's restart path, which with
# reboot=k is `out 0x64, 0xfe`: loft's "guest wants to stop". exec: no extra
# process. If even that fails, init exits -> kernel panic -> panic=-1 reboots.
finish() {
	trap - EXIT
	echo "GUEST-CMD-EXIT=$1"
	sync
	exec reboot -f
}
# The command runs in this shell (no extra process); an `exit N` in it still
# ends up here, as GUEST-CMD-EXIT=N.
trap 'finish $?' EXIT
rc=0
if [ "$#" -gt 0 ]; then
	"$@"
	rc=$?
elif [ -n "${guest_cmd:-}" ]; then
	eval "$guest_cmd"
	rc=$?
elif [ -n "$agent_pid" ]; then
	# No command but an agent: serve the host until the agent exits (or loft stops the VM).
	wait "$agent_pid"
	rc=$?
elif [ "${loft_shell:-}" = 1 ]; then
	# No command and a person at the console (loft adds loft_shell=1 when its stdin is a
	# terminal): a shell with job control on ttyS0; the VM ends when it exits.
	setsid cttyhack sh
	rc=$?
fi
finish "$rc"
