//go:build !unix

package audit

import (
	"errors"
	"os"
)

// lockFile would lock f; without flock, Open refuses rather than risk two
// Logs appending to one file.
func lockFile(*os.File) error {
	return errors.New("locking the log file is not supported on this system")
}
