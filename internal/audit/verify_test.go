package audit

import (
	"bytes"
	"encoding/json"
	"errors"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"
)

// sampleLog writes n records to a new log and returns its bytes and head.
func sampleLog(t testing.TB, n int) ([]byte, Head) {
	t.Helper()
	path := writeLog(t, n)
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	head, err := ReadHead(path + ".head")
	if err != nil {
		t.Fatal(err)
	}
	if got, err := Verify(bytes.NewReader(b), &head); err != nil || got != n {
		t.Fatalf("Verify of the sample log = %d, %v; want %d, nil", got, err, n)
	}
	return b, head
}

// join joins lines that keep their newlines.
func join(ls [][]byte) []byte { return bytes.Join(ls, nil) }

// editJSON changes, in a copy of line, one digit of latency_ms (digit) or
// one letter of the tenant, so that the line stays valid JSON.
func editJSON(rng *rand.Rand, line []byte, digit bool) []byte {
	field, isPart := `"tenant":"`, func(c byte) bool { return c >= 'a' && c <= 'z' }
	if digit {
		field, isPart = `"latency_ms":`, func(c byte) bool { return c >= '0' && c <= '9' || c == '.' }
	}
	start := bytes.Index(line, []byte(field)) + len(field)
	end := start
	for isPart(line[end]) {
		end++
	}
	var positions []int
	for i := start; i < end; i++ {
		// Not the leading digit: "10.75" must not become "00.75".
		if line[i] != '.' && !(digit && i == start) {
			positions = append(positions, i)
		}
	}
	out := slices.Clone(line)
	i := positions[rng.IntN(len(positions))]
	for out[i] == line[i] {
		if digit {
			out[i] = '0' + byte(rng.IntN(10))
		} else {
			out[i] = 'a' + byte(rng.IntN(26))
		}
	}
	return out
}

// TestVerifyDetectsMutations applies 1,000 random mutations, each to a
// fresh copy of a verified log, and checks that Verify (with the head)
// detects every one.
func TestVerifyDetectsMutations(t *testing.T) {
	const mutations, records = 1000, 60
	orig, head := sampleLog(t, records)
	origLines := lines(t, orig)
	const seed = 20260817
	rng := rand.New(rand.NewPCG(seed, seed))
	t.Logf("seed %d", seed)

	kinds := []struct {
		name   string
		mutate func() []byte
	}{
		{"edit a byte", func() []byte {
			ls := slices.Clone(origLines)
			i := rng.IntN(len(ls))
			line := slices.Clone(ls[i])
			pos := rng.IntN(len(line) - 1) // not the newline
			old := line[pos]
			for line[pos] == old {
				line[pos] = byte(rng.IntN(256))
			}
			ls[i] = line
			return join(ls)
		}},
		{"edit a latency digit or tenant letter, valid JSON", func() []byte {
			ls := slices.Clone(origLines)
			i := rng.IntN(len(ls))
			ls[i] = editJSON(rng, ls[i], rng.IntN(2) == 0)
			if !json.Valid(bytes.TrimSuffix(ls[i], []byte("\n"))) {
				t.Fatalf("JSON-preserving edit made invalid JSON: %s", ls[i])
			}
			return join(ls)
		}},
		{"delete a line", func() []byte {
			i := rng.IntN(len(origLines))
			return join(slices.Delete(slices.Clone(origLines), i, i+1))
		}},
		{"swap two lines", func() []byte {
			ls := slices.Clone(origLines)
			i, j := rng.IntN(len(ls)), rng.IntN(len(ls)-1)
			if j >= i {
				j++
			}
			ls[i], ls[j] = ls[j], ls[i]
			return join(ls)
		}},
		{"duplicate a line", func() []byte {
			i, j := rng.IntN(len(origLines)), rng.IntN(len(origLines)+1)
			return join(slices.Insert(slices.Clone(origLines), j, origLines[i]))
		}},
		{"truncate at a random offset", func() []byte {
			return slices.Clone(orig[:rng.IntN(len(orig))])
		}},
		{"remove trailing lines", func() []byte {
			return join(origLines[:rng.IntN(len(origLines))])
		}},
	}

	detected := make(map[string]int)
	total := 0
	for i := range mutations {
		k := kinds[i%len(kinds)]
		m := k.mutate()
		if bytes.Equal(m, orig) {
			t.Fatalf("mutation %d (%s) left the log unchanged", i, k.name)
		}
		_, err := Verify(bytes.NewReader(m), &head)
		var verr *VerifyError
		switch {
		case err == nil:
			t.Errorf("mutation %d (%s) not detected; log:\n%s", i, k.name, m)
		case !errors.As(err, &verr):
			t.Errorf("mutation %d (%s): %v, want a *VerifyError", i, k.name, err)
		case verr.Line < 1 || verr.Line > records+1:
			t.Errorf("mutation %d (%s): %v: line %d out of range", i, k.name, err, verr.Line)
		default:
			detected[k.name]++
			total++
		}
	}
	t.Logf("detected: %v", detected)
	if total != mutations {
		t.Errorf("detected %d of %d mutations", total, mutations)
	}
}

func TestVerifyErrors(t *testing.T) {
	orig, head := sampleLog(t, 5)
	ls := lines(t, orig)

	edit := func(i int, from, to string) []byte {
		c := slices.Clone(ls)
		c[i] = []byte(strings.Replace(string(c[i]), from, to, 1))
		if bytes.Equal(c[i], ls[i]) {
			t.Fatalf("edit of line %d: no %q", i+1, from)
		}
		return join(c)
	}
	del := func(i int) []byte { return join(slices.Delete(slices.Clone(ls), i, i+1)) }

	tests := []struct {
		name     string
		log      []byte
		noHead   bool
		wantLine int
		wantSeq  uint64
		want     string // in Reason; "" for no error
		wantN    int
	}{
		{"intact", orig, false, 0, 0, "", 5},
		{"intact, no head", orig, true, 0, 0, "", 5},
		{"edited tenant", edit(1, `"globex"`, `"globey"`), false, 3, 3, "prev hash mismatch", 2},
		{"edited prev", edit(2, `"prev":"`, `"prev":"0`), false, 3, 3, "prev hash mismatch", 2},
		{"last line edited", edit(4, `"globex"`, `"globey"`), false, 5, 5, "hash mismatch with the head", 5},
		// Without the head, an edit of the last line cannot be seen.
		{"last line edited, no head", edit(4, `"globex"`, `"globey"`), true, 0, 0, "", 5},
		{"deleted", del(2), false, 3, 4, "seq: got 4, want 3 (a line is missing", 2},
		{"deleted first", del(0), false, 1, 2, "seq: got 2, want 1", 0},
		{"swapped", join([][]byte{ls[0], ls[2], ls[1], ls[3], ls[4]}), false, 2, 3, "seq: got 3, want 2", 1},
		{"duplicated", join([][]byte{ls[0], ls[1], ls[1], ls[2], ls[3], ls[4]}), false, 3, 2, "seq: got 2, want 3 (a line is duplicated", 2},
		{"cut inside line 4", orig[:len(join(ls[:3]))+20], false, 4, 4, "truncated record", 3},
		{"cut inside line 4, no head", orig[:len(join(ls[:3]))+20], true, 4, 4, "truncated record", 3},
		{"last newline removed", orig[:len(orig)-1], false, 5, 5, "truncated record", 4},
		{"trailing lines removed", join(ls[:3]), false, 4, 4, "missing: the log ends after seq 3 but its head is at seq 5", 3},
		{"trailing lines removed, no head", join(ls[:3]), true, 0, 0, "", 3},
		{"emptied", nil, false, 1, 1, "missing: the log ends after seq 0", 0},
		// Another log's head at the same seq: same seqs, other hashes.
		{"another log's head", orig, false, 5, 5, "hash mismatch with the head", 5},
		{"not JSON", edit(1, `{`, `[`), false, 2, 2, "not a valid record: not a JSON object", 1},
		{"broken JSON", edit(1, `"seq":2,`, `"seq":2`), false, 2, 2, "not a valid record: invalid character", 1},
		{"unknown field", edit(1, `"seq":2,`, `"seq":2,"pin":"1234",`), false, 2, 2, `unknown field "pin"`, 1},
		{"data after the object", edit(1, "}\n", "}{}\n"), false, 2, 2, "data after the JSON object", 1},
		{"empty line", join([][]byte{ls[0], []byte("\n"), ls[1]}), false, 2, 2, "not a JSON object", 1},
		{"CRLF", edit(0, "}\n", "}\r\n"), false, 2, 2, "prev hash mismatch", 1},
	}
	_, otherHead := sampleLog(t, 5)
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h := &head
			if tt.noHead {
				h = nil
			}
			if tt.name == "another log's head" {
				h = &otherHead
			}
			n, err := Verify(bytes.NewReader(tt.log), h)
			if n != tt.wantN {
				t.Errorf("Verify returned %d records, want %d", n, tt.wantN)
			}
			if tt.want == "" {
				if err != nil {
					t.Errorf("Verify: %v, want nil", err)
				}
				return
			}
			var verr *VerifyError
			if !errors.As(err, &verr) {
				t.Fatalf("Verify: %v, want a *VerifyError", err)
			}
			if verr.Line != tt.wantLine || verr.Seq != tt.wantSeq || !strings.Contains(verr.Reason, tt.want) {
				t.Errorf("Verify: %v; want line %d, seq %d, %q", err, tt.wantLine, tt.wantSeq, tt.want)
			}
		})
	}
}

func TestVerifyErrorText(t *testing.T) {
	err := &VerifyError{Line: 17, Seq: 17, Reason: "prev hash mismatch: got a, want b"}
	if got, want := err.Error(), "line 17 (seq 17): prev hash mismatch: got a, want b"; got != want {
		t.Errorf("Error() = %q, want %q", got, want)
	}
}

// errReader fails after its data.
type errReader struct {
	data []byte
	err  error
}

func (r *errReader) Read(p []byte) (int, error) {
	if len(r.data) == 0 {
		return 0, r.err
	}
	n := copy(p, r.data)
	r.data = r.data[n:]
	return n, nil
}

func TestVerifyReadError(t *testing.T) {
	orig, _ := sampleLog(t, 3)
	boom := errors.New("boom")
	n, err := Verify(&errReader{data: orig[:len(orig)-5], err: boom}, nil)
	if !errors.Is(err, boom) || errors.As(err, new(*VerifyError)) {
		t.Errorf("Verify of a failing reader: %v, want the read error, not a VerifyError", err)
	}
	if n != 2 {
		t.Errorf("Verify of a failing reader counted %d records, want 2", n)
	}
}

// TestVerifyUnanchoredTail checks what follows the head: records that chain
// on and a torn last line are an unanchored tail, not an error; anything
// else wrong, at the head or after it, still is.
func TestVerifyUnanchoredTail(t *testing.T) {
	b, _ := sampleLog(t, 8)
	ls := lines(t, b)
	// The head as it was when the log had 5 records.
	head := Head{Seq: 5, Hash: lineHash(ls[4])}
	cut := func(line []byte, n int) []byte { return slices.Clone(line[:n]) }
	edit := func(i int, from, to string) [][]byte {
		c := slices.Clone(ls)
		c[i] = []byte(strings.Replace(string(c[i]), from, to, 1))
		if bytes.Equal(c[i], ls[i]) {
			t.Fatalf("edit of line %d: no %q", i+1, from)
		}
		return c
	}
	cat := func(parts ...[]byte) []byte { return bytes.Join(parts, nil) }

	tests := []struct {
		name     string
		log      []byte
		head     *Head
		want     Result
		wantErr  string // in the VerifyError; "" for none
		wantLine int
	}{
		{"nothing after the head", join(ls[:5]), &head, Result{Records: 5}, "", 0},
		{"one record after the head", join(ls[:6]), &head, Result{Records: 6, AfterHead: 1}, "", 0},
		{"records after the head", b, &head, Result{Records: 8, AfterHead: 3}, "", 0},
		{"torn line right after the head", cat(join(ls[:5]), cut(ls[5], 30)), &head, Result{Records: 5, Torn: true}, "", 0},
		{"records then a torn line", cat(join(ls[:7]), cut(ls[7], len(ls[7])-1)), &head, Result{Records: 7, AfterHead: 2, Torn: true}, "", 0},
		{"records after an empty log's head", b, &Head{0, ZeroHash}, Result{Records: 8, AfterHead: 8}, "", 0},
		{"no head: torn line", cat(join(ls[:7]), cut(ls[7], 30)), nil, Result{Records: 7}, "truncated record", 8},
		{"no head: records", b, nil, Result{Records: 8}, "", 0},

		{"head line edited, records after", join(edit(4, `"globex"`, `"globey"`)), &head, Result{Records: 5}, "prev hash mismatch", 6},
		{"head line edited, torn line after", cat(join(edit(4, `"globex"`, `"globey"`)[:5]), cut(ls[5], 30)), &head, Result{Records: 5}, "hash mismatch with the head", 5},
		{"head hash wrong", b, &Head{5, strings.Repeat("ab", 32)}, Result{Records: 8}, "hash mismatch with the head", 5},
		{"record after the head edited", join(edit(6, `"acme"`, `"acne"`)), &head, Result{Records: 7}, "prev hash mismatch", 8},
		{"record after the head removed", join(slices.Delete(slices.Clone(ls), 5, 6)), &head, Result{Records: 5}, "seq: got 7, want 6", 6},
		{"not a record after the head", cat(join(ls[:6]), []byte("garbage\n")), &head, Result{Records: 6}, "not a valid record", 7},
		{"torn line before the head", cat(join(ls[:3]), cut(ls[3], 30)), &head, Result{Records: 3}, "truncated record", 4},
		{"head line's newline removed", cat(join(ls[:4]), cut(ls[4], len(ls[4])-1)), &head, Result{Records: 4}, "truncated record", 5},
		{"cut before the head", join(ls[:4]), &head, Result{Records: 4}, "missing", 5},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			res, err := VerifyLog(bytes.NewReader(tt.log), tt.head)
			tt.want.LastSeq = uint64(tt.want.Records) // no breaks: seqs are line numbers
			if !reflect.DeepEqual(res, tt.want) {
				t.Errorf("VerifyLog = %+v, want %+v", res, tt.want)
			}
			if n, verr := Verify(bytes.NewReader(tt.log), tt.head); n != tt.want.Records || (verr == nil) != (err == nil) {
				t.Errorf("Verify = %d, %v; want VerifyLog's %d, %v", n, verr, tt.want.Records, err)
			}
			if unanchored := tt.want.AfterHead > 0 || tt.want.Torn; res.Unanchored() != unanchored {
				t.Errorf("Unanchored() = %t, want %t", res.Unanchored(), unanchored)
			}
			if tt.wantErr == "" {
				if err != nil {
					t.Errorf("VerifyLog: %v, want nil", err)
				}
				return
			}
			var verr *VerifyError
			if !errors.As(err, &verr) || verr.Line != tt.wantLine || !strings.Contains(verr.Reason, tt.wantErr) {
				t.Errorf("VerifyLog: %v; want a VerifyError at line %d, %q", err, tt.wantLine, tt.wantErr)
			}
		})
	}
}

// TestVerifyLiveLog verifies a log while it is written, as keybrokerctl
// does: the head file first, then the log up to its size at that time.
// Records past the head and a line being written are an unanchored tail,
// not tampering.
func TestVerifyLiveLog(t *testing.T) {
	path := filepath.Join(t.TempDir(), "audit.log")
	l := openLog(t, path, Options{})
	// Writers paced so that the log stays small: Verify reads all of it
	// each time, much slower than records are written.
	const writers, perWriter, verifications = 4, 500, 20
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for w := range writers {
		wg.Go(func() {
			for i := w * perWriter; i < (w+1)*perWriter; i++ {
				select {
				case <-stop:
					return
				case <-time.After(time.Millisecond):
				}
				if err := l.Write(t.Context(), record(i)); err != nil {
					t.Errorf("Write: %v", err)
					return
				}
			}
		})
	}
	defer func() {
		close(stop)
		wg.Wait()
	}()
	unanchored, lastRecords := 0, 0
	for i := range verifications {
		time.Sleep(2 * time.Millisecond)
		head, err := ReadHead(path + ".head")
		if err != nil {
			t.Fatal(err)
		}
		f, err := os.Open(path)
		if err != nil {
			t.Fatal(err)
		}
		fi, err := f.Stat()
		if err != nil {
			t.Fatal(err)
		}
		res, err := VerifyLog(io.LimitReader(f, fi.Size()), &head)
		f.Close()
		if err != nil {
			t.Fatalf("verification %d of a live, untampered log: %v", i, err)
		}
		if res.Records < int(head.Seq) || res.AfterHead != res.Records-int(head.Seq) {
			t.Fatalf("verification %d: %+v with the head at seq %d", i, res, head.Seq)
		}
		if res.Unanchored() {
			unanchored++
		}
		lastRecords = res.Records
	}
	t.Logf("%d of %d verifications found records after the head (last: %d records)", unanchored, verifications, lastRecords)
}

// TestVerifyBreaks: a Break record starts a new segment, reported with the
// records it says are missing; one that does not follow its own Break, or
// goes back before the line before it, is an error.
func TestVerifyBreaks(t *testing.T) {
	b, _ := sampleLog(t, 3)
	ls := lines(t, b)
	after := Head{Seq: 5, Hash: strings.Repeat("ab", 32)}
	brk := func(after Head, seq uint64, prev string) []byte {
		r := breakRecord(after, "the log file was cut", time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC))
		r.Seq, r.Prev = seq, prev
		line, _, err := encodeLine(r)
		if err != nil {
			t.Fatal(err)
		}
		return line
	}
	good := brk(after, 6, after.Hash)
	goodHash := lineHash(good[:len(good)-1])
	next := record(9)
	next.Seq, next.Prev = 7, goodHash
	nextLine, _, err := encodeLine(next)
	if err != nil {
		t.Fatal(err)
	}

	res, err := VerifyLog(bytes.NewReader(bytes.Join([][]byte{join(ls), good, nextLine}, nil)), nil)
	if err != nil || res.Records != 5 || res.LastSeq != 7 || len(res.Breaks) != 1 {
		t.Fatalf("VerifyLog = %+v, %v; want 5 records up to seq 7 and one break", res, err)
	}
	if br := res.Breaks[0]; br.Line != 4 || br.Seq != 6 || br.First != 4 || br.Last != 5 ||
		br.String() != "line 4 (seq 6) starts a new segment: the log file was cut; records 4 to 5 are missing" {
		t.Errorf("break = %+v (%s)", br, br)
	}

	for _, tt := range []struct {
		name string
		line []byte
		want string
	}{
		{"seq not after its break", brk(after, 7, after.Hash), "do not follow"},
		{"prev not its break's hash", brk(after, 6, ZeroHash), "do not follow"},
		{"goes back", brk(Head{Seq: 1, Hash: after.Hash}, 2, after.Hash), "goes back before seq 3"},
	} {
		_, err := VerifyLog(bytes.NewReader(append(join(ls), tt.line...)), nil)
		var verr *VerifyError
		if !errors.As(err, &verr) || verr.Line != 4 || !strings.Contains(verr.Reason, tt.want) {
			t.Errorf("%s: VerifyLog: %v, want a VerifyError at line 4, %q", tt.name, err, tt.want)
		}
	}
}
