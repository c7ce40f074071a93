#!/usr/bin/env bash
# Generates the Go code for api/proto into OUT (default: the source tree).
# The plugins are pinned as tool dependencies in go.mod; protoc comes from the
# protobuf-compiler package and the well-known .proto files it imports from
# libprotobuf-dev (scripts/install-deps.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-api/proto}
bin=$(mktemp -d)
trap 'rm -rf "$bin"' EXIT
command -v protoc >/dev/null || { echo "protoc not found: run scripts/install-deps.sh (package protobuf-compiler)" >&2; exit 1; }
wkt=/usr/include/google/protobuf/duration.proto
[ -f "$wkt" ] || { echo "$wkt not found: run scripts/install-deps.sh (package libprotobuf-dev)" >&2; exit 1; }
go build -o "$bin/" google.golang.org/protobuf/cmd/protoc-gen-go google.golang.org/grpc/cmd/protoc-gen-go-grpc
mkdir -p "$out"
protoc -I api/proto \
  --plugin=protoc-gen-go="$bin/protoc-gen-go" --plugin=protoc-gen-go-grpc="$bin/protoc-gen-go-grpc" \
  --go_out="$out" --go_opt=paths=source_relative \
  --go-grpc_out="$out" --go-grpc_opt=paths=source_relative \
  $(find api/proto -name '*.proto' | sort)
