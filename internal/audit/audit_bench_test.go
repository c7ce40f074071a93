package audit

import (
	"context"
	"encoding/json"
	"path/filepath"
	"testing"
	"time"
)

// The audit record of every RPC: its encoding, and Write with group
// commit on a discarding sink and on a real file (one fsync per batch):
//
//	go test -run '^$' -bench . -benchmem ./internal/audit/

func benchRecord() Record {
	return Record{
		Time:         time.Date(2026, 1, 2, 3, 4, 5, 6, time.UTC),
		RequestID:    "0123456789abcdef0123456789abcdef",
		Tenant:       "payments",
		Caller:       "uid:1000 gid:1000",
		Method:       "/keybroker.v1.KeyBroker/Sign",
		Key:          "api-pop",
		Version:      3,
		Kid:          "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs",
		Alg:          "ES256",
		DigestSHA256: DigestSHA256([]byte("0123456789abcdef0123456789abcdef")),
		Code:         "OK",
		LatencyMS:    0.412,
		Prev:         ZeroHash,
	}
}

func BenchmarkRecordEncode(b *testing.B) {
	r := benchRecord()
	b.ReportAllocs()
	for b.Loop() {
		if _, err := json.Marshal(r); err != nil {
			b.Fatal(err)
		}
	}
}

type discardSink struct{}

func (discardSink) Write(p []byte) (int, error) { return len(p), nil }
func (discardSink) Sync() error                 { return nil }

func benchWrite(b *testing.B, l *Log, parallelism int) {
	r := benchRecord()
	ctx := context.Background()
	b.ReportAllocs()
	b.SetParallelism(parallelism)
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			if err := l.Write(ctx, r); err != nil {
				b.Fatal(err)
			}
		}
	})
}

func BenchmarkWriteDiscard(b *testing.B) {
	l, err := Open("", Options{Sink: discardSink{}})
	if err != nil {
		b.Fatal(err)
	}
	defer l.Close()
	benchWrite(b, l, 8)
}

// BenchmarkWriteFile: with p writers per CPU, one fsync covers the
// records of every writer waiting, so ns/op falls as p grows.
func BenchmarkWriteFile(b *testing.B) {
	for _, p := range []int{1, 8, 32} {
		b.Run("writers="+itoa(p)+"xCPU", func(b *testing.B) {
			l, err := Open(filepath.Join(b.TempDir(), "audit.jsonl"), Options{Timeout: 10 * time.Second})
			if err != nil {
				b.Fatal(err)
			}
			defer l.Close()
			benchWrite(b, l, p)
		})
	}
}

func itoa(n int) string {
	b, _ := json.Marshal(n)
	return string(b)
}
