// Package deploy holds no code: it is the home of keybroker's systemd
// units (systemd/) and container files (container/, compose.yaml), and of
// the tests that check them with the tools that consume them
// (systemd-analyze) and run the commands they run.
package deploy
