#!/usr/bin/env bash
# Dev mode, what `make run` runs: keybrokerd in the foreground under
# .keybroker/dev/ on SoftHSM2 (BACKEND=pkcs11, the default) or on swtpm
# (BACKEND=tpm, started here and stopped when the daemon stops).
set -euo pipefail
cd "$(dirname "$0")/.."
backend=${BACKEND:-pkcs11}
dir=.keybroker/dev
case "$backend" in
pkcs11)
	scripts/install-deps.sh softhsm2
	exec bin/keybrokerd --dev --dev-dir "$dir"
	;;
tpm)
	scripts/install-deps.sh swtpm swtpm-tools
	mkdir -p "$dir/swtpm/state"
	sock="$dir/swtpm/swtpm.sock"
	ctrl="$dir/swtpm/ctrl.sock"
	rm -f "$sock" "$ctrl"
	swtpm socket --tpm2 --tpmstate dir="$dir/swtpm/state" \
		--server type=unixio,path="$sock" --ctrl type=unixio,path="$ctrl" \
		--flags not-need-init,startup-clear &
	swtpm_pid=$!
	trap 'kill "$swtpm_pid" 2>/dev/null; wait "$swtpm_pid" 2>/dev/null || true' EXIT
	for _ in $(seq 100); do
		[ -S "$sock" ] && break
		sleep 0.1
	done
	[ -S "$sock" ] || { echo "dev-run: swtpm did not start" >&2; exit 1; }
	bin/keybrokerd --dev --dev-dir "$dir" --backend tpm
	;;
*)
	echo "dev-run: BACKEND=$backend: want pkcs11 or tpm" >&2
	exit 2
	;;
esac
