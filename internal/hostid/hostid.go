// Package hostid gives a plugin instance its identity and keeps a second
// instance from running on the same state.
//
//   - Load: the host's identity, a random 128-bit hex string created once
//     in DATA_DIR/host-id (mode 0600) and never derived from a shared Consul
//     agent or a hostname, so hosts that share an agent or a name stay
//     distinct. A copied DATA_DIR copies the identity; the store's claim on
//     hosts/<id> (see kvstore.Consul.Claim) refuses the copy while the
//     original is live.
//   - Lock: an exclusive, non-blocking flock on DATA_DIR/lock holding the
//     owner's pid, so a second instance on the same DATA_DIR fails at once
//     naming the first, instead of waiting on the embedded store's lock.
//   - ListenInstance: an abstract unix socket named after the KV prefix and
//     the store address. Abstract sockets belong to a network namespace, so
//     two instances that would program the same namespace from the same
//     state collide on it, and the second learns the first's pid
//     (SO_PEERCRED) and what it serves.
package hostid

import (
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// IDFile and LockFile are the names of the identity and the lock in
// DATA_DIR.
const (
	IDFile   = "host-id"
	LockFile = "lock"
)

// ErrInUse: another instance holds the DATA_DIR lock or the instance
// socket.
var ErrInUse = errors.New("in use by another consul-overlay instance")

// Load returns the identity in dir/host-id, creating it (32 lower-case hex
// digits, mode 0600, written atomically) if the file does not exist. A
// file that is not such an identity is an error: replacing it would make
// this host a new host behind the user's back.
func Load(dir string) (string, error) {
	return LoadOr(dir, "")
}

// LoadOr is Load, but a missing identity becomes legacy instead of a new
// random one when legacy is not empty: the node name under which an
// earlier version (before host identities) recorded this host's state, so
// an upgraded host keeps its memberships, endpoints and addresses. The
// caller passes it only when the store holds such state of this host.
func LoadOr(dir, legacy string) (string, error) {
	path := filepath.Join(dir, IDFile)
	b, err := os.ReadFile(path)
	switch {
	case err == nil:
		id := strings.TrimSpace(string(b))
		// An adopted node name is written with a prefix, so a corrupt
		// file is never taken for one.
		if name, ok := strings.CutPrefix(id, legacyPrefix); ok && ValidLegacy(name) {
			return name, nil
		}
		if !Valid(id) {
			return "", fmt.Errorf("host identity %s holds %q, not 32 hex digits: restore it from a backup, or remove it to make this a new host", path, tail(id))
		}
		return id, nil
	case !errors.Is(err, os.ErrNotExist):
		return "", fmt.Errorf("read host identity %s: %w", path, err)
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return "", fmt.Errorf("create DATA_DIR %s: %w", dir, err)
	}
	id := legacy
	if id == "" {
		raw := make([]byte, 16)
		if _, err := rand.Read(raw); err != nil {
			return "", fmt.Errorf("new host identity: %w", err)
		}
		id = hex.EncodeToString(raw)
	} else if !ValidLegacy(id) {
		return "", fmt.Errorf("adopt node name %q as the host identity: not a valid name", tail(id))
	}
	tmp, err := os.CreateTemp(dir, IDFile+".tmp-*")
	if err != nil {
		return "", fmt.Errorf("write host identity %s: %w", path, err)
	}
	defer os.Remove(tmp.Name())
	if err := tmp.Chmod(0o600); err != nil {
		tmp.Close()
		return "", fmt.Errorf("write host identity %s: %w", path, err)
	}
	content := id
	if legacy != "" {
		content = legacyPrefix + id
	}
	if _, err := tmp.WriteString(content + "\n"); err != nil {
		tmp.Close()
		return "", fmt.Errorf("write host identity %s: %w", path, err)
	}
	if err := tmp.Sync(); err != nil {
		tmp.Close()
		return "", fmt.Errorf("write host identity %s: %w", path, err)
	}
	if err := tmp.Close(); err != nil {
		return "", fmt.Errorf("write host identity %s: %w", path, err)
	}
	// Link, not rename: if another process created the file meanwhile,
	// its identity wins and we read it back.
	if err := os.Link(tmp.Name(), path); err != nil {
		if errors.Is(err, os.ErrExist) {
			return LoadOr(dir, "")
		}
		return "", fmt.Errorf("write host identity %s: %w", path, err)
	}
	if d, err := os.Open(dir); err == nil {
		_ = d.Sync()
		d.Close()
	}
	return id, nil
}

// Read returns the identity in dir/host-id without creating one; an
// error wraps os.ErrNotExist when there is none.
func Read(dir string) (string, error) {
	b, err := os.ReadFile(filepath.Join(dir, IDFile))
	if err != nil {
		return "", err
	}
	id := strings.TrimSpace(string(b))
	if name, ok := strings.CutPrefix(id, legacyPrefix); ok && ValidLegacy(name) {
		return name, nil
	}
	if !Valid(id) {
		return "", fmt.Errorf("host identity %s holds %q, not an identity", filepath.Join(dir, IDFile), tail(id))
	}
	return id, nil
}

// ValidLegacy reports whether s can be an identity adopted from an earlier
// version: a node name of letters, digits, '.', '_' and '-'.
func ValidLegacy(s string) bool {
	return legacyRE.MatchString(s)
}

// legacyPrefix marks an adopted node name in the identity file.
const legacyPrefix = "node-name:"

var legacyRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$`)

// Valid reports whether s has the form of an identity Load creates.
func Valid(s string) bool {
	if len(s) != 32 {
		return false
	}
	for _, r := range s {
		if !('0' <= r && r <= '9' || 'a' <= r && r <= 'f') {
			return false
		}
	}
	return true
}

func tail(s string) string {
	if len(s) > 40 {
		return s[:40] + "…"
	}
	return s
}

// Exited reports whether pid names a process that no longer exists. The
// owner of a lock or socket that exited while still holding it was killed
// while starting a program: between fork and exec the child holds a copy
// of every descriptor, close-on-exec ones included, so it keeps the
// resource for the moment it takes to exec. pid 0 (unknown, or in a pid
// namespace we cannot see) is not known to have exited.
func Exited(pid int) bool {
	return pid > 0 && errors.Is(unix.Kill(pid, 0), unix.ESRCH)
}

// releaseWait bounds the wait for a dead owner's child to let a resource
// go (see Exited): it execs within milliseconds even on a loaded host.
const releaseWait = 3 * time.Second

// awaitRelease retries try while its error is busy, up to releaseWait:
// the resource is held by a child of pid, which has exited (see Exited).
// It returns what it waited and try's last error.
func awaitRelease(pid int, try func() error, busy func(error) bool) (Waited, error) {
	start := time.Now()
	for {
		err := try()
		if !busy(err) || time.Since(start) > releaseWait {
			return Waited{Pid: pid, For: time.Since(start)}, err
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// Waited says that a lock or socket was taken only after the process
// holding it had exited (see Exited): Pid is that process (0: none), For
// how long the taker waited for the program it had started to let go.
type Waited struct {
	Pid int
	For time.Duration
}

// holder names the process holding a lock or socket in an ErrInUse error.
func holder(pid int) string {
	switch {
	case pid == 0:
		return "pid unknown"
	case Exited(pid):
		return fmt.Sprintf("pid %d, which is not running here: a program it started still holds it, or it runs in another pid namespace", pid)
	}
	return fmt.Sprintf("pid %d", pid)
}

// DirLock is the exclusive lock on DATA_DIR/lock, held until Close (or
// the process's death: the kernel drops a flock with its last descriptor).
type DirLock struct {
	f      *os.File
	path   string
	file   string // "<dev>:<inode>" of the lock file
	waited Waited
}

// Lock takes the DATA_DIR lock without waiting and writes this process's
// pid into it. If another process holds it, the error (errors.Is ErrInUse)
// names that process's pid.
func Lock(dir string) (*DirLock, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("create DATA_DIR %s: %w", dir, err)
	}
	path := filepath.Join(dir, LockFile)
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("open lock %s: %w", path, err)
	}
	flock := func() error { return unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB) }
	var waited Waited
	err = flock()
	if errors.Is(err, unix.EWOULDBLOCK) {
		// The pid in the file is the holder's, written when it took the
		// lock (a pid we cannot read waits for nothing).
		pid := 0
		if b, rerr := os.ReadFile(path); rerr == nil {
			if n, perr := strconv.Atoi(strings.TrimSpace(string(b))); perr == nil && n > 0 {
				pid = n
			}
		}
		if Exited(pid) {
			waited, err = awaitRelease(pid, flock, func(err error) bool { return errors.Is(err, unix.EWOULDBLOCK) })
		}
		if errors.Is(err, unix.EWOULDBLOCK) {
			f.Close()
			return nil, fmt.Errorf("DATA_DIR %s is %w (%s, holding %s): stop that instance, or give this one its own DATA_DIR", dir, ErrInUse, holder(pid), path)
		}
	}
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("lock %s: %w", path, err)
	}
	var st unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &st); err != nil {
		f.Close()
		return nil, fmt.Errorf("stat lock %s: %w", path, err)
	}
	if err := f.Truncate(0); err == nil {
		_, err = f.WriteAt([]byte(strconv.Itoa(os.Getpid())+"\n"), 0)
		if err != nil {
			f.Close()
			return nil, fmt.Errorf("write pid into lock %s: %w", path, err)
		}
	}
	return &DirLock{f: f, path: path, file: fmt.Sprintf("%d:%d", st.Dev, st.Ino), waited: waited}, nil
}

// Waited reports whether the lock was taken from an exited holder's child.
func (l *DirLock) Waited() Waited { return l.waited }

// File names the lock file by device and inode: the same DATA_DIR seen
// through another mount has the same name, a copy of it does not.
func (l *DirLock) File() string { return l.file }

// Close releases the lock. The pid stays in the file; only the flock
// tells whether it is held.
func (l *DirLock) Close() error { return l.f.Close() }

// BootID is the kernel's boot ID: it tells a restart of this very host
// (same boot) from another machine.
func BootID() string {
	b, err := os.ReadFile("/proc/sys/kernel/random/boot_id")
	if err != nil {
		return ""
	}
	return strings.TrimSpace(string(b))
}

// socketName is the abstract socket of (KV prefix, store address).
func socketName(prefix, store string) string {
	sum := sha256.Sum256([]byte(prefix + "\x00" + store))
	return "@consul-overlay/" + hex.EncodeToString(sum[:12])
}
