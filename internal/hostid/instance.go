package hostid

import (
	"bufio"
	"errors"
	"fmt"
	"net"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// Instance is the bound instance socket. Whoever connects reads one line,
// the owner's description, and is disconnected.
type Instance struct {
	l      net.Listener
	name   string
	wg     sync.WaitGroup
	waited Waited
}

// ListenInstance binds the abstract unix socket of (prefix, store) in the
// caller's network namespace. store names the state store (Consul's
// address, or "embedded"). If another process has it bound, the error
// (errors.Is ErrInUse) names that process's pid and its description.
// describe is what this instance tells a later one (one line: for example
// its node name, DATA_DIR and socket).
func ListenInstance(prefix, store, describe string) (*Instance, error) {
	name := socketName(prefix, store)
	var l net.Listener
	listen := func() (err error) {
		l, err = net.Listen("unix", name)
		return err
	}
	inUse := func(err error) bool { return errors.Is(err, syscall.EADDRINUSE) }
	var waited Waited
	err := listen()
	if inUse(err) {
		pid, desc, perr := Peer(name)
		if perr == nil && Exited(pid) {
			// An abstract name cannot be unlinked: a dead owner's child
			// (see Exited) is waited out, and whoever holds the name
			// after that is asked again.
			if waited, err = awaitRelease(pid, listen, inUse); inUse(err) {
				pid, desc, perr = Peer(name)
			}
		}
		if inUse(err) {
			who := holder(pid)
			if perr != nil {
				who = fmt.Sprintf("pid unknown: %v", perr)
			}
			if desc != "" {
				who += ", " + desc
			}
			return nil, fmt.Errorf("KV prefix %q of store %s is %w in this network namespace (%s): stop it, or give this one another KV_PREFIX", prefix, store, ErrInUse, who)
		}
	}
	if err != nil {
		return nil, fmt.Errorf("bind instance socket %s: %w", name, err)
	}
	in := &Instance{l: l, name: name, waited: waited}
	describe = strings.ReplaceAll(describe, "\n", " ")
	in.wg.Add(1)
	go func() {
		defer in.wg.Done()
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			_ = c.SetWriteDeadline(time.Now().Add(time.Second))
			_, _ = c.Write([]byte(describe + "\n"))
			c.Close()
		}
	}()
	return in, nil
}

// Waited reports whether the socket was bound after an exited owner's
// child let it go.
func (in *Instance) Waited() Waited { return in.waited }

// Name is the socket's abstract name ("@" for the leading NUL).
func (in *Instance) Name() string { return in.name }

// Close unbinds the socket and waits for its goroutine.
func (in *Instance) Close() error {
	err := in.l.Close()
	in.wg.Wait()
	return err
}

// Peer connects to the unix socket at addr (a path, or "@name" for an
// abstract one) and returns the pid of the process that listens on it
// (SO_PEERCRED; 0 if that process is in a pid namespace we cannot see)
// and the first line it sends, if any within a short wait.
func Peer(addr string) (pid int, line string, err error) {
	c, err := net.DialTimeout("unix", addr, time.Second)
	if err != nil {
		return 0, "", err
	}
	defer c.Close()
	uc := c.(*net.UnixConn)
	raw, err := uc.SyscallConn()
	if err != nil {
		return 0, "", err
	}
	var cred *unix.Ucred
	var cerr error
	if err := raw.Control(func(fd uintptr) {
		cred, cerr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
	}); err != nil {
		return 0, "", err
	}
	if cerr != nil {
		return 0, "", fmt.Errorf("SO_PEERCRED: %w", cerr)
	}
	if strings.HasPrefix(addr, "@") {
		_ = c.SetReadDeadline(time.Now().Add(500 * time.Millisecond))
		if s, err := bufio.NewReader(c).ReadString('\n'); err == nil {
			line = strings.TrimSpace(s)
		}
	}
	return int(cred.Pid), line, nil
}
