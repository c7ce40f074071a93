#!/usr/bin/env bash
# What `make run-cluster` runs: on this machine, a 3-member etcd cluster,
# SoftHSM2 behind `p11-kit server` as the network HSM, and three keybrokerd
# replicas (replica-1 … replica-3) sharing both, each serving the calling
# user as dev mode does, on .keybroker/cluster/replica-N/keybroker.sock.
# Everything stops on Ctrl-C; the token and etcd data stay in
# .keybroker/cluster for the next run (`rm -rf .keybroker/cluster` to start
# over).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh softhsm2 p11-kit etcd-server

root=$PWD/.keybroker/cluster
mkdir -p "$root"
chmod 700 "$root"
module=/usr/lib/softhsm/libsofthsm2.so
client=/usr/lib/x86_64-linux-gnu/pkcs11/p11-kit-client.so
for f in "$module" "$client"; do
	[ -f "$f" ] || { echo "run-cluster: $f not found" >&2; exit 1; }
done

# The network HSM: a SoftHSM2 token of its own, made on the first run.
label=cluster
export SOFTHSM2_CONF=$root/softhsm2.conf
if [ ! -f "$root/pin" ]; then
	mkdir -p "$root/tokens"
	printf 'directories.tokendir = %s\nobjectstore.backend = file\nlog.level = ERROR\n' "$root/tokens" >"$SOFTHSM2_CONF"
	(umask 077 && od -An -N12 -tx1 /dev/urandom | tr -d ' \n' >"$root/pin")
	softhsm2-util --init-token --free --label "$label" --pin "$(cat "$root/pin")" --so-pin "$(od -An -N12 -tx1 /dev/urandom | tr -d ' \n')" >/dev/null
fi

pids=()
interrupted=false
stop() {
	trap - INT TERM EXIT
	echo
	echo "run-cluster: stopping (etcd members take a few seconds)"
	for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
		kill "${pids[$i]}" 2>/dev/null || true
	done
	wait 2>/dev/null || true
}
trap 'interrupted=true' INT TERM
trap stop EXIT

rm -f "$root/p11.sock"
p11-kit server -f --provider "$module" -n "$root/p11.sock" "pkcs11:token=$label" >/dev/null 2>"$root/p11-kit.log" &
pids+=($!)

# etcd: three members on loopback.
cluster=""
for n in 1 2 3; do
	cluster+="${cluster:+,}etcd-$n=http://127.0.0.1:$((23800 + n))"
done
endpoints=""
for n in 1 2 3; do
	endpoints+="${endpoints:+, }http://127.0.0.1:$((23790 + n))"
	etcd --name "etcd-$n" --data-dir "$root/etcd-$n" \
		--listen-client-urls "http://127.0.0.1:$((23790 + n))" --advertise-client-urls "http://127.0.0.1:$((23790 + n))" \
		--listen-peer-urls "http://127.0.0.1:$((23800 + n))" --initial-advertise-peer-urls "http://127.0.0.1:$((23800 + n))" \
		--initial-cluster "$cluster" --initial-cluster-state new --initial-cluster-token keybroker-run-cluster \
		--logger zap --log-outputs "$root/etcd-$n.log" &
	pids+=($!)
done

wait_for() { # what, test command...
	local what=$1
	shift
	for _ in $(seq 150); do
		"$@" >/dev/null 2>&1 && return 0
		sleep 0.1
	done
	echo "run-cluster: $what did not start; see $root/*.log" >&2
	exit 1
}
wait_for "p11-kit server" test -S "$root/p11.sock"

for n in 1 2 3; do
	dir=$root/replica-$n
	mkdir -p "$dir"
	cat >"$dir/keybroker.yaml" <<EOF
socket: $dir/keybroker.sock
state_dir: $dir/state
backend: pkcs11
pkcs11:
  module: $client
  token_label: $label
  pin_file: $root/pin
tenants:
  - name: dev
    identities: {uids: [$(id -u)]}
    roles: [signer, admin]
log:
  format: text
store:
  backend: etcd
  endpoints: [$endpoints]
  prefix: /keybroker/
  replica: replica-$n
EOF
	P11_KIT_SERVER_ADDRESS=unix:path=$root/p11.sock bin/keybrokerd --config "$dir/keybroker.yaml" 2>"$dir/keybrokerd.log" &
	pids+=($!)
	# One after the other: SoftHSM2 processes opening one token at the
	# same moment can fail.
	wait_for "replica-$n (log: $dir/keybrokerd.log)" bin/keybrokerctl --socket "$dir/keybroker.sock" health
done

ctl=(bin/keybrokerctl --socket "$root/replica-1/keybroker.sock")
if ! "${ctl[@]}" keys get demo >/dev/null 2>&1; then
	"${ctl[@]}" keys create demo >/dev/null
fi
cat <<EOF

keybroker cluster: 3 replicas sharing etcd and one SoftHSM2 token (through p11-kit server)
  replica-1: .keybroker/cluster/replica-1/keybroker.sock
  replica-2: .keybroker/cluster/replica-2/keybroker.sock
  replica-3: .keybroker/cluster/replica-3/keybroker.sock
  etcd:      $endpoints
  logs:      .keybroker/cluster/replica-N/keybrokerd.log

Try:
  bin/keybrokerctl --socket .keybroker/cluster/replica-2/keybroker.sock cluster status
  bin/keybrokerctl --socket .keybroker/cluster/replica-1/keybroker.sock keys rotate demo
  bin/keybrokerctl --socket .keybroker/cluster/replica-3/keybroker.sock sign demo --digest \$(printf hello | sha256sum | cut -d' ' -f1)

Ctrl-C stops everything.
EOF
wait -n "${pids[@]}" || true
if ! $interrupted; then
	echo "run-cluster: a process ended; see the logs in .keybroker/cluster" >&2
	exit 1
fi
exit 0
