package testenv

import (
	"testing"
	"time"
)

// Eventually retries f every 20 ms until it returns nil, and fails the test
// with f's last error once within has passed.
func Eventually(t testing.TB, within time.Duration, f func() error) {
	t.Helper()
	deadline := time.Now().Add(within)
	for {
		err := f()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("not within %s: %v", within, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}
