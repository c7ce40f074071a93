// Package docs holds keybroker's documentation beyond the README; its test
// checks that the README and these pages name only things that exist.
package docs

import (
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"github.com/keybroker/keybroker/internal/config"
)

// pages are the documents checked, relative to the repository root.
var pages = []string{"README.md", "docs/api.md", "docs/design.md", "docs/operations.md", "docs/performance.md"}

func read(t *testing.T, page string) string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("..", page))
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// TestReadmeSize: the README is a manual, not a notebook.
func TestReadmeSize(t *testing.T) {
	if n := len(read(t, "README.md")); n >= 15*1024 {
		t.Errorf("README.md is %d bytes, want under 15 KiB: move reference material to docs/", n)
	}
}

var (
	// repoPath is a `quoted` path inside the repository: lowercase first
	// letter, at least one slash, no spaces.
	repoPath = regexp.MustCompile("`((?:api|client|cmd|deploy|docs|examples|hsm|internal|pop|rotation|scripts|softhsm|tpm)/[A-Za-z0-9_./-]*)`")
	mdLink   = regexp.MustCompile(`\]\(([^)#\s]+\.md)(#[^)\s]+)?\)`)
	anchor   = regexp.MustCompile(`\]\((#[^)\s]+)\)`)
	makeCmd  = regexp.MustCompile("`make ([a-z-]+)")
)

// TestPathsExist: every repository path and every link to a page (and its
// anchor) that the documents name exists.
func TestPathsExist(t *testing.T) {
	for _, page := range pages {
		text := read(t, page)
		for _, m := range repoPath.FindAllStringSubmatch(text, -1) {
			p := strings.TrimSuffix(m[1], "/")
			if _, err := os.Stat(filepath.Join("..", p)); err != nil {
				t.Errorf("%s names %s, which does not exist", page, m[1])
			}
		}
		for _, m := range mdLink.FindAllStringSubmatch(text, -1) {
			target := filepath.Join(filepath.Dir(page), m[1])
			body, err := os.ReadFile(filepath.Join("..", target))
			if err != nil {
				t.Errorf("%s links to %s, which does not exist", page, m[1])
				continue
			}
			if m[2] != "" && !hasAnchor(string(body), m[2]) {
				t.Errorf("%s links to %s%s: no such heading there", page, m[1], m[2])
			}
		}
		for _, m := range anchor.FindAllStringSubmatch(text, -1) {
			if !hasAnchor(text, m[1]) {
				t.Errorf("%s links to %s: no such heading in it", page, m[1])
			}
		}
	}
}

// hasAnchor reports whether a heading of text has the GitHub anchor a
// ("#lowercase-words-with-dashes").
func hasAnchor(text, a string) bool {
	for _, line := range strings.Split(text, "\n") {
		h, ok := strings.CutPrefix(line, "#")
		if !ok {
			continue
		}
		h = strings.TrimSpace(strings.TrimLeft(h, "#"))
		var b strings.Builder
		for _, r := range strings.ToLower(h) {
			switch {
			case r >= 'a' && r <= 'z', r >= '0' && r <= '9', r == '-', r == '_':
				b.WriteRune(r)
			case r == ' ':
				b.WriteRune('-')
			}
		}
		if "#"+b.String() == a {
			return true
		}
	}
	return false
}

// TestMakeTargetsExist: every `make TARGET` the documents name is a target
// of the Makefile.
func TestMakeTargetsExist(t *testing.T) {
	makefile := read(t, "Makefile")
	for _, page := range pages {
		for _, m := range makeCmd.FindAllStringSubmatch(read(t, page), -1) {
			if !regexp.MustCompile(`(?m)^` + regexp.QuoteMeta(m[1]) + `:`).MatchString(makefile) {
				t.Errorf("%s names `make %s`, which the Makefile does not have", page, m[1])
			}
		}
	}
}

// TestConfigExamplesParse: every YAML configuration in the documents is
// one the daemon accepts (unknown keys are errors), shell substitutions
// replaced by a value.
func TestConfigExamplesParse(t *testing.T) {
	block := regexp.MustCompile("(?s)```yaml\n(.*?)```|<<YAML\n(.*?)\nYAML")
	subst := regexp.MustCompile(`\$\([^)]*\)`)
	n := 0
	for _, page := range pages {
		for _, m := range block.FindAllStringSubmatch(read(t, page), -1) {
			y := m[1] + m[2]
			y = subst.ReplaceAllString(y, "1000")
			n++
			if _, err := config.Parse(strings.NewReader(y)); err != nil {
				t.Errorf("%s: a configuration example is refused: %v\n%s", page, err, y)
			}
		}
	}
	if n == 0 {
		t.Fatal("no configuration example found")
	}
}
