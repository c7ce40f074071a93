package tpm

import (
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
)

// The state directory holds what the daemon must remember about its TPM:
//
//	srk.name                  the Name of the SRK the first Open saw (hex)
//	parents/<tenant>.json     each tenant's storage parent: its blobs under
//	                          the SRK and its auth value (mode 0600)
//
// Files are written once, atomically, and never overwritten: losing or
// replacing one would orphan every key blob made under it.
const (
	pinFile    = "srk.name"
	parentsDir = "parents"
)

// parentFile is a tenant's storage parent as saved in the state directory.
type parentFile struct {
	Version int `json:"version"`
	// Public is the TPMT_PUBLIC (the contents of the TPM2B_PUBLIC).
	Public []byte `json:"public"`
	// Private is the contents of the TPM2B_PRIVATE, encrypted by the SRK.
	Private []byte `json:"private"`
	// Auth is the parent's random auth value.
	Auth []byte `json:"auth"`
	// SRKName is the Name of the SRK it was created under (hex).
	SRKName string `json:"srk_name"`
}

func makeStateDir(dir string) error {
	if dir == "" {
		return errors.New("tpm: state dir: must be set")
	}
	if err := os.MkdirAll(filepath.Join(dir, parentsDir), 0o700); err != nil {
		return fmt.Errorf("tpm: state dir: %w", err)
	}
	return nil
}

// readPin returns the pinned SRK Name, or nil when none is pinned yet.
func readPin(dir string) ([]byte, error) {
	b, err := os.ReadFile(filepath.Join(dir, pinFile))
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("tpm: reading the SRK pin: %w", err)
	}
	name, err := hex.DecodeString(strings.TrimSpace(string(b)))
	if err != nil || len(name) < 4 {
		return nil, fmt.Errorf("tpm: %s: not a hex TPM Name", filepath.Join(dir, pinFile))
	}
	return name, nil
}

func writePin(dir string, name []byte) error {
	return writeOnce(filepath.Join(dir, pinFile), []byte(hex.EncodeToString(name)+"\n"))
}

func parentPath(dir, tenant string) string {
	return filepath.Join(dir, parentsDir, tenant+".json")
}

// readParent returns the tenant's saved parent, or nil when there is none.
func readParent(dir, tenant string) (*parentFile, error) {
	path := parentPath(dir, tenant)
	b, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("tpm: reading a tenant parent: %w", err)
	}
	var pf parentFile
	if err := json.Unmarshal(b, &pf); err != nil {
		return nil, fmt.Errorf("tpm: %s: %w", path, err)
	}
	if pf.Version != 1 || len(pf.Public) == 0 || len(pf.Private) == 0 || len(pf.Auth) != authSize {
		return nil, fmt.Errorf("tpm: %s: not a version 1 parent", path)
	}
	return &pf, nil
}

// writeParent saves pf; it fails with fs.ErrExist when the tenant already
// has a parent.
func writeParent(dir, tenant string, pf *parentFile) error {
	b, err := json.MarshalIndent(pf, "", "  ")
	if err != nil {
		return err
	}
	return writeOnce(parentPath(dir, tenant), append(b, '\n'))
}

// writeOnce creates path with data, atomically and durably, and never
// replaces an existing file (the error then wraps fs.ErrExist).
func writeOnce(path string, data []byte) error {
	dir := filepath.Dir(path)
	tmp, err := os.CreateTemp(dir, ".tmp-*")
	if err != nil {
		return fmt.Errorf("tpm: %w", err)
	}
	defer os.Remove(tmp.Name())
	if err := tmp.Chmod(0o600); err != nil {
		tmp.Close()
		return fmt.Errorf("tpm: %w", err)
	}
	if _, err := tmp.Write(data); err != nil {
		tmp.Close()
		return fmt.Errorf("tpm: %w", err)
	}
	if err := tmp.Sync(); err != nil {
		tmp.Close()
		return fmt.Errorf("tpm: %w", err)
	}
	if err := tmp.Close(); err != nil {
		return fmt.Errorf("tpm: %w", err)
	}
	// link(2), unlike rename(2), fails when the target exists.
	if err := os.Link(tmp.Name(), path); err != nil {
		return fmt.Errorf("tpm: %w", err)
	}
	if d, err := os.Open(dir); err == nil {
		d.Sync()
		d.Close()
	}
	return nil
}
