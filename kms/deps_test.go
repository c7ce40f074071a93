package kms_test

import (
	"go/parser"
	"go/token"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
)

const module = "github.com/keybroker/keybroker/"

// publicRules are the packages outsiders can import, and the module
// packages each may import: none of them may import internal/, so that
// they are usable as libraries (kms is the contract, the backends implement
// it, rotation decides on its records).
var publicRules = map[string][]string{
	"kms":                    {},
	"kms/kmstest":            {"kms"},
	"hsm":                    {"kms"},
	"tpm":                    {"kms"},
	"tpm/swtpmtest":          {},
	"rotation":               {"kms"},
	"softhsm":                {},
	"softhsm/softhsmtest":    {"softhsm"},
	"softhsm/p11kittest":     {"softhsm"},
	"pop":                    {},
	"client":                 {"api/proto/keybroker/v1", "pop"},
	"api/proto/keybroker/v1": {},
}

// TestImportRules: the public packages import only what publicRules
// allows (test files may also use the test helpers of kms, softhsm and
// tpm); every other top-level package is wiring (cmd/, scripts/), examples,
// docs or deploy tests.
func TestImportRules(t *testing.T) {
	root, err := filepath.Abs("..")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(root, "go.mod")); err != nil {
		t.Fatalf("module root: %v", err)
	}
	// A test may start a whole daemon (internal/testdaemon) to test a
	// client against.
	testHelpers := map[string]bool{"kms/kmstest": true, "softhsm/softhsmtest": true, "softhsm/p11kittest": true, "tpm/swtpmtest": true, "softhsm": true, "internal/testdaemon": true, "internal/testpki": true}
	wiring := []string{"cmd/", "scripts/", "examples/", "internal/", "docs", "deploy"}
	fset := token.NewFileSet()
	seen := map[string]bool{}
	err = filepath.WalkDir(root, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() {
			if path != root && (strings.HasPrefix(d.Name(), ".") || d.Name() == "testdata" || d.Name() == "vendor") {
				return filepath.SkipDir
			}
			return nil
		}
		if !strings.HasSuffix(path, ".go") {
			return nil
		}
		rel, err := filepath.Rel(root, filepath.Dir(path))
		if err != nil {
			return err
		}
		pkg := filepath.ToSlash(rel)
		allowed, public := publicRules[pkg]
		if !public {
			for _, w := range wiring {
				if strings.HasPrefix(pkg, w) {
					return nil
				}
			}
			t.Errorf("%s: a top-level package with no import rule: add it to publicRules", pkg)
			return nil
		}
		seen[pkg] = true
		f, err := parser.ParseFile(fset, path, nil, parser.ImportsOnly)
		if err != nil {
			return err
		}
		isTest := strings.HasSuffix(path, "_test.go")
		for _, imp := range f.Imports {
			p, _ := strconv.Unquote(imp.Path.Value)
			dep, ok := strings.CutPrefix(p, module)
			if !ok || dep == pkg {
				continue
			}
			ok = false
			for _, a := range allowed {
				ok = ok || dep == a
			}
			if isTest && testHelpers[dep] {
				ok = true
			}
			if !ok {
				t.Errorf("%s imports %s; %s may import only %v of this module", filepath.ToSlash(filepath.Join(rel, filepath.Base(path))), dep, pkg, allowed)
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	for pkg := range publicRules {
		if !seen[pkg] {
			t.Errorf("publicRules names %s, which has no Go files", pkg)
		}
	}
}
