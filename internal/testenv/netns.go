package testenv

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"testing"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// NetnsDir is where named network namespaces live, as with `ip netns`.
const NetnsDir = "/run/netns"

// NetNS is a named network namespace (/run/netns/<Name>) that lives as
// long as the test that made it. `ip netns exec <Name>` works on it too.
type NetNS struct {
	Name string // random, "cotest-<hex>"
	Path string // NetnsDir/Name, a bind mount of the namespace

	h *netlink.Handle
}

// NewNetNS creates a fresh network namespace with a random name and
// removes it when the test ends. The namespace is created on a locked OS
// thread that returns to its original namespace before it is unlocked.
func NewNetNS(t testing.TB) *NetNS {
	t.Helper()
	RequireRoot(t)
	var b [5]byte
	_, _ = rand.Read(b[:])
	ns, err := createNetNS("cotest-" + hex.EncodeToString(b[:]))
	if err != nil {
		t.Fatalf("create network namespace: %v", err)
	}
	t.Cleanup(func() {
		if err := ns.remove(); err != nil {
			t.Errorf("remove network namespace %s: %v", ns.Name, err)
		}
	})
	return ns
}

var netnsDirOnce = sync.OnceValue(prepareNetnsDir)

// prepareNetnsDir makes NetnsDir exist and be a shared mount point, as
// `ip netns add` does, so namespace mounts propagate to other mount
// namespaces.
func prepareNetnsDir() error {
	if err := os.MkdirAll(NetnsDir, 0o755); err != nil {
		return err
	}
	err := unix.Mount("", NetnsDir, "none", unix.MS_SHARED|unix.MS_REC, "")
	if errors.Is(err, unix.EINVAL) {
		if err := unix.Mount(NetnsDir, NetnsDir, "none", unix.MS_BIND|unix.MS_REC, ""); err != nil {
			return fmt.Errorf("bind mount %s: %w", NetnsDir, err)
		}
		err = unix.Mount("", NetnsDir, "none", unix.MS_SHARED|unix.MS_REC, "")
	}
	if err != nil {
		return fmt.Errorf("make %s shared: %w", NetnsDir, err)
	}
	return nil
}

func createNetNS(name string) (_ *NetNS, retErr error) {
	if err := netnsDirOnce(); err != nil {
		return nil, err
	}
	path := filepath.Join(NetnsDir, name)
	f, err := os.OpenFile(path, os.O_RDONLY|os.O_CREATE|os.O_EXCL, 0o444)
	if err != nil {
		return nil, err
	}
	f.Close()
	defer func() {
		if retErr != nil {
			_ = unix.Unmount(path, unix.MNT_DETACH)
			_ = os.Remove(path)
		}
	}()

	errc := make(chan error, 1)
	go func() {
		// A throwaway goroutine: if the thread cannot go back to its
		// namespace it stays locked and Go discards it when we return.
		runtime.LockOSThread()
		orig, err := netns.Get()
		if err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("get current namespace: %w", err)
			return
		}
		defer orig.Close()
		if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("unshare: %w", err)
			return
		}
		src := fmt.Sprintf("/proc/self/task/%d/ns/net", unix.Gettid())
		mountErr := unix.Mount(src, path, "none", unix.MS_BIND, "")
		if mountErr != nil {
			mountErr = fmt.Errorf("bind mount %s: %w", path, mountErr)
		}
		if err := netns.Set(orig); err != nil {
			errc <- errors.Join(mountErr, fmt.Errorf("restore namespace: %w", err))
			return
		}
		runtime.UnlockOSThread()
		errc <- mountErr
	}()
	if err := <-errc; err != nil {
		return nil, err
	}

	ns := &NetNS{Name: name, Path: path}
	fd, err := netns.GetFromPath(path)
	if err != nil {
		return nil, fmt.Errorf("open %s: %w", path, err)
	}
	defer fd.Close()
	if ns.h, err = netlink.NewHandleAt(fd); err != nil {
		return nil, fmt.Errorf("netlink handle in %s: %w", name, err)
	}
	// Loopback up, as in any namespace a process would use.
	lo, err := ns.h.LinkByName("lo")
	if err == nil {
		err = ns.h.LinkSetUp(lo)
	}
	if err != nil {
		ns.h.Close()
		return nil, fmt.Errorf("set lo up in %s: %w", name, err)
	}
	return ns, nil
}

// remove closes the handle (its sockets hold the namespace), unmounts and
// removes the namespace file; the kernel frees the namespace and its links
// once nothing else holds it.
func (n *NetNS) remove() error {
	if n.h != nil {
		n.h.Close()
	}
	var errs []error
	if err := unix.Unmount(n.Path, unix.MNT_DETACH); err != nil && !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENOENT) {
		errs = append(errs, fmt.Errorf("unmount: %w", err))
	}
	if err := os.Remove(n.Path); err != nil && !errors.Is(err, os.ErrNotExist) {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

// Handle is a netlink handle bound to the namespace. It is closed when the
// test ends.
func (n *NetNS) Handle() *netlink.Handle { return n.h }

// Do runs fn on a locked OS thread inside the namespace and returns its
// error. The thread goes back to its original namespace before it is
// unlocked; if that fails the thread stays locked and Go discards it. fn
// must not start goroutines that expect to be in the namespace.
func (n *NetNS) Do(fn func() error) error { return doIn(n.Path, n.Name, fn) }

// doIn is Do for the namespace at path (name says it in errors).
func doIn(path, name string, fn func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		orig, err := netns.Get()
		if err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("get current namespace: %w", err)
			return
		}
		defer orig.Close()
		target, err := netns.GetFromPath(path)
		if err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("open %s: %w", path, err)
			return
		}
		defer target.Close()
		if err := netns.Set(target); err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("enter %s: %w", name, err)
			return
		}
		fnErr := fn()
		if err := netns.Set(orig); err != nil {
			errc <- errors.Join(fnErr, fmt.Errorf("restore namespace: %w", err))
			return
		}
		runtime.UnlockOSThread()
		errc <- fnErr
	}()
	return <-errc
}

// Command returns a command that runs inside the namespace through
// `nsenter --net=<Path>`, for commands that run in the background.
func (n *NetNS) Command(ctx context.Context, args ...string) *exec.Cmd {
	return exec.CommandContext(ctx, "nsenter", append([]string{"--net=" + n.Path, "--"}, args...)...)
}

// Run runs a command (ping, ip, iptables, ...) inside the namespace and
// returns its combined output. The command is killed when the test ends.
func (n *NetNS) Run(t testing.TB, args ...string) (string, error) {
	t.Helper()
	out, err := n.Command(t.Context(), args...).CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("%s (in %s): %w", strings.Join(args, " "), n.Name, err)
	}
	return string(out), nil
}

// MustRun is Run that fails the test on error.
func (n *NetNS) MustRun(t testing.TB, args ...string) string {
	t.Helper()
	out, err := n.Run(t, args...)
	if err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	return out
}
