package vxlan

import (
	"bufio"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"consul-overlay/internal/testenv"
)

// The pin maker runs as a child process of the test in a private mount
// namespace of its own, as a managed plugin does; the test process stands
// for the host.
const (
	pinMakerEnv  = "VXLAN_TEST_PIN_MAKER" // the pin's path
	pinHostEnv   = "VXLAN_TEST_PIN_HOST"  // NSPin.HostPID
	pinCtrEnv    = "VXLAN_TEST_PIN_CTR"   // the container namespace's path
	pinHostEnd   = "vxc-test"             // the veth's end in the container namespace
	pinNSEnd     = "vxh-test"             // the veth's end in the pinned namespace
	pinMakerDone = "pinned "
)

func TestMain(m *testing.M) {
	if path := os.Getenv(pinMakerEnv); path != "" {
		if err := pinMaker(path); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// pinMaker pins a namespace at path and puts a veth between it and the
// container namespace, then exits: the child's side of
// TestNSPinOutlivesItsMaker.
func pinMaker(path string) error {
	pid, err := strconv.Atoi(os.Getenv(pinHostEnv))
	if err != nil {
		return err
	}
	ns, err := NSPin{HostPID: pid}.EnsureNS(path)
	if err != nil {
		return fmt.Errorf("EnsureNS: %w", err)
	}
	defer ns.Close()
	if ok, err := mountedIn("/proc/self/mountinfo", path); err != nil || ok {
		return fmt.Errorf("%s mounted in the maker's own mount namespace: %v (%v)", path, ok, err)
	}
	ctr, err := netns.GetFromPath(os.Getenv(pinCtrEnv))
	if err != nil {
		return err
	}
	defer ctr.Close()
	h, err := netlink.NewHandleAt(ctr)
	if err != nil {
		return err
	}
	defer h.Close()
	veth := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: pinHostEnd}, PeerName: pinNSEnd,
		PeerNamespace: netlink.NsFd(int(ns))}
	if err := h.LinkAdd(veth); err != nil {
		return fmt.Errorf("add veth %s: %w", pinHostEnd, err)
	}
	fmt.Println(pinMakerDone + ns.UniqueId())
	return nil
}

// mountedIn reports whether path is a mount point in the mount namespace
// whose mountinfo file is given.
func mountedIn(mountinfo, path string) (bool, error) {
	f, err := os.Open(mountinfo)
	if err != nil {
		return false, err
	}
	defer f.Close()
	s := bufio.NewScanner(f)
	for s.Scan() {
		if fields := strings.Fields(s.Text()); len(fields) > 4 && fields[4] == path {
			return true, nil
		}
	}
	return false, s.Err()
}

func mounted(t *testing.T, mountinfo, path string) bool {
	t.Helper()
	ok, err := mountedIn(mountinfo, path)
	if err != nil {
		t.Fatal(err)
	}
	return ok
}

// TestNSPinOutlivesItsMaker creates the namespace from a process with a
// private mount namespace, as a managed plugin is, and checks that the pin
// is in the host's mount namespace only and holds the namespace and a
// container's veth after the maker has exited; that EnsureNS reopens it and
// Pin keeps it; and that the namespace and the veth go with the pin. (The
// survival of a managed plugin's kill -9, disable, upgrade and engine
// restart was checked by hand with a stand-in plugin:
// docs/dataplane-namespace.md.)
func TestNSPinOutlivesItsMaker(t *testing.T) {
	testenv.RequireRoot(t)
	ctr := testenv.NewNetNS(t)
	// The host: this test's mount namespace, entered through a process
	// that stays in it.
	host := exec.Command("sleep", "3600")
	if err := host.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = host.Process.Kill(); _ = host.Wait() })
	pin := NSPin{HostPID: host.Process.Pid}
	var b [4]byte
	_, _ = rand.Read(b[:])
	dir := filepath.Join(t.TempDir(), "dpns-"+hex.EncodeToString(b[:]))
	path := filepath.Join(dir, "dp")
	t.Cleanup(func() {
		_ = pin.Unpin(path)
		// The pin made dir a mount point of its own.
		if err := unix.Unmount(dir, unix.MNT_DETACH); err != nil && !errors.Is(err, unix.EINVAL) {
			t.Errorf("unmount %s: %v", dir, err)
		}
	})

	maker := exec.Command(os.Args[0], "-test.run=^$")
	maker.Env = append(os.Environ(), pinMakerEnv+"="+path,
		pinHostEnv+"="+strconv.Itoa(pin.HostPID), pinCtrEnv+"="+ctr.Path)
	// Go makes the child's whole mount tree private after the unshare.
	maker.SysProcAttr = &syscall.SysProcAttr{Unshareflags: syscall.CLONE_NEWNS}
	out, err := maker.CombinedOutput()
	if err != nil {
		t.Fatalf("pin maker: %v: %s", err, out)
	}
	_, id, ok := strings.Cut(strings.TrimSpace(string(out)), pinMakerDone)
	if !ok {
		t.Fatalf("pin maker said %q", out)
	}
	if !mounted(t, "/proc/self/mountinfo", path) {
		t.Fatalf("%s is not mounted in the host's mount namespace", path)
	}
	// The maker is gone: nothing but the pin holds the namespace now.
	if _, err := ctr.Handle().LinkByName(pinHostEnd); err != nil {
		t.Fatalf("container end %s: %v", pinHostEnd, err)
	}

	ns, err := pin.EnsureNS(path)
	if err != nil {
		t.Fatalf("EnsureNS again: %v", err)
	}
	if got := ns.UniqueId(); got != id {
		t.Errorf("EnsureNS again = %s, want the pinned %s", got, id)
	}
	h, err := netlink.NewHandleAt(ns)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := h.LinkByName(pinNSEnd); err != nil {
		t.Errorf("namespace end %s: %v", pinNSEnd, err)
	}
	h.Close()
	if err := pin.Pin(ns, path); err != nil {
		t.Errorf("Pin of the pinned namespace: %v", err)
	}
	ns.Close()
	other, err := newNetNS()
	if err != nil {
		t.Fatal(err)
	}
	if err := pin.Pin(other, path); err == nil {
		t.Errorf("Pin of another namespace at %s: no error", path)
	}
	other.Close()

	if err := pin.Unpin(path); err != nil {
		t.Fatalf("Unpin: %v", err)
	}
	if err := pin.Unpin(path); err != nil {
		t.Errorf("Unpin of nothing: %v", err)
	}
	if mounted(t, "/proc/self/mountinfo", path) {
		t.Errorf("%s still mounted after Unpin", path)
	}
	// The namespace goes with its last holder, and the veth with it.
	deadline := time.Now().Add(20 * time.Second)
	for {
		_, err := ctr.Handle().LinkByName(pinHostEnd)
		if errors.As(err, new(netlink.LinkNotFoundError)) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("container end %s still there 20s after Unpin (err %v)", pinHostEnd, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}
