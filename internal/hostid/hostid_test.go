package hostid

import (
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

func TestLoad(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "data")
	id, err := Load(dir)
	if err != nil || !Valid(id) {
		t.Fatalf("Load() = %q, %v; want a new identity", id, err)
	}
	st, err := os.Stat(filepath.Join(dir, IDFile))
	if err != nil || st.Mode().Perm() != 0o600 {
		t.Fatalf("host-id: %v, mode %v; want 0600", err, st.Mode().Perm())
	}
	again, err := Load(dir)
	if err != nil || again != id {
		t.Fatalf("second Load() = %q, %v; want the persisted %q", again, err, id)
	}
	other, err := Load(t.TempDir())
	if err != nil || other == id {
		t.Fatalf("Load of another dir = %q, %v; want a different identity from %q", other, err, id)
	}
	if ents, _ := os.ReadDir(dir); len(ents) != 1 {
		t.Fatalf("DATA_DIR holds %d files after Load, want only host-id", len(ents))
	}

	for _, bad := range []string{"", "xyz", strings.Repeat("A", 32), strings.Repeat("0", 31)} {
		d := t.TempDir()
		if err := os.WriteFile(filepath.Join(d, IDFile), []byte(bad), 0o600); err != nil {
			t.Fatal(err)
		}
		if id, err := Load(d); err == nil {
			t.Errorf("Load with host-id %q = %q, want an error", bad, id)
		}
	}
}

func TestLock(t *testing.T) {
	dir := t.TempDir()
	l, err := Lock(dir)
	if err != nil {
		t.Fatal(err)
	}
	b, _ := os.ReadFile(filepath.Join(dir, LockFile))
	if strings.TrimSpace(string(b)) != fmt.Sprint(os.Getpid()) {
		t.Fatalf("lock file holds %q, want our pid %d", b, os.Getpid())
	}
	_, err = Lock(dir)
	if !errors.Is(err, ErrInUse) || !strings.Contains(err.Error(), fmt.Sprintf("pid %d", os.Getpid())) {
		t.Fatalf("second Lock = %v, want ErrInUse naming pid %d", err, os.Getpid())
	}
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	l2, err := Lock(dir)
	if err != nil {
		t.Fatalf("Lock after Close: %v", err)
	}
	if l2.File() != l.File() || l.File() == "" {
		t.Fatalf("File() = %q then %q, want the same device:inode", l.File(), l2.File())
	}
	l2.Close()
}

func TestListenInstance(t *testing.T) {
	prefix := "hostid-test-" + fmt.Sprint(os.Getpid()) + "/"
	in, err := ListenInstance(prefix, "127.0.0.1:8500", "node a, DATA_DIR /x")
	if err != nil {
		t.Fatal(err)
	}
	_, err = ListenInstance(prefix, "127.0.0.1:8500", "node b")
	if !errors.Is(err, ErrInUse) || !strings.Contains(err.Error(), fmt.Sprintf("pid %d", os.Getpid())) || !strings.Contains(err.Error(), "node a, DATA_DIR /x") {
		t.Fatalf("second ListenInstance = %v, want ErrInUse naming pid %d and node a", err, os.Getpid())
	}
	for _, o := range [][2]string{{prefix + "other/", "127.0.0.1:8500"}, {prefix, "127.0.0.1:8501"}} {
		other, err := ListenInstance(o[0], o[1], "")
		if err != nil {
			t.Fatalf("ListenInstance(%q, %q) beside (%q, 127.0.0.1:8500): %v", o[0], o[1], prefix, err)
		}
		other.Close()
	}
	if err := in.Close(); err != nil {
		t.Fatal(err)
	}
	again, err := ListenInstance(prefix, "127.0.0.1:8500", "")
	if err != nil {
		t.Fatalf("ListenInstance after Close: %v", err)
	}
	again.Close()
}

// TestLoadOrAdoptsLegacy: a node name adopted from an earlier version is
// written with its prefix and read back as the name; a bare name in the
// file is still refused.
func TestLoadOrAdoptsLegacy(t *testing.T) {
	dir := t.TempDir()
	id, err := LoadOr(dir, "host0")
	if err != nil || id != "host0" {
		t.Fatalf("LoadOr = %q, %v; want host0", id, err)
	}
	b, _ := os.ReadFile(filepath.Join(dir, IDFile))
	if got := strings.TrimSpace(string(b)); got != "node-name:host0" {
		t.Fatalf("file holds %q", got)
	}
	for _, f := range []func(string) (string, error){Load, Read} {
		if id, err := f(dir); err != nil || id != "host0" {
			t.Fatalf("read back %q, %v; want host0", id, err)
		}
	}
	if _, err := LoadOr(t.TempDir(), "bad name!"); err == nil {
		t.Fatal("an invalid name was adopted")
	}
	if _, err := Read(t.TempDir()); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("Read of an empty DATA_DIR: %v, want not exist", err)
	}
}

// TestDeadOwnersChild: an instance killed while it started a program
// leaves its DATA_DIR lock and sockets with that program for a moment
// (between fork and exec the child holds every descriptor, close-on-exec
// ones too). The next instance takes each once the program lets go instead
// of refusing to start; a live owner is still refused (TestLock,
// TestListenInstance).
func TestDeadOwnersChild(t *testing.T) {
	if spec := os.Getenv("HOSTID_TEST_HOLDER"); spec != "" {
		holdThroughChild(t, strings.Split(spec, "|"))
		return
	}
	// Each resource from its own holder: the child lets all go at once,
	// so a second take after a first that waited would prove nothing.
	take := map[string]func(dir, path, prefix string) (Waited, error){
		"lock": func(dir, _, _ string) (Waited, error) {
			l, err := Lock(dir)
			if err != nil {
				return Waited{}, err
			}
			defer l.Close()
			return l.Waited(), nil
		},
		"instance socket": func(_, _, prefix string) (Waited, error) {
			in, err := ListenInstance(prefix, "store", "")
			if err != nil {
				return Waited{}, err
			}
			defer in.Close()
			return in.Waited(), nil
		},
	}
	for name, take := range take {
		t.Run(name, func(t *testing.T) {
			dir := t.TempDir()
			path := filepath.Join(dir, "plugin.sock")
			prefix := fmt.Sprintf("hostid-dead-%d-%s/", os.Getpid(), name)
			cmd := exec.Command(os.Args[0], "-test.run=^TestDeadOwnersChild$")
			cmd.Env = append(os.Environ(), "HOSTID_TEST_HOLDER="+dir+"|"+path+"|"+prefix)
			out, err := cmd.Output()
			if err != nil {
				t.Fatalf("holder process: %v\n%s", err, out)
			}
			var child int
			if _, err := fmt.Sscanf(string(out), "child %d", &child); err != nil {
				t.Fatalf("holder process said %q", out)
			}
			t.Cleanup(func() { _ = unix.Kill(child, unix.SIGKILL) })
			owner := cmd.Process.Pid
			if !Exited(owner) || Exited(child) {
				t.Fatalf("Exited(owner %d) = %v, Exited(child %d) = %v; want true, false", owner, Exited(owner), child, Exited(child))
			}
			// Still held, for the dead owner: the plugin socket answers
			// (listenUnix replaces it, its owner having exited) and the
			// lock is taken.
			if pid, _, err := Peer(path); err != nil || pid != owner {
				t.Fatalf("Peer(%s) = %d, %v; want the exited owner %d (the child holds the socket)", path, pid, err, owner)
			}
			f, err := os.Open(filepath.Join(dir, LockFile))
			if err != nil {
				t.Fatal(err)
			}
			defer f.Close()
			if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); !errors.Is(err, unix.EWOULDBLOCK) {
				t.Fatalf("flock while the child holds the lock: %v, want EWOULDBLOCK", err)
			}
			w, err := take(dir, path, prefix)
			if err != nil {
				t.Fatalf("take the %s after its owner exited: %v", name, err)
			}
			if w.Pid != owner || w.For <= 0 {
				t.Errorf("Waited() = %+v, want the exited owner %d and the time waited", w, owner)
			}
		})
	}
}

// holdThroughChild is the holder process of TestDeadOwnersChild: it takes
// the lock and both sockets, starts a child that inherits them, and exits
// without closing anything.
func holdThroughChild(t *testing.T, spec []string) {
	dir, path, prefix := spec[0], spec[1], spec[2]
	lock, err := Lock(dir)
	if err != nil {
		t.Fatal(err)
	}
	in, err := ListenInstance(prefix, "store", "dead owner")
	if err != nil {
		t.Fatal(err)
	}
	ul, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	files := []*os.File{lock.f}
	for _, l := range []net.Listener{in.l, ul} {
		f, err := l.(*net.UnixListener).File()
		if err != nil {
			t.Fatal(err)
		}
		files = append(files, f)
	}
	child := exec.Command("sleep", "2")
	child.ExtraFiles = files
	if err := child.Start(); err != nil {
		t.Fatal(err)
	}
	fmt.Printf("child %d\n", child.Process.Pid)
	os.Exit(0)
}
