package audit

import (
	"bytes"
	"testing"
)

// FuzzVerify: any file content is verified or refused without a panic; a
// file that verifies has as many records as lines.
func FuzzVerify(f *testing.F) {
	f.Add([]byte(`{"seq":1,"time":"2026-01-01T00:00:00Z","request_id":"r","method":"/m","code":"OK","latency_ms":1,"prev":"0000000000000000000000000000000000000000000000000000000000000000"}` + "\n"))
	f.Add([]byte("{}\n{}\n"))
	f.Add([]byte("not json"))
	f.Fuzz(func(t *testing.T, b []byte) {
		n, err := Verify(bytes.NewReader(b), nil)
		if err == nil && n != bytes.Count(b, []byte("\n")) {
			t.Fatalf("verified %d records in %d lines", n, bytes.Count(b, []byte("\n")))
		}
	})
}
