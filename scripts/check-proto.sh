#!/usr/bin/env bash
# Fails when the committed generated code differs from what scripts/protogen.sh
# makes from the .proto files. The protoc version line is ignored, so that a
# different protoc patch release does not count as stale.
set -euo pipefail
cd "$(dirname "$0")/.."
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
scripts/protogen.sh "$tmp"
strip() { grep -v '^//[[:space:]]*protoc[[:space:]]' "$1"; }
stale=0
while IFS= read -r f; do
  rel=${f#"$tmp"/}
  if [ ! -f "api/proto/$rel" ] || ! diff -q <(strip "$f") <(strip "api/proto/$rel") >/dev/null; then
    echo "stale generated code: api/proto/$rel (run 'make proto' and commit)" >&2
    stale=1
  fi
done < <(find "$tmp" -name '*.go')
while IFS= read -r f; do
  [ -f "$tmp/${f#api/proto/}" ] || { echo "generated file without a .proto: $f" >&2; stale=1; }
done < <(find api/proto -name '*.pb.go')
exit $stale
