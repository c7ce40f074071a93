#!/usr/bin/env bash
# readme-check.sh — do what the README tells a new user, and check that it
# worked. Run by scripts/fresh-machine.sh inside a fresh Debian root (that is
# where it proves something); it changes the machine it runs on.
#
# usage: scripts/readme-check.sh run|cluster|service
#   run      `make run` in the background until the daemon is healthy; sign
#            with the "demo" key and verify the signature with openssl; fetch
#            the dev JWKS over HTTPS pinned to the dev certificate; stop
#            the daemon with SIGINT, as Ctrl-C does, and want exit status 0.
#   cluster  `make run-cluster` in the background until its three replicas
#            agree on a leader; sign with "demo" on each replica, verified;
#            SIGTERM; exit status 0 and no etcd or keybrokerd left running.
#   service  the README's "Running as a service" commands, as written, with
#            SoftHSM2 as the token, under systemd (PID 1 of the root); then
#            over the activated socket: health, a key, a signature verified;
#            socket activation of a stopped service; `systemctl reload`;
#            `systemctl stop` with status 0; and a daemon that cannot read
#            SoftHSM2's configuration exits 78 once, with the reason.
set -euo pipefail
cd "$(dirname "$0")/.."

step=""
fail() {
	echo "readme-check: $step: $*" >&2
	exit 1
}
check() {
	step=$*
	echo "readme-check: $step" >&2
}

tmp=$(mktemp -d)
cleanup_cmds=()
cleanup() {
	local c
	for c in "${cleanup_cmds[@]}"; do eval "$c" || true; done
	rm -rf "$tmp"
}
trap cleanup EXIT

# verify_signature CTL... : signs a digest of "hello" with key demo through
# the keybrokerctl command line given and verifies the DER signature
# against the key's public PEM with openssl.
verify_signature() {
	printf hello >"$tmp/msg"
	local digest
	digest=$(sha256sum "$tmp/msg" | cut -d' ' -f1)
	"$@" sign demo --digest "$digest" --format der --output json >"$tmp/sign.json" ||
		fail "keybrokerctl sign failed"
	"$@" pubkey demo --format pem >"$tmp/pub.pem" || fail "keybrokerctl pubkey failed"
	python3 - "$tmp/sign.json" "$tmp/sig.der" <<'EOF' || fail "no signature in: $(cat "$tmp/sign.json")"
import base64, json, sys
s = json.load(open(sys.argv[1]))["signature"]
open(sys.argv[2], "wb").write(base64.urlsafe_b64decode(s + "=" * (-len(s) % 4)))
EOF
	openssl dgst -sha256 -verify "$tmp/pub.pem" -signature "$tmp/sig.der" "$tmp/msg" >/dev/null ||
		fail "the signature does not verify against demo's public key"
	# The same check must fail for another message: the verification is real.
	printf 'hello!' >"$tmp/other"
	if openssl dgst -sha256 -verify "$tmp/pub.pem" -signature "$tmp/sig.der" "$tmp/other" >/dev/null 2>&1; then
		fail "the signature also verifies for another message"
	fi
}

# fetch_pinned CAFILE URL: GET URL over HTTPS trusting only CAFILE, with
# curl --cacert as the README shows, or Python's ssl where curl is not
# installed (a minimal root); either verifies the server's certificate.
fetch_pinned() {
	if command -v curl >/dev/null; then
		curl -fsS --cacert "$1" "$2"
		return
	fi
	python3 - "$1" "$2" <<'EOF'
import ssl, sys, urllib.request
ctx = ssl.create_default_context(cafile=sys.argv[1])
sys.stdout.write(urllib.request.urlopen(sys.argv[2], context=ctx, timeout=10).read().decode())
EOF
}

# wait_for SECONDS DESCRIPTION COMMAND...: until COMMAND succeeds.
wait_for() {
	local secs=$1 what=$2
	shift 2
	local deadline=$((SECONDS + secs))
	until "$@" >/dev/null 2>&1; do
		((SECONDS < deadline)) || return 1
		sleep 0.5
	done
}

check_run() {
	check "make run (in the background)"
	make run >"$tmp/run.log" 2>&1 &
	local make_pid=$!
	cleanup_cmds+=("kill $make_pid 2>/dev/null; pkill -INT -f '^bin/keybrokerd --dev' 2>/dev/null")
	export KEYBROKER_SOCKET=$PWD/.keybroker/dev/keybroker.sock
	# A first run installs SoftHSM2 and builds both binaries.
	local deadline=$((SECONDS + 900))
	until [[ -x bin/keybrokerctl ]] && bin/keybrokerctl health >/dev/null 2>&1; do
		if ! kill -0 "$make_pid" 2>/dev/null; then
			cat "$tmp/run.log" >&2
			fail "make run exited before the daemon was healthy"
		fi
		((SECONDS < deadline)) || { cat "$tmp/run.log" >&2; fail "no healthy daemon after 900 s"; }
		sleep 1
	done
	check "make run: the daemon printed the demo key's kid"
	grep -q 'demo' "$tmp/run.log" || { cat "$tmp/run.log" >&2; fail "no mention of the demo key"; }
	check "make run: bin/keybrokerctl sign demo, verified with openssl"
	verify_signature bin/keybrokerctl
	check "make run: the dev tenant's JWKS over HTTPS, the dev certificate pinned, holds the demo key"
	local jwks_url=https://127.0.0.1:8443/tenants/dev/jwks.json cacert=.keybroker/dev/jwks-tls/cert.pem kid
	grep -qF "curl --cacert $PWD/$cacert $jwks_url" "$tmp/run.log" || { cat "$tmp/run.log" >&2; fail "the banner does not print the curl command for $jwks_url"; }
	fetch_pinned "$cacert" "$jwks_url" >"$tmp/jwks.json" || fail "GET $jwks_url with --cacert $cacert failed"
	kid=$(awk '$1 == "thumbprint" { print $2; exit }' "$tmp/run.log")
	python3 - "$tmp/jwks.json" "$kid" <<'EOF' || fail "the JWKS does not hold demo's kid $kid: $(cat "$tmp/jwks.json")"
import json, sys
keys = json.load(open(sys.argv[1]))["keys"]
assert sys.argv[2] and sys.argv[2] in [k["kid"] for k in keys], keys
assert all("d" not in k for k in keys), "a private member"
EOF
	check "make run: Ctrl-C (SIGINT) stops the daemon, exit status 0"
	pkill -INT -f '^bin/keybrokerd --dev' || fail "no keybrokerd process to stop"
	local rc=0
	wait "$make_pid" || rc=$?
	((rc == 0)) || { cat "$tmp/run.log" >&2; fail "make run exited $rc"; }
	echo "readme-check: make run serves, signs and stops cleanly" >&2
}

check_cluster() {
	check "make run-cluster (in the background)"
	make run-cluster >"$tmp/cluster.log" 2>&1 &
	local make_pid=$!
	cleanup_cmds+=("kill $make_pid 2>/dev/null; pkill -TERM -f 'scripts/run-cluster.sh' 2>/dev/null")
	local deadline=$((SECONDS + 600))
	until grep -q 'Ctrl-C stops everything' "$tmp/cluster.log"; do
		if ! kill -0 "$make_pid" 2>/dev/null; then
			cat "$tmp/cluster.log" >&2
			fail "make run-cluster exited before its replicas served"
		fi
		((SECONDS < deadline)) || { cat "$tmp/cluster.log" >&2; fail "no cluster after 600 s"; }
		sleep 1
	done
	local n leader="" st
	for n in 1 2 3; do
		local ctl=(bin/keybrokerctl --socket ".keybroker/cluster/replica-$n/keybroker.sock")
		check "make run-cluster: replica-$n's cluster status names itself and the one leader"
		wait_for 30 "a leader" bash -c "${ctl[*]} -o json cluster status | grep -q '\"leader\":\"replica-'" ||
			fail "no leader: $("${ctl[@]}" -o json cluster status 2>&1)"
		st=$("${ctl[@]}" -o json cluster status)
		python3 - "$st" "replica-$n" "$leader" >"$tmp/leader" <<'EOF' || fail "cluster status: $st"
import json, sys
s, me, leader = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
assert s["replica"] == me, s
assert s["leader"] in ("replica-1", "replica-2", "replica-3"), s
assert not leader or s["leader"] == leader, (s, leader)
assert s["serving"] and len(s["replicas"]) == 3, s
print(s["leader"])
EOF
		leader=$(cat "$tmp/leader")
		check "make run-cluster: sign demo on replica-$n, verified with openssl"
		verify_signature "${ctl[@]}"
	done
	# SIGTERM: a background job of a script ignores SIGINT, and bash cannot
	# trap a signal ignored at its start; the script stops the same way on
	# either (Ctrl-C in a terminal sends SIGINT to every process in it).
	check "make run-cluster: SIGTERM stops everything, exit status 0"
	pkill -TERM -f 'scripts/run-cluster.sh' || fail "no run-cluster process to stop"
	local rc=0
	wait "$make_pid" || rc=$?
	((rc == 0)) || { cat "$tmp/cluster.log" >&2; fail "make run-cluster exited $rc"; }
	if pgrep -f '^(etcd --name etcd-|bin/keybrokerd --config .*cluster)' >/dev/null; then
		fail "processes left running: $(pgrep -af '^(etcd|bin/keybrokerd)')"
	fi
	echo "readme-check: make run-cluster serves on three replicas, signs and stops cleanly" >&2
}

# readme_block MARKER prints the ```sh block that follows the line
# "<!-- readme-check: MARKER -->" in README.md.
readme_block() {
	awk -v m="<!-- readme-check: $1 -->" '
		$0 == m { found = 1; next }
		found == 1 && /^```sh$/ { found = 2; next }
		found == 2 && /^```$/ { exit }
		found == 2 { print }
	' README.md
}

check_service() {
	local unit=keybroker.service
	journal() { journalctl --no-pager -u keybroker.service -u keybroker.socket | tail -40 >&2; }
	check "the README's service installation, as written"
	readme_block service-install >"$tmp/install.sh"
	[[ -s $tmp/install.sh ]] || fail "README.md has no block after <!-- readme-check: service-install -->"
	# What the README asks the reader to choose: the PINs and the user the
	# application runs as.
	useradd --system --no-create-home app
	export APP_USER=app PIN=$(od -An -N6 -tx1 /dev/urandom | tr -d ' \n') SO_PIN=$(od -An -N6 -tx1 /dev/urandom | tr -d ' \n')
	bash -euo pipefail -x "$tmp/install.sh" || { journal; fail "an installation command failed"; }

	local ctl=(sudo -u app keybrokerctl --timeout 20s)
	check "the service is active (READY=1 sent)"
	wait_for 30 "active" systemctl is-active --quiet $unit || { journal; fail "not active: $(systemctl is-active $unit)"; }
	check "keybrokerctl health over the activated socket, as the application's user"
	[[ $("${ctl[@]}" health) == SERVING ]] || { journal; fail "not SERVING"; }
	check "keys create and a signature, verified with openssl"
	"${ctl[@]}" keys create demo --alg ES256 >/dev/null || { journal; fail "keys create failed"; }
	verify_signature "${ctl[@]}"

	check "socket activation: a call to the stopped service starts it"
	systemctl stop $unit
	[[ -S /run/keybroker/keybroker.sock ]] || fail "the socket is gone with the service"
	[[ $("${ctl[@]}" health) == SERVING ]] || { journal; fail "not SERVING after activation"; }
	systemctl is-active --quiet $unit || fail "the call did not start the service"
	verify_signature "${ctl[@]}" # the key survived the restart

	check "systemctl reload"
	local pid
	pid=$(systemctl show -P MainPID $unit)
	systemctl reload $unit || { journal; fail "reload failed"; }
	wait_for 10 "reloaded" bash -c "journalctl --no-pager -u $unit | grep -q 'configuration reloaded'" ||
		{ journal; fail "no 'configuration reloaded' in the journal"; }
	[[ $(systemctl show -P MainPID $unit) == "$pid" ]] || fail "reload restarted the process"
	[[ $("${ctl[@]}" health) == SERVING ]] || { journal; fail "not SERVING after reload"; }

	check "systemctl stop: exit status 0"
	systemctl stop $unit keybroker.socket
	local status result
	status=$(systemctl show -P ExecMainStatus $unit)
	result=$(systemctl show -P Result $unit)
	[[ $status == 0 && $result == success ]] || { journal; fail "stopped with status $status, result $result"; }

	check "SoftHSM2's configuration unreadable: exit 78 with the reason, not restarted"
	gpasswd -d keybroker softhsm >/dev/null
	systemctl start keybroker.socket
	systemctl start $unit && fail "started without access to SoftHSM2's configuration"
	wait_for 10 "failed" systemctl is-failed --quiet $unit || { journal; fail "not failed: $(systemctl is-active $unit)"; }
	status=$(systemctl show -P ExecMainStatus $unit)
	[[ $status == 78 ]] || { journal; fail "exit status $status, want 78"; }
	[[ $(systemctl show -P NRestarts $unit) == 0 ]] || { journal; fail "restarted $(systemctl show -P NRestarts $unit) times"; }
	journalctl --no-pager -u $unit >"$tmp/journal"
	grep -q 'cannot read its configuration file: open /etc/softhsm/softhsm2.conf: permission denied' "$tmp/journal" ||
		{ journal; fail "the journal does not say SoftHSM2 cannot read its configuration file"; }
	gpasswd -a keybroker softhsm >/dev/null
	systemctl reset-failed $unit
	systemctl start $unit || { journal; fail "no start after the fix"; }
	[[ $("${ctl[@]}" health) == SERVING ]] || { journal; fail "not SERVING after the fix"; }
	echo "readme-check: the service installs as the README says and runs under systemd" >&2
}

case "${1:-}" in
run) check_run ;;
cluster) check_cluster ;;
service) check_service ;;
*)
	echo "usage: $0 run|cluster|service" >&2
	exit 2
	;;
esac
