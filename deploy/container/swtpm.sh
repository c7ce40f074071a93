#!/bin/sh
# swtpm.sh — the swtpm container's entrypoint: a TPM 2.0 simulator on a unix
# socket (keybroker's tpm.socket). deploy/container_test.go runs it as it is.
#   SWTPM_STATE   TPM state directory (default /var/lib/swtpm)
#   SWTPM_SOCKET  socket to serve on (default /run/swtpm/swtpm.sock)
set -eu
state=${SWTPM_STATE:-/var/lib/swtpm}
socket=${SWTPM_SOCKET:-/run/swtpm/swtpm.sock}
mkdir -p "$state" "$(dirname "$socket")"
rm -f "$socket" "$socket.ctrl"
echo "swtpm: serving on $socket"
exec swtpm socket --tpm2 --tpmstate dir="$state" \
	--server type=unixio,path="$socket" --ctrl type=unixio,path="$socket.ctrl" \
	--flags not-need-init,startup-clear
