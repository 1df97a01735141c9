// Package testenv gives tests the real things they run against: a Consul
// dev agent on free loopback ports, fresh network namespaces, and checks for
// prerequisites. Under CI=true a missing prerequisite fails the test;
// elsewhere it skips with a message that says how to get it.
package testenv

import (
	"os"
	"testing"
)

// InCI reports whether the tests run in CI (CI=true), where nothing may skip.
func InCI() bool { return os.Getenv("CI") == "true" }

// Missing fails the test under CI and skips it elsewhere. how tells the
// reader how to provide the prerequisite.
func Missing(t testing.TB, what, how string) {
	t.Helper()
	if InCI() {
		t.Fatalf("prerequisite missing: %s (%s); CI=true forbids skipping", what, how)
	}
	t.Skipf("prerequisite missing: %s (%s)", what, how)
}

// RequireRoot stops the test unless it runs as root.
func RequireRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		Missing(t, "root", "run the tests as root: sudo make test")
	}
}

// KernelLacks stops the test because the running kernel lacks a feature
// that no package can add (CI's machines boot a fixed kernel with module
// loading off). Unlike Missing it skips under CI=true as well, loudly: the
// test's subject is then unproven on that machine, and the skip message
// says so, for the closing note and the README to report.
func KernelLacks(t testing.TB, what, how string) {
	t.Helper()
	t.Skipf("UNPROVEN on this kernel: it lacks %s (%s); the test needs a kernel that has it", what, how)
}
