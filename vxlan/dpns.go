package vxlan

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"strconv"

	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// The data-plane namespace (docs/dataplane-namespace.md) must outlive the
// plugin's process, a `docker plugin disable -f`, an upgrade and an engine
// restart. Devices do not hold a namespace; a process, an open descriptor
// or a bind mount does. A bind mount made by a managed plugin lands in the
// plugin's own mount namespace, which Docker tears down with the plugin,
// so the namespace is pinned in the host's mount namespace instead, the
// way `ip netns add` pins one under /run/netns.
//
// mount(2) and move_mount(2) refuse a target outside the caller's mount
// namespace, and setns(CLONE_NEWNS) refuses a thread that shares its
// filesystem context (root, cwd) with others, as every Go thread does
// (EINVAL, checked on 6.18). A locked thread that first unshares that
// context (unshare(CLONE_FS)) can enter the host's mount namespace; it
// makes the mount and is thrown away, since its root and mounts are no
// longer the process's.

// NSPin creates, pins and removes network namespaces bind-mounted in the
// host's mount namespace. The zero value is ready to use in a managed
// plugin with `pidhost: true` (/proc/1 is the host's init), CAP_SYS_PTRACE
// (opening /proc/1/ns/mnt and /proc/1/root of a process with more
// capabilities than the plugin fails the kernel's ptrace access check with
// EACCES otherwise), CAP_SYS_ADMIN, and CAP_SYS_CHROOT (setns into a mount
// namespace needs both; Docker's default set has CAP_SYS_CHROOT).
type NSPin struct {
	// HostPID is a process, as this process sees it, whose mount namespace
	// and root directory are the host's, and which outlives this one. Zero:
	// 1 (needs pidhost). Not the engine's pid: with live-restore the plugin
	// outlives the engine.
	HostPID int
}

func (p NSPin) hostPID() int {
	if p.HostPID == 0 {
		return 1
	}
	return p.HostPID
}

// hostPath is path of the host's mount namespace seen from this process.
func (p NSPin) hostPath(path string) string {
	return filepath.Join("/proc", strconv.Itoa(p.hostPID()), "root", path)
}

// errNotPinned: the path exists in the host's mount namespace but is not a
// network namespace.
var errNotPinned = errors.New("not a pinned network namespace")

// EnsureNS returns the network namespace pinned at path (absolute, in the
// host's mount namespace), creating the namespace and its pin if the path
// holds none. The caller closes the handle; the namespace lives on while
// the pin does.
//
// Equivalent to: `ip netns add` with /run/consul-overlay for /run/netns,
// run in the host's mount namespace.
func (p NSPin) EnsureNS(path string) (netns.NsHandle, error) {
	if !filepath.IsAbs(path) {
		return netns.None(), fmt.Errorf("pin network namespace %q: path is not absolute", path)
	}
	ns, err := p.OpenNS(path)
	if err == nil {
		return ns, nil
	}
	if !errors.Is(err, os.ErrNotExist) && !errors.Is(err, errNotPinned) {
		return netns.None(), fmt.Errorf("open network namespace %q: %w", path, err)
	}
	ns, err = newNetNS()
	if err != nil {
		return netns.None(), fmt.Errorf("create network namespace for %q: %w", path, err)
	}
	if err := p.Pin(ns, path); err != nil {
		ns.Close()
		// Another caller may have pinned its own namespace first: use it.
		if other, oerr := openNetNS(p.hostPath(path)); oerr == nil {
			return other, nil
		}
		return netns.None(), err
	}
	return ns, nil
}

// OpenNS returns the network namespace pinned at path (absolute, in the
// host's mount namespace) without creating one: an error that is
// os.ErrNotExist when nothing is there. The caller closes the handle.
func (p NSPin) OpenNS(path string) (netns.NsHandle, error) {
	return openNetNS(p.hostPath(path))
}

// Pin makes path (absolute, in the host's mount namespace) a bind mount of
// ns. A pin of ns already there is kept; a pin of another namespace is an
// error. Call it whenever the plugin holds the namespace and finds its pin
// gone.
//
// Equivalent to: `nsenter --mount=/proc/1/ns/mnt -- mount --bind
// /proc/<pid>/fd/<ns> <path>`.
func (p NSPin) Pin(ns netns.NsHandle, path string) error {
	if same, err := pinnedTo(p.hostPath(path), ns); err == nil && same {
		return nil
	}
	// The descriptor table is the process's, so the host's /proc finds ns
	// under this process's pid.
	src := "/proc/self/fd/" + strconv.Itoa(int(ns))
	return p.inHostMountNS(func() error { return pinAt(src, path) })
}

// Unpin removes the pin at path (absolute, in the host's mount namespace)
// and the file under it. A path that is missing or not mounted is success.
// The namespace goes once nothing else holds it.
//
// Equivalent to: `ip netns del` run in the host's mount namespace.
func (p NSPin) Unpin(path string) error {
	return p.inHostMountNS(func() error { return unpinAt(path) })
}

// inHostMountNS runs f on a locked thread that has entered the host's
// mount namespace (root and working directory: the host's /). The thread
// is thrown away.
func (p NSPin) inHostMountNS(f func() error) error {
	mnt := "/proc/" + strconv.Itoa(p.hostPID()) + "/ns/mnt"
	c := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		if unix.Gettid() == unix.Getpid() {
			// The main thread: Go parks it for good instead of ending it,
			// and /proc/<pid>/root and mountinfo are its. Hold it while
			// another thread does the work.
			c <- p.inHostMountNS(f)
			runtime.UnlockOSThread()
			return
		}
		// Never unlocked from here: the thread ends with the goroutine,
		// so no other goroutine runs with the host's root and mounts.
		fd, err := unix.Open(mnt, unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			c <- fmt.Errorf("open %s: %w", mnt, err)
			return
		}
		defer unix.Close(fd)
		if err := unix.Unshare(unix.CLONE_FS); err != nil {
			c <- fmt.Errorf("unshare filesystem context: %w", err)
			return
		}
		if err := unix.Setns(fd, unix.CLONE_NEWNS); err != nil {
			c <- fmt.Errorf("enter mount namespace %s: %w", mnt, err)
			return
		}
		c <- f()
	}()
	return <-c
}

// pinAt bind-mounts the network namespace file nsFile at path, in the
// caller's mount namespace. path's directory is made a shared mount point
// of its own, as `ip netns add` does with /run/netns, so that mount
// namespaces copied from the host's later get a peer of each pin.
func pinAt(nsFile, path string) error {
	ns, err := openNetNS(nsFile)
	if err != nil {
		return fmt.Errorf("pin %q: open %s: %w", path, nsFile, err)
	}
	defer ns.Close()
	dir := filepath.Dir(path)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("pin %q: %w", path, err)
	}
	if err := makeSharedDir(dir); err != nil {
		return fmt.Errorf("pin %q: %w", path, err)
	}
	same, err := pinnedTo(path, ns)
	switch {
	case err == nil && same:
		return nil
	case err == nil:
		return fmt.Errorf("pin %q: it pins another network namespace", path)
	case !errors.Is(err, errNotPinned) && !errors.Is(err, os.ErrNotExist):
		return fmt.Errorf("pin %q: %w", path, err)
	}
	f, err := os.OpenFile(path, os.O_RDONLY|os.O_CREATE, 0o444)
	if err != nil {
		return fmt.Errorf("pin %q: create mount point: %w", path, err)
	}
	f.Close()
	if err := unix.Mount(nsFile, path, "none", unix.MS_BIND, ""); err != nil {
		return fmt.Errorf("pin %q: bind mount %s: %w", path, nsFile, err)
	}
	return nil
}

// unpinAt unmounts path, lazily since the plugin may hold the namespace
// through a descriptor opened on the pin (a plain unmount fails with
// EBUSY), and removes the file: unlinking it detaches the pin's copies in
// every other mount namespace too, private ones included.
func unpinAt(path string) error {
	if err := unix.Unmount(path, unix.MNT_DETACH); err != nil &&
		!errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENOENT) {
		return fmt.Errorf("unpin %q: unmount: %w", path, err)
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("unpin %q: %w", path, err)
	}
	return nil
}

// makeSharedDir makes dir a shared mount point, bind-mounting it on itself
// first if it is none. Equivalent to: `mount --make-rshared dir || (mount
// --rbind dir dir && mount --make-rshared dir)`.
func makeSharedDir(dir string) error {
	err := unix.Mount("", dir, "none", unix.MS_SHARED|unix.MS_REC, "")
	if errors.Is(err, unix.EINVAL) {
		if err := unix.Mount(dir, dir, "none", unix.MS_BIND|unix.MS_REC, ""); err != nil {
			return fmt.Errorf("bind mount %s on itself: %w", dir, err)
		}
		err = unix.Mount("", dir, "none", unix.MS_SHARED|unix.MS_REC, "")
	}
	if err != nil {
		return fmt.Errorf("make %s a shared mount: %w", dir, err)
	}
	return nil
}

// openNetNS opens path if it is a network namespace file, errNotPinned if
// it is another file.
func openNetNS(path string) (netns.NsHandle, error) {
	fd, err := unix.Open(path, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return netns.None(), &os.PathError{Op: "open", Path: path, Err: err}
	}
	var st unix.Statfs_t
	if err := unix.Fstatfs(fd, &st); err != nil {
		unix.Close(fd)
		return netns.None(), &os.PathError{Op: "statfs", Path: path, Err: err}
	}
	if st.Type != unix.NSFS_MAGIC {
		unix.Close(fd)
		return netns.None(), fmt.Errorf("%s: %w", path, errNotPinned)
	}
	typ, err := unix.IoctlRetInt(fd, unix.NS_GET_NSTYPE)
	if err != nil || typ != unix.CLONE_NEWNET {
		unix.Close(fd)
		return netns.None(), fmt.Errorf("%s: %w", path, errNotPinned)
	}
	return netns.NsHandle(fd), nil
}

// pinnedTo reports whether path is a pin of ns; errNotPinned or a not-exist
// error if it is no pin at all.
func pinnedTo(path string, ns netns.NsHandle) (bool, error) {
	cur, err := openNetNS(path)
	if err != nil {
		return false, err
	}
	defer cur.Close()
	return cur.Equal(ns), nil
}

// newNetNS creates a network namespace and returns a handle to it. The
// thread that creates it returns to its namespace, or is thrown away if it
// cannot: a thread left in the namespace would hold it.
//
// Equivalent to: `unshare --net`.
func newNetNS() (netns.NsHandle, error) {
	type result struct {
		ns  netns.NsHandle
		err error
	}
	c := make(chan result, 1)
	go func() {
		runtime.LockOSThread()
		orig, err := openNetNS("/proc/thread-self/ns/net")
		if err != nil {
			runtime.UnlockOSThread()
			c <- result{netns.None(), err}
			return
		}
		defer orig.Close()
		if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
			runtime.UnlockOSThread()
			c <- result{netns.None(), fmt.Errorf("unshare: %w", err)}
			return
		}
		ns, err := openNetNS("/proc/thread-self/ns/net")
		if serr := unix.Setns(int(orig), unix.CLONE_NEWNET); serr == nil {
			runtime.UnlockOSThread()
		}
		c <- result{ns, err}
	}()
	r := <-c
	return r.ns, r.err
}
