#!/bin/sh
# softhsm.sh — the softhsm container's entrypoint: make the SoftHSM2 token
# "keybroker" on first start, then serve it with `p11-kit server` on a unix
# socket. deploy/container_test.go runs this script as it is.
#   KEYBROKER_PIN_FILE   token user PIN (default /run/secrets/pkcs11.pin)
#   SOFTHSM_TOKENS       token directory (default /var/lib/softhsm/tokens)
#   P11KIT_SOCKET        socket to serve on (default /run/p11-kit/p11kit.sock)
set -eu
pin_file=${KEYBROKER_PIN_FILE:-/run/secrets/pkcs11.pin}
tokens=${SOFTHSM_TOKENS:-/var/lib/softhsm/tokens}
socket=${P11KIT_SOCKET:-/run/p11-kit/p11kit.sock}
module=${SOFTHSM_MODULE:-/usr/lib/softhsm/libsofthsm2.so}

mkdir -p "$tokens" "$(dirname "$socket")"
# A socket left on the volume by the last run would pass the healthcheck
# (compose.yaml) before the server is up.
rm -f "$socket"
export SOFTHSM2_CONF="$(dirname "$tokens")/softhsm2.conf"
printf 'directories.tokendir = %s\nobjectstore.backend = file\nlog.level = ERROR\n' "$tokens" >"$SOFTHSM2_CONF"
if ! softhsm2-util --show-slots | grep -q 'Label:[[:space:]]*keybroker[[:space:]]*$'; then
	pin=$(tr -d '\r\n' <"$pin_file")
	so_pin=$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')
	softhsm2-util --init-token --free --label keybroker --pin "$pin" --so-pin "$so_pin" >/dev/null
	echo "softhsm: token keybroker created in $tokens"
fi
echo "softhsm: serving token keybroker on $socket"
exec p11-kit server --foreground --provider "$module" --name "$socket" "pkcs11:token=keybroker"
