#!/usr/bin/env bash
# make bench: the standard benchmark matrix of issue 7, printed as one
# Markdown table. Everything runs on this machine, client and daemon
# together, under a temporary directory that is removed at the end:
#
#   SoftHSM2 ES256 and RS256-2048 Sign at 1, 4, 16 clients, each against
#     the same token signed in-process (keybrokerctl bench --baseline);
#     the same over SignStream (bench --stream) at 4 and 16 clients;
#   swtpm ES256 Sign at 1 and 4 clients (the daemon on one swtpm, the
#     in-process baseline on a second one: a TPM serves one connection);
#   GetJWKS at 16 clients; the JWK Set over HTTPS at 16 clients (the jwks
#     listener's handler behind TLS 1.3 on loopback, clients in the same
#     Go benchmark, against a handler that only writes the same bytes);
#   the peer: SoftHSM2 ES256 and RS256 at 4 and 16 clients signed
#     in-process over p11-kit remoting (p11-kit-client.so to `p11-kit
#     server`), against the daemon in the same command, unary and stream;
#   Sign with the metadata on etcd (one member) against the bbolt daemon,
#     ES256 at 16 clients, measured in turn;
#   the gRPC floor: the health service's Check at 16 clients (no caller
#     authorization, no audit record, no hardware);
#   many keys across many tenants (scripts/benchsetup): start to ready,
#     resident memory, Sign throughput on one key at 16 clients against
#     the single-key figure: 10,000 keys across 1,000 tenants by default
#     (BENCH_MT_TENANTS, BENCH_MT_KEYS).
#
# The clients share one gRPC connection, as an application does
# (keybrokerctl bench --conns). BENCH_DURATION (default 5s) is the length of
# each measurement; BENCH_AUDIT_DIR puts the daemons' audit logs in that
# directory (default: their state directories, on the disk of /tmp), e.g.
# /dev/shm to see what the audit log's fsync costs; BENCH_KEEP=1 keeps the
# directory. Needs bin/ (make build), softhsm2, swtpm and jq.
set -euo pipefail
cd "$(dirname "$0")/.."

dur=${BENCH_DURATION:-5s}
ctl=bin/keybrokerctl
kbd=bin/keybrokerd
for tool in jq softhsm2-util; do
	command -v "$tool" >/dev/null || { echo "bench: $tool is missing (make deps)" >&2; exit 1; }
done
[ -x "$ctl" ] && [ -x "$kbd" ] || { echo "bench: run make build first" >&2; exit 1; }

work=$(mktemp -d /tmp/kbbench.XXXXXX)
pids=()
cleanup() {
	for p in "${pids[@]}"; do
		kill "$p" 2>/dev/null || true
		wait "$p" 2>/dev/null || true
	done
	if [ "${BENCH_KEEP:-0}" = 1 ]; then
		echo "bench: kept $work" >&2
	else
		rm -rf "$work"
		if [ -n "${BENCH_AUDIT_DIR:-}" ]; then
			rm -f "$BENCH_AUDIT_DIR"/kbbench-*-$$.jsonl*
		fi
	fi
}
trap cleanup EXIT
results=$work/results.jsonl
: >"$results"

say() { echo "bench: $*" >&2; }

# audit_conf NAME: the config lines that put NAME's audit log in
# BENCH_AUDIT_DIR, if set.
audit_conf() {
	if [ -n "${BENCH_AUDIT_DIR:-}" ]; then
		printf 'audit:\n  path: %s\n' "$BENCH_AUDIT_DIR/kbbench-$1-$$.jsonl"
	fi
}

# wait_ready SOCKET PID: poll health until SERVING; prints seconds waited.
wait_ready() {
	local sock=$1 pid=$2 t0 t1
	t0=$(date +%s.%N)
	while :; do
		if "$ctl" --socket "$sock" --timeout 1s health >/dev/null 2>&1; then
			t1=$(date +%s.%N)
			awk -v a="$t0" -v b="$t1" 'BEGIN {printf "%.3f", b - a}'
			return 0
		fi
		kill -0 "$pid" 2>/dev/null || { echo "bench: keybrokerd exited; see $work" >&2; return 1; }
		sleep 0.01
	done
}

# start_daemon CONFIG LOG: starts keybrokerd, sets DAEMON_PID and READY_S
# (seconds from exec to SERVING, measured from here).
start_daemon() {
	local cfg=$1 log=$2 sock t0
	sock=$(awk '/^socket:/ {print $2}' "$cfg")
	t0=$(date +%s.%N)
	"$kbd" --config "$cfg" 2>"$log" &
	DAEMON_PID=$!
	pids+=("$DAEMON_PID")
	wait_ready "$sock" "$DAEMON_PID" >/dev/null
	READY_S=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN {printf "%.3f", b - a}')
}

# record LABEL JSON: appends one result with its label.
record() { jq -c --arg l "$1" '. + {"label": $l}' <<<"$2" >>"$results"; }

# start_swtpm DIR: starts swtpm with its unix socket at DIR/swtpm.sock.
start_swtpm() {
	local dir=$1
	mkdir -p "$dir/state"
	swtpm socket --tpm2 --tpmstate dir="$dir/state" \
		--server type=unixio,path="$dir/swtpm.sock" --ctrl type=unixio,path="$dir/ctrl.sock" \
		--flags not-need-init,startup-clear &
	pids+=("$!")
	for _ in $(seq 100); do
		[ -S "$dir/swtpm.sock" ] && return 0
		sleep 0.05
	done
	say "swtpm did not start"
	return 1
}

# --- SoftHSM2 ---------------------------------------------------------------
say "provisioning a SoftHSM2 token"
eval "$(go run ./scripts/benchsetup token "$work/hsm" bench)"
cat >"$work/pkcs11.yaml" <<EOF
socket: $work/p11.sock
state_dir: $work/p11-state
backend: pkcs11
pkcs11:
  module: $MODULE
  token_label: $LABEL
  pin_file: $PIN_FILE
  softhsm2_conf: $CONF
$(audit_conf pkcs11)
log:
  level: warn
admin:
  address: 127.0.0.1:${BENCH_ADMIN_PORT:-19464}
EOF
start_daemon "$work/pkcs11.yaml" "$work/p11.log"
p11=(--socket "$work/p11.sock" --timeout 30s)
"$ctl" "${p11[@]}" keys create es --alg ES256 >/dev/null
"$ctl" "${p11[@]}" keys create rs --alg RS256 --bits 2048 >/dev/null
baseline=(--baseline --backend pkcs11 --pkcs11-module "$MODULE" --token-label "$LABEL" --pin-file "$PIN_FILE" --softhsm2-conf "$CONF")
for key in es rs; do
	for c in 1 4 16; do
		say "SoftHSM2 $key, $c clients"
		record "SoftHSM2 Sign" "$("$ctl" "${p11[@]}" -o json bench "$key" -c "$c" -d "$dur" "${baseline[@]}")"
	done
	for c in 4 16; do
		say "SoftHSM2 $key over SignStream, $c clients"
		record "SoftHSM2 SignStream" "$("$ctl" "${p11[@]}" -o json bench "$key" --stream -c "$c" -d "$dur" "${baseline[@]}")"
	done
done
# The group commit's depth over the Sign rows: records per audit commit.
batches=$(python3 - "http://127.0.0.1:${BENCH_ADMIN_PORT:-19464}/metrics" <<'PY'
import json, sys, urllib.request
m = {}
for line in urllib.request.urlopen(sys.argv[1], timeout=5).read().decode().splitlines():
    for k in ("keybroker_audit_batch_records_sum", "keybroker_audit_batch_records_count"):
        if line.startswith(k + " "):
            m[k] = float(line.split()[1])
print(json.dumps({"batch_sum": m.get("keybroker_audit_batch_records_sum", 0), "batch_count": m.get("keybroker_audit_batch_records_count", 0)}))
PY
)
record "audit group commit (Sign rows)" "$batches"
say "GetJWKS, 16 clients"
record "GetJWKS" "$("$ctl" "${p11[@]}" -o json bench --rpc jwks -c 16 -d "$dur")"
say "JWKS over HTTPS, 16 clients (go test -bench)"
go test -run '^$' -bench 'BenchmarkJWKSHTTPS/.*/200$' -benchtime "$dur" ./internal/jwkshttp >"$work/jwkshttp.txt"
record "JWKS over HTTPS" "$(awk '/req\/s/ {split($1, n, "/"); r[n[2]] = $(NF-1)} END {printf "{\"daemon\":{\"concurrency\":16,\"ops_per_sec\":%s,\"errors\":0},\"floor_ops_per_sec\":%s}", r["handler"], r["baseline"]}' "$work/jwkshttp.txt")"
say "gRPC floor (health Check), 16 clients"
record "gRPC floor: health Check" "$("$ctl" "${p11[@]}" -o json bench --rpc health -c 16 -d "$dur")"
single=$(jq -s 'map(select(.label == "SoftHSM2 Sign" and .daemon.algorithm == "ES256" and .daemon.concurrency == 16))[0].daemon.ops_per_sec' "$results")
P11_PID=$DAEMON_PID

# --- the peer: the same token through p11-kit remoting -------------------------
# What a service does without keybroker to keep keys off its host: sign
# in-process (crypto11, through keybroker's hsm package) over
# p11-kit-client.so, the token served by `p11-kit server`. The daemon is
# measured again in the same command, so keybroker / peer is back to back.
p11client=/usr/lib/x86_64-linux-gnu/pkcs11/p11-kit-client.so
if command -v p11-kit >/dev/null && [ -f "$p11client" ]; then
	SOFTHSM2_CONF=$CONF p11-kit server -f --provider "$MODULE" -n "$work/p11kit.sock" "pkcs11:token=$LABEL" >/dev/null 2>"$work/p11kit.log" &
	pids+=("$!")
	for _ in $(seq 100); do
		[ -S "$work/p11kit.sock" ] && break
		sleep 0.05
	done
	peer=(--baseline --backend pkcs11 --pkcs11-module "$p11client" --token-label "$LABEL" --pin-file "$PIN_FILE")
	for key in es rs; do
		for c in 4 16; do
			for mode in "" --stream; do
				say "p11-kit remoting peer, $key, $c clients ${mode:+(daemon over SignStream)}"
				record "vs p11-kit remoting" "$(P11_KIT_SERVER_ADDRESS=unix:path=$work/p11kit.sock "$ctl" "${p11[@]}" -o json bench "$key" $mode -c "$c" -d "$dur" "${peer[@]}")"
			done
		done
	done
else
	say "p11-kit is missing: no peer rows (make deps)"
fi

# --- the etcd store -------------------------------------------------------------
# A replica signs from memory: with the metadata on etcd (one member here)
# its Sign should match the bbolt daemon's. Both daemons run on the same
# token; they are measured in turn, twice each, and the sums compared.
if command -v etcd >/dev/null; then
	say "etcd store: starting one etcd member and a replica"
	etcd --name bench --data-dir "$work/etcd" --listen-client-urls http://127.0.0.1:23990 \
		--advertise-client-urls http://127.0.0.1:23990 --listen-peer-urls http://127.0.0.1:23991 \
		--initial-advertise-peer-urls http://127.0.0.1:23991 --initial-cluster bench=http://127.0.0.1:23991 \
		--log-outputs "$work/etcd.log" --logger zap &
	pids+=("$!")
	sed -e "s|^socket: .*|socket: $work/etcd-replica.sock|" -e "s|^state_dir: .*|state_dir: $work/etcd-state|" -e "/^admin:/,+1d" "$work/pkcs11.yaml" >"$work/etcd.yaml"
	printf 'store:\n  backend: etcd\n  endpoints: [http://127.0.0.1:23990]\n  replica: bench\n' >>"$work/etcd.yaml"
	start_daemon "$work/etcd.yaml" "$work/etcd-replica.log"
	ec=(--socket "$work/etcd-replica.sock" --timeout 30s)
	"$ctl" "${ec[@]}" keys create es --alg ES256 >/dev/null
	bb=0 et=0 last=""
	for round in 1 2; do
		say "etcd store vs bbolt, ES256, 16 clients, round $round"
		et=$(jq -n --argjson a "$et" --argjson b "$("$ctl" "${ec[@]}" -o json bench es -c 16 -d "$dur" | tee "$work/etcd-bench.json" | jq .daemon.ops_per_sec)" '$a + $b')
		bb=$(jq -n --argjson a "$bb" --argjson b "$("$ctl" "${p11[@]}" -o json bench es -c 16 -d "$dur" | jq .daemon.ops_per_sec)" '$a + $b')
	done
	record "etcd store Sign" "$(jq -c --argjson et "$et" --argjson bb "$bb" \
		'. + {etcd_ops_per_sec: ($et / 2), bbolt_ops_per_sec: ($bb / 2)}' "$work/etcd-bench.json")"
	kill "$DAEMON_PID"
	wait "$DAEMON_PID" 2>/dev/null || true
else
	say "etcd is missing: no etcd store row (make deps)"
fi
kill "$P11_PID"
wait "$P11_PID" 2>/dev/null || true

# --- swtpm ------------------------------------------------------------------
if command -v swtpm >/dev/null; then
	start_swtpm "$work/tpm-daemon"
	start_swtpm "$work/tpm-baseline"
	cat >"$work/tpm.yaml" <<EOF
socket: $work/tpm.sock
state_dir: $work/tpm-state
backend: tpm
tpm:
  device: ""
  socket: $work/tpm-daemon/swtpm.sock
$(audit_conf tpm)
log:
  level: warn
EOF
	start_daemon "$work/tpm.yaml" "$work/tpm.log"
	tpmc=(--socket "$work/tpm.sock" --timeout 30s)
	"$ctl" "${tpmc[@]}" keys create es --alg ES256 >/dev/null
	for c in 1 4; do
		say "swtpm ES256, $c clients"
		record "swtpm Sign" "$("$ctl" "${tpmc[@]}" -o json bench es -c "$c" -d "$dur" --baseline --backend tpm --tpm-socket "$work/tpm-baseline/swtpm.sock")"
	done
	kill "$DAEMON_PID"
	wait "$DAEMON_PID" 2>/dev/null || true
else
	say "swtpm is missing: no TPM rows (make deps)"
fi

# --- many keys across many tenants ---------------------------------------------
mt_tenants=${BENCH_MT_TENANTS:-1000}
mt_keys=${BENCH_MT_KEYS:-10}
mt_total=$((mt_tenants * mt_keys))
say "creating $mt_total keys across $mt_tenants tenants, then starting keybrokerd on them (slow: see the top of this script)"
go run ./scripts/benchsetup tenants "$work/mt" "$mt_tenants" "$mt_keys"
audit_conf mt >>"$work/mt/keybroker.yaml"
start_daemon "$work/mt/keybroker.yaml" "$work/mt.log"
mtc=(--socket "$work/mt/kb.sock" --timeout 30s)
say "$mt_total keys: Sign on one key, 16 clients"
mt=$("$ctl" "${mtc[@]}" -o json bench k05 -c 16 -d "$dur")
rss_kb=$(awk '/^VmRSS:/ {print $2}' "/proc/$DAEMON_PID/status")
hwm_kb=$(awk '/^VmHWM:/ {print $2}' "/proc/$DAEMON_PID/status")
record "$mt_total keys / $mt_tenants tenants" "$(jq -c --argjson ready "$READY_S" --argjson rss "$rss_kb" --argjson hwm "$hwm_kb" --argjson single "${single:-0}" \
	'. + {ready_s: $ready, rss_kb: $rss, hwm_kb: $hwm, single_key_ops_per_sec: $single}' <<<"$mt")"
kill "$DAEMON_PID"
wait "$DAEMON_PID" 2>/dev/null || true

# --- the table ----------------------------------------------------------------
echo
echo "keybroker bench — $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //'), ${dur} per cell"
echo
jq -rs -f scripts/bench-table.jq "$results"
