# Turns scripts/bench.sh's results (one JSON object per line, slurped) into
# one Markdown table, with each target (issue 18's) and whether it was met.
def n0: if . == null then "-" else (. | round | tostring) end;
def n2: if . == null then "-" else ((. * 100 | round) / 100 | tostring) end;
def yes($ok): if $ok then "met" else "**missed**" end;
def target:
  if .label == "SoftHSM2 SignStream" and .daemon.algorithm == "ES256" and .daemon.concurrency == 16 then
    "ratio ≥ 0.50: " + yes(.ratio >= 0.50)
  elif (.label == "SoftHSM2 Sign" or .label == "SoftHSM2 SignStream") and .daemon.algorithm == "RS256" and .daemon.concurrency == 16 then
    "ratio ≥ 0.85 (unary or stream): " + yes(.ratio >= 0.85)
  elif .label == "SoftHSM2 Sign" and .daemon.algorithm == "ES256" and .daemon.concurrency == 16 then
    "ratio ≥ 0.35: " + yes(.ratio >= 0.35)
  elif .label == "SoftHSM2 Sign" and .daemon.algorithm == "ES256" and .daemon.concurrency == 4 then
    "p99 ≤ 3 ms: " + yes(.daemon.p99_ms <= 3)
  elif .label == "SoftHSM2 Sign" and .daemon.algorithm == "ES256" and .daemon.concurrency == 1 then
    (.daemon.p50_ms - .baseline.p50_ms) as $d
    | "adds \($d | n2) ms to the in-process p50 (≤ 0.35: \(yes($d <= 0.35)))"
  elif .label == "swtpm Sign" and .daemon.concurrency == 4 then
    "ratio ≥ 0.85: " + yes(.ratio >= 0.85)
  elif .label == "gRPC floor: health Check" then
    "(not a target: gRPC alone on this machine)"
  elif .label == "vs p11-kit remoting" and .daemon.algorithm == "ES256" then
    "\(.daemon.rpc): "
    + "keybroker / peer ≥ 1.5 (in-process column: the peer): " + yes(.ratio >= 1.5)
  elif .label == "vs p11-kit remoting" then
    "\(.daemon.rpc): keybroker / peer ≥ 1.0 (in-process column: the peer): " + yes(.ratio >= 1.0)
  elif .batch_count != null then
    "\(.batch_sum | n0) records in \(.batch_count | n0) commits: \(if .batch_count > 0 then (.batch_sum / .batch_count | n2) else "-" end) records per write + fsync (not a target)"
  elif .label == "etcd store Sign" then
    ((.etcd_ops_per_sec / .bbolt_ops_per_sec) as $r
     | "etcd \(.etcd_ops_per_sec | n0)/s vs bbolt \(.bbolt_ops_per_sec | n0)/s (2 rounds each): \($r | n2) (within 5 %: \(yes($r >= 0.95)))")
  elif .label == "JWKS over HTTPS" then
    "≥ 20,000/s: \(yes(.daemon.ops_per_sec >= 20000)); a handler that only writes the bytes: \(.floor_ops_per_sec | n0)/s"
  elif .label == "GetJWKS" then
    "≥ 20,000/s: " + yes(.daemon.ops_per_sec >= 20000)
  elif .ready_s != null then
    ((.daemon.ops_per_sec / .single_key_ops_per_sec) as $r
     | "ready \(.ready_s | n2) s (≤ 3: \(yes(.ready_s <= 3))); RSS \(.rss_kb / 1024 | n0) MB, peak \(.hwm_kb / 1024 | n0) MB (≤ 300: \(yes(.hwm_kb <= 300 * 1024))); vs single key \(.single_key_ops_per_sec | n0)/s: \($r | n2) (≥ 0.90: \(yes($r >= 0.90)))")
  else "" end;
"| case | alg | clients | in-process ops/s | daemon ops/s | daemon / in-process | daemon p50 / p95 / p99 ms | errors | target |",
"|---|---|---:|---:|---:|---:|---|---:|---|",
(.[] | "| \(.label) | \(.daemon.algorithm // "-") | \(.daemon.concurrency // "-") | \(.baseline.ops_per_sec | n0) | \(.daemon.ops_per_sec | n0) | \(.ratio | n2) | \(.daemon.p50_ms // "-") / \(.daemon.p95_ms // "-") / \(.daemon.p99_ms // "-") | \(.daemon.errors + (.baseline.errors // 0)) | \(target) |")
