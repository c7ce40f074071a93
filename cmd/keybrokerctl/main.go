// Command keybrokerctl is the operator CLI of keybrokerd: it creates and
// inspects keys, signs digests and prints public keys over the daemon's
// gRPC unix socket. main only wires the process to run (root.go).
package main

import "os"

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}
