#!/usr/bin/env bash
# fresh-machine.sh — what a new user does, on a machine that has nothing but
# Debian's minimal base, Go, gcc, make, git, python3, ca-certificates and
# sudo: a fresh Debian root, so that a package installed by hand on this
# machine makes no difference. This is what CI runs (.ci/run) and what
# `make test-fresh` runs.
#
# usage: scripts/fresh-machine.sh [--keep] [STEP...] [-- COMMAND...]
#
# Steps, run in order on one clone of this checkout's committed HEAD
# (commit first: uncommitted changes are not seen), in one fresh root:
#   run       `make run` until the daemon is healthy and has signed once, then
#             stop it (scripts/readme-check.sh run)
#   cluster   `make run-cluster` until its replicas serve and sign, then stop
#             it (scripts/readme-check.sh cluster)
#   test      `make test`
#   service   boot systemd as PID 1 in the root and install the service as
#             the README says, with SoftHSM2 (scripts/readme-check.sh service)
#   -- CMD    any command, in the root (e.g. `-- bash` to look around)
# With no step: run test service. --keep leaves the root in place.
#
# Needs root (chroot, mounts, namespaces). The base root is built once with
# debootstrap (2-4 minutes, from the mirror this machine's apt uses) and
# cached under /var/cache/keybroker-fresh, as are the .deb files apt
# downloads in it (downloads only: every package is still installed by the
# project's own scripts in every run). The Go module cache of this machine
# is shared: modules are checked against go.sum either way.
set -euo pipefail

die() {
	echo "fresh-machine: $*" >&2
	exit 1
}
say() { echo "fresh-machine: $*" >&2; }

keep=false
steps=()
cmd=()
while (($#)); do
	case "$1" in
	--keep) keep=true ;;
	run | cluster | test | service) steps+=("$1") ;;
	--)
		shift
		cmd=("$@")
		((${#cmd[@]})) || die "-- needs a command"
		steps+=(cmd)
		break
		;;
	-h | --help)
		sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
		exit 0
		;;
	*) die "unknown step \"$1\" (want run, cluster, test, service or -- COMMAND)" ;;
	esac
	shift
done
((${#steps[@]})) || steps=(run cluster test service)

[[ $(id -u) == 0 ]] || die "needs root (chroot, mounts, namespaces); try: sudo $0 $*"
command -v go >/dev/null || die "no go on PATH"
repo=$(cd "$(dirname "$0")/.." && pwd)
[[ -d $repo/.git ]] || die "$repo is not a git checkout"
goroot=$(go env GOROOT)
modcache=$(go env GOMODCACHE)

# The base: Debian's minimal variant plus what a developer's machine has
# before it meets this project. libc6-dev is what makes gcc usable for cgo
# (gcc only recommends it); sudo because the README's service steps use it;
# procps for ps and kill.
suite=$(. /etc/os-release && echo "${VERSION_CODENAME:-bookworm}")
base_pkgs=make,git,gcc,libc6-dev,python3,ca-certificates,sudo,procps
cache=/var/cache/keybroker-fresh
base=$cache/$suite-$(echo "$base_pkgs" | sha256sum | cut -c1-12).tar

mirror() {
	local m
	m=$(grep -hE '^URIs:' /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '{print $2}' | grep -v security | head -1 || true)
	[[ -n $m ]] || m=$(grep -hE '^deb ' /etc/apt/sources.list 2>/dev/null | awk '{print $2}' | head -1 || true)
	[[ -n $m ]] || die "cannot find a Debian mirror in this machine's apt sources"
	echo "$m"
}

build_base() {
	if ! command -v debootstrap >/dev/null; then
		apt-get update -q >/dev/null && apt-get install -y -q debootstrap >/dev/null ||
			die "cannot install debootstrap"
	fi
	mkdir -p "$cache"
	local tmp try
	tmp=$(mktemp -d "$cache/build.XXXX")
	say "building the base root ($suite, minbase) once: a few minutes"
	for try in 1 2 3; do
		if debootstrap --variant=minbase --include="$base_pkgs" "$suite" "$tmp/root" "$(mirror)" >"$tmp/debootstrap.log" 2>&1; then
			break
		fi
		say "debootstrap failed (try $try of 3): $(tail -2 "$tmp/debootstrap.log")"
		rm -rf "$tmp/root"
		((try < 3)) || die "could not build the base root"
		sleep $((try * 5))
	done
	# This machine's apt sources and settings: the same mirror and proxy.
	rm -f "$tmp/root/etc/apt/sources.list"
	cp /etc/apt/sources.list.d/*.sources "$tmp/root/etc/apt/sources.list.d/" 2>/dev/null || true
	cp /etc/apt/sources.list "$tmp/root/etc/apt/" 2>/dev/null || true
	for f in /etc/apt/apt.conf.d/99*; do [[ -f $f ]] && cp "$f" "$tmp/root/etc/apt/apt.conf.d/"; done
	rm -f "$tmp/root/var/cache/apt/archives/"*.deb
	tar -C "$tmp/root" -cf "$base.part" . && mv "$base.part" "$base"
	rm -rf "$tmp"
}
[[ -f $base ]] || build_base

work=$(mktemp -d /var/tmp/keybroker-fresh.XXXX)
root=$work/root
cgroup=""
cleanup() {
	if [[ -n $cgroup && -d $cgroup ]]; then
		# systemd's cgroups, innermost first (empty once PID 1 is gone).
		find "$cgroup" -depth -type d -exec rmdir {} + 2>/dev/null || true
	fi
	if $keep; then
		say "kept $root"
	else
		rm -rf "$work"
	fi
}
trap cleanup EXIT
mkdir -p "$root" "$cache/apt-archives/partial"
tar -C "$root" -xf "$base"
cp /etc/resolv.conf "$root/etc/resolv.conf" 2>/dev/null || true
cp /etc/hosts "$root/etc/hosts" 2>/dev/null || true
# This machine's own CAs (a site's, a TLS-inspecting proxy's), which npm
# needs to reach its registry (apt uses this machine's settings, go its
# module cache); kept in /usr/local/share so that a regenerated bundle has them.
for crt in /usr/local/share/ca-certificates/*.crt; do
	[[ -f $crt ]] || continue
	mkdir -p "$root/usr/local/share/ca-certificates"
	cp "$crt" "$root/usr/local/share/ca-certificates/"
	cat "$crt" >>"$root/etc/ssl/certs/ca-certificates.crt"
done
git clone -q --no-local "$repo" "$root/src"
say "$(git -C "$root/src" log --oneline -1)"

env_in_root=(
	HOME=/root TERM="${TERM:-dumb}" CI="${CI:-}" LANG=C.UTF-8
	PATH=/usr/local/go/bin:/root/go/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
	GOTOOLCHAIN=local GOPROXY="$(go env GOPROXY)" GOSUMDB="$(go env GOSUMDB)"
	GONOSUMDB="$(go env GONOSUMDB)" GOPRIVATE="$(go env GOPRIVATE)"
)

# mounts is run by the shell that enters the root, in a mount namespace of
# its own: everything it mounts goes away with that namespace.
mounts=$(
	cat <<'EOF'
set -euo pipefail
r=$ROOT
mount --make-rprivate /
mount --bind "$r" "$r" # a mount point: systemd remounts / in its services
mount -t proc proc "$r/proc"
mount -t sysfs sysfs "$r/sys"
# A /dev of its own with the usual nodes, so that nothing in the root
# (systemd's gettys, udev) reaches this machine's devices.
mount -t tmpfs -o mode=0755,nosuid dev "$r/dev"
for n in null zero full random urandom tty; do
	touch "$r/dev/$n"
	mount --bind "/dev/$n" "$r/dev/$n"
done
mkdir -p "$r/dev/pts" "$r/dev/shm"
mount -t devpts -o newinstance,ptmxmode=0666,mode=0620 devpts "$r/dev/pts"
ln -s pts/ptmx "$r/dev/ptmx"
mount -t tmpfs -o mode=1777,nosuid,nodev shm "$r/dev/shm"
ln -s /proc/self/fd "$r/dev/fd"
ln -s /proc/self/fd/0 "$r/dev/stdin"
ln -s /proc/self/fd/1 "$r/dev/stdout"
ln -s /proc/self/fd/2 "$r/dev/stderr"
mount -t tmpfs -o mode=1777,size=8g tmp "$r/tmp"
mkdir -p "$r/usr/local/go" "$r/root/go/pkg/mod"
mount --bind -o ro "$GOROOT_HOST" "$r/usr/local/go"
mount --bind "$MODCACHE_HOST" "$r/root/go/pkg/mod"
mount --bind "$APT_CACHE" "$r/var/cache/apt/archives"
# Shared, as on a booted machine (systemd leaves this to a container's
# manager): mounts that systemd makes for a service in a namespace of the
# service's, such as its LoadCredential= directory, must show in its own.
mount --make-rshared "$r"
EOF
)
export ROOT=$root GOROOT_HOST=$goroot MODCACHE_HOST=$modcache APT_CACHE=$cache/apt-archives
mkdir -p "$modcache"

# in_chroot runs its arguments in the root, as root, from /src.
in_chroot() {
	unshare --mount -- bash -c "$mounts"'
		exec chroot "$ROOT" /usr/bin/env -i "$@"' in-root "${env_in_root[@]}" \
		/bin/bash -c 'cd /src && exec "$@"' in-root "$@"
}

# with_systemd boots systemd as PID 1 in the root (in namespaces of its own
# and a cgroup of its own), runs its arguments there once the system is up,
# and kills the whole PID namespace after.
with_systemd() {
	local unified
	if [[ -f /sys/fs/cgroup/unified/cgroup.procs ]]; then
		unified=/sys/fs/cgroup/unified # a hybrid hierarchy
	elif [[ -f /sys/fs/cgroup/cgroup.procs ]]; then
		unified=/sys/fs/cgroup
	else
		die "no cgroup v2 hierarchy at /sys/fs/cgroup or /sys/fs/cgroup/unified"
	fi
	cgroup=$unified/keybroker-fresh-$$
	mkdir -p "$cgroup"
	# No gettys on the consoles of this machine.
	local u
	for u in getty@.service serial-getty@.service console-getty.service container-getty@.service e2scrub_reap.service; do
		ln -sf /dev/null "$root/etc/systemd/system/$u"
	done
	(
		echo $BASHPID >"$cgroup/cgroup.procs"
		exec unshare --mount --pid --uts --ipc --cgroup --fork --kill-child -- bash -c "$mounts"'
			exec chroot "$ROOT" /usr/bin/env -i container=keybroker-fresh \
				/lib/systemd/systemd --system --unit=multi-user.target --log-target=journal' \
			>"$work/systemd.log" 2>&1
	) &
	# $boot is unshare; its one child becomes systemd.
	local boot=$! pid="" i
	for i in $(seq 100); do
		pid=$(pgrep -P "$boot" | head -1 || true)
		[[ -n $pid && $(cat "/proc/$pid/comm" 2>/dev/null) == systemd ]] && break
		pid=""
		sleep 0.1
	done
	[[ -n $pid ]] || die "systemd did not start: $(cat "$work/systemd.log")"
	local enter=(nsenter -t "$pid" -m -p -u -i -C -r -w /usr/bin/env -i "${env_in_root[@]}")
	local state=""
	for i in $(seq 300); do
		state=$("${enter[@]}" systemctl is-system-running 2>/dev/null || true)
		[[ $state == running || $state == degraded ]] && break
		sleep 0.1
	done
	if [[ $state != running && $state != degraded ]]; then
		"${enter[@]}" systemctl --no-pager --failed >&2 || true
		die "systemd in the root did not come up (state \"$state\")"
	fi
	[[ $state == running ]] || "${enter[@]}" systemctl --no-pager --failed >&2 || true
	local rc=0
	"${enter[@]}" /bin/bash -c 'cd /src && exec "$@"' in-root "$@" || rc=$?
	kill -KILL "$pid" 2>/dev/null || true
	wait "$boot" 2>/dev/null || true
	return $rc
}

# The steps. Each says how long it took, or which one failed.
total_start=$SECONDS
for step in "${steps[@]}"; do
	start=$SECONDS
	say "== step $step"
	rc=0
	case $step in
	run) in_chroot scripts/readme-check.sh run || rc=$? ;;
	cluster) in_chroot scripts/readme-check.sh cluster || rc=$? ;;
	test) in_chroot make test || rc=$? ;;
	service)
		# A machine that runs services has systemd: the project's own
		# install step puts it there, as `make test` does.
		in_chroot scripts/install-deps.sh systemd || rc=$?
		((rc)) || with_systemd scripts/readme-check.sh service || rc=$?
		;;
	cmd) in_chroot "${cmd[@]}" || rc=$? ;;
	esac
	if ((rc)); then
		say "== step $step FAILED (exit $rc) after $((SECONDS - start)) s"
		exit "$rc"
	fi
	say "== step $step passed in $((SECONDS - start)) s"
done
say "all steps passed in $((SECONDS - total_start)) s: ${steps[*]}"
