package driver

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
)

// Endpoints Docker asked this host to delete whose record is not gone yet
// are kept on disk, one empty file per endpoint ID in a directory of
// DATA_DIR. DeleteEndpoint writes the file before it removes anything and
// removes it once the record is deleted; a failed create whose record
// could not be removed writes one too. A restart reads them back: such an
// endpoint is restored as removed (no veth, no service, its address held)
// and catchUp deletes its record when the store answers. Without them an
// endpoint deleted during a store outage, or by a call a kill -9 cut
// short, came back at the next start from its record, veth, service and
// address included, with no container behind it and nothing left to
// delete it.
//
// A file survives a kill -9 as soon as it is created (the kernel holds
// it), so no fsync is spent on the delete path; a machine crash takes
// the containers with it.

// PendingDirName is the directory's name in DATA_DIR.
const PendingDirName = "deleting"

// pending is that directory; a zero pending keeps nothing (tests with
// fakes, which restart nothing).
type pending struct {
	dir string
}

// endpointIDRE is what may name a file: Docker's endpoint IDs are 64
// hex digits.
var endpointIDRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_.-]*$`)

// mark records that endpoint id is to be deleted.
func (p pending) mark(id string) error {
	if p.dir == "" {
		return nil
	}
	if !endpointIDRE.MatchString(id) {
		return fmt.Errorf("endpoint ID %q cannot name a file in %s", id, p.dir)
	}
	if err := os.MkdirAll(p.dir, 0o700); err != nil {
		return err
	}
	f, err := os.OpenFile(filepath.Join(p.dir, id), os.O_CREATE|os.O_WRONLY, 0o600)
	if err != nil {
		return err
	}
	return f.Close()
}

// clear forgets endpoint id: its record is gone.
func (p pending) clear(id string) error {
	if p.dir == "" || !endpointIDRE.MatchString(id) {
		return nil
	}
	if err := os.Remove(filepath.Join(p.dir, id)); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	return nil
}

// list returns the endpoint IDs marked.
func (p pending) list() (map[string]bool, error) {
	out := map[string]bool{}
	if p.dir == "" {
		return out, nil
	}
	ents, err := os.ReadDir(p.dir)
	if errors.Is(err, os.ErrNotExist) {
		return out, nil
	}
	if err != nil {
		return nil, err
	}
	for _, e := range ents {
		if e.Type().IsRegular() && endpointIDRE.MatchString(e.Name()) {
			out[e.Name()] = true
		}
	}
	return out, nil
}
