package daemon

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
)

// softhsmConf is where Debian's and Ubuntu's SoftHSM2 reads its
// configuration when SOFTHSM2_CONF is not set.
const softhsmConf = "/etc/softhsm/softhsm2.conf"

// softhsmDiagnosis says why SoftHSM2 could not start, when module is
// SoftHSM2's and this process cannot read its configuration file or token
// directory; "" otherwise. SoftHSM2 itself only prints the reason on its
// stderr and answers CKR_GENERAL_ERROR. Under systemd the usual cause is a
// daemon user outside group softhsm, which owns both on Debian and Ubuntu.
func softhsmDiagnosis(module string) string {
	if !strings.HasPrefix(filepath.Base(module), "libsofthsm2") {
		return ""
	}
	conf := os.Getenv("SOFTHSM2_CONF")
	if conf == "" {
		conf = softhsmConf
	}
	b, err := os.ReadFile(conf)
	if err != nil {
		return "SoftHSM2 cannot read its configuration file: " + err.Error() + groupHint(conf, err)
	}
	dir := softhsmTokenDir(b)
	if dir == "" {
		return ""
	}
	if _, err := os.ReadDir(dir); err != nil {
		return fmt.Sprintf("SoftHSM2 cannot read its token directory (directories.tokendir in %s): %v%s", conf, err, groupHint(dir, err))
	}
	return ""
}

// softhsmTokenDir returns directories.tokendir of a SoftHSM2 configuration
// file ("key = value" lines, "#" comments).
func softhsmTokenDir(conf []byte) string {
	s := bufio.NewScanner(bytes.NewReader(conf))
	for s.Scan() {
		k, v, ok := strings.Cut(s.Text(), "=")
		if ok && strings.TrimSpace(k) == "directories.tokendir" {
			return strings.TrimSpace(v)
		}
	}
	return ""
}

// groupHint says, for a permission error on path, which group the path (or
// the nearest directory above it that this process can see) grants access
// to, and that the daemon's user must be a member.
func groupHint(path string, err error) string {
	if !errors.Is(err, fs.ErrPermission) {
		return ""
	}
	for p := path; ; p = filepath.Dir(p) {
		fi, err := os.Stat(p)
		if err == nil {
			st, ok := fi.Sys().(*syscall.Stat_t)
			if !ok || fi.Mode().Perm()&0o050 == 0 {
				return ""
			}
			gid := strconv.FormatUint(uint64(st.Gid), 10)
			group := gid
			if g, err := user.LookupGroupId(gid); err == nil {
				group = g.Name
			}
			name := strconv.Itoa(os.Getuid())
			if u, err := user.Current(); err == nil {
				name = u.Username
			}
			return fmt.Sprintf(" (%s belongs to group %s: make the daemon's user %s a member, as deploy/systemd/keybroker.sysusers.conf does)", p, group, name)
		}
		if p == filepath.Dir(p) {
			return ""
		}
	}
}
