package fault

import (
	"os"
	"os/exec"
	"syscall"
	"testing"
)

func TestParse(t *testing.T) {
	m := parse(" a/b ,c/d,,")
	if !m["a/b"] || !m["c/d"] || len(m) != 2 {
		t.Fatalf("parse = %v", m)
	}
	if parse("") != nil {
		t.Fatal("empty list arms points")
	}
}

// TestPointKills runs this test binary again with a point armed and checks
// that it died of SIGKILL at that point and not at another.
func TestPointKills(t *testing.T) {
	if os.Getenv("FAULT_CHILD") == "1" {
		Point("test/unarmed")
		os.Stdout.WriteString("passed unarmed\n")
		Point("test/armed")
		os.Stdout.WriteString("passed armed\n")
		os.Exit(0)
	}
	cmd := exec.Command(os.Args[0], "-test.run=^TestPointKills$")
	cmd.Env = append(os.Environ(), "FAULT_CHILD=1", EnvVar+"=test/armed")
	out, err := cmd.Output()
	ee, ok := err.(*exec.ExitError)
	if !ok {
		t.Fatalf("child did not die: err=%v out=%q", err, out)
	}
	ws := ee.Sys().(syscall.WaitStatus)
	if !ws.Signaled() || ws.Signal() != syscall.SIGKILL {
		t.Fatalf("child ended with %v, want SIGKILL", ws)
	}
	if string(out) != "passed unarmed\n" {
		t.Fatalf("child output %q", out)
	}
}
