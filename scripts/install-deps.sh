#!/usr/bin/env bash
# install-deps.sh — install the Debian/Ubuntu packages keybroker needs for
# dev mode and tests (SoftHSM2, swtpm, TPM and PKCS#11 tools, protoc with
# the well-known .proto files, and systemd for systemd-analyze and the unit
# tests in deploy/), etcd (the replicas' shared store: tests and
# `make run-cluster` start their own members) and iproute2 (the cluster
# tests' network namespaces). With no arguments it also installs nodejs and
# npm when there is no npm (a node from elsewhere, e.g. NodeSource, is used
# as it is) and runs `npm ci` in test/oidc-provider, the independent
# authorization server the tests run (skipped when node_modules already
# holds what its package-lock.json pins).
#
# Usage: scripts/install-deps.sh [PACKAGE...]
#
# With no arguments it installs every package below that is missing; with
# arguments only those (each must be one of the packages below). Packages
# already installed are left alone, so it is safe to run on every build.
# Runs apt-get directly as root, through `sudo -n` when sudo needs no
# password, and otherwise prints the command to run and exits 1.
set -euo pipefail

# libprotobuf-dev holds google/protobuf/*.proto, which protoc needs for the
# API's imports: protobuf-compiler only recommends it, and recommends are
# not installed here.
readonly ALL_PACKAGES=(softhsm2 opensc p11-kit swtpm swtpm-tools tpm2-tools protobuf-compiler libprotobuf-dev systemd etcd-server iproute2)

die() {
	echo "install-deps: $*" >&2
	exit 1
}

# npm_deps installs test/oidc-provider's pinned npm packages.
npm_deps() {
	local dir stamp sum try
	dir=$(cd "$(dirname "$0")/.." && pwd)/test/oidc-provider
	stamp=$dir/node_modules/.keybroker-lock.sha256
	sum=$(sha256sum "$dir/package-lock.json" | cut -d' ' -f1)
	if [[ -f $stamp && $(<"$stamp") == "$sum" ]]; then
		return 0
	fi
	command -v npm >/dev/null 2>&1 || die "npm not found: install nodejs and npm (or run $0 as root)"
	echo "deps: npm ci in test/oidc-provider"
	# npm trusts node's built-in CA list only; add the system's, where a
	# proxy's or a site's own CA is installed.
	if [[ -z ${NODE_EXTRA_CA_CERTS:-} && -r /etc/ssl/certs/ca-certificates.crt ]]; then
		export NODE_EXTRA_CA_CERTS=/etc/ssl/certs/ca-certificates.crt
	fi
	for try in 1 2 3; do
		if (cd "$dir" && npm ci --no-audit --no-fund); then
			echo "$sum" >"$stamp"
			return 0
		fi
		echo "install-deps: npm ci failed (try $try of 3)" >&2
		sleep $((try * 5))
	done
	die "npm ci in $dir failed 3 times"
}

usage() {
	echo "usage: $0 [PACKAGE...]"
	echo "packages: ${ALL_PACKAGES[*]}"
}

packages=()
for arg in "$@"; do
	case "$arg" in
	-h | --help)
		usage
		exit 0
		;;
	esac
	known=false
	for p in "${ALL_PACKAGES[@]}"; do
		if [[ $arg == "$p" ]]; then
			known=true
		fi
	done
	if ! $known; then
		usage >&2
		die "unknown package \"$arg\""
	fi
	packages+=("$arg")
done
all=false
if ((${#packages[@]} == 0)); then
	packages=("${ALL_PACKAGES[@]}")
	all=true
fi

if ! command -v dpkg-query >/dev/null 2>&1; then
	die "dpkg-query not found: this script supports Debian and Ubuntu only; install these packages with your package manager: ${packages[*]}"
fi

missing=()
for p in "${packages[@]}"; do
	# dpkg-query fails for packages dpkg has never heard of; a removed
	# package can linger as "deinstall ok config-files".
	status=$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)
	if [[ $status != "install ok installed" ]]; then
		missing+=("$p")
	fi
done

if $all && ! command -v npm >/dev/null 2>&1; then
	command -v node >/dev/null 2>&1 || missing+=(nodejs)
	missing+=(npm)
fi

if ((${#missing[@]} == 0)); then
	if $all; then npm_deps; fi
	echo "deps: all present"
	exit 0
fi

if [[ $(id -u) -eq 0 ]]; then
	as_root=()
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
	as_root=(sudo -n)
else
	{
		echo "install-deps: missing packages: ${missing[*]}"
		echo "install-deps: installing them needs root; run:"
		echo "  sudo apt-get update && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends ${missing[*]}"
	} >&2
	exit 1
fi

# apt retries each download itself (Acquire::Retries); a whole step that
# still fails (a mirror in the middle of a sync, a lock held by an
# unattended upgrade) is tried again a few times before giving up.
apt_get() {
	local try
	for try in 1 2 3; do
		if "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get -q -o Acquire::Retries=3 "$@"; then
			return 0
		fi
		echo "install-deps: apt-get $1 failed (try $try of 3)" >&2
		sleep $((try * 5))
	done
	die "apt-get $* failed 3 times"
}

echo "deps: installing ${missing[*]}"
apt_get update
apt_get install -y --no-install-recommends "${missing[@]}"

for p in "${missing[@]}"; do
	status=$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)
	if [[ $status != "install ok installed" ]]; then
		die "$p is still not installed after apt-get install (status \"$status\")"
	fi
done
# Debian's etcd-server enables and starts a system etcd on 127.0.0.1:2379.
# keybroker only needs the binary (tests and run-cluster start their own
# members), so a system etcd that this script brought in is switched off.
for p in "${missing[@]}"; do
	if [[ $p == etcd-server ]] && [[ -d /run/systemd/system ]]; then
		"${as_root[@]}" systemctl disable --now etcd.service >/dev/null 2>&1 || true
		echo "deps: etcd-server installed; its system service is disabled (keybroker starts its own etcd members)"
	fi
done
if $all; then npm_deps; fi
echo "deps: installed ${missing[*]}"
