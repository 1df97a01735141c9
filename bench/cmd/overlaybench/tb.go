package main

import (
	"context"
	"fmt"
	"io"
	"os"
	"runtime/debug"
	"sync"
	"testing"
)

// runner is a testing.TB for code outside `go test`, so the benchmark can
// reuse internal/testenv and bench/harness, which take a testing.TB. Each
// benchmark section gets one; its cleanups run, last registered first,
// when the section ends. Fatal and Skip must be called from the section's
// goroutine: they unwind it with a panic that runSection recovers.
type runner struct {
	testing.TB // nil: only satisfies TB's unexported method; every method is overridden

	name   string
	ctx    context.Context
	cancel context.CancelFunc
	logw   io.Writer

	mu       sync.Mutex
	cleanups []func()
	failed   bool
	skipped  bool
	reason   string
}

// unwind is what Fatal and Skip panic with.
type unwind struct{}

func newRunner(parent context.Context, name string, logw io.Writer) *runner {
	ctx, cancel := context.WithCancel(parent)
	return &runner{name: name, ctx: ctx, cancel: cancel, logw: logw}
}

// runSection runs fn with a fresh runner and returns an error if it failed
// or was skipped (skipped reports which). Cleanups always run.
func runSection(parent context.Context, name string, logw io.Writer, fn func(t *runner)) (skipped bool, err error) {
	r := newRunner(parent, name, logw)
	func() {
		defer func() {
			if p := recover(); p != nil {
				if _, ok := p.(unwind); !ok {
					r.mu.Lock()
					r.failed = true
					r.reason = fmt.Sprintf("panic: %v\n%s", p, debug.Stack())
					r.mu.Unlock()
				}
			}
		}()
		fn(r)
	}()
	r.finish()
	r.mu.Lock()
	defer r.mu.Unlock()
	switch {
	case r.failed:
		return false, fmt.Errorf("%s: %s", name, r.reason)
	case r.skipped:
		return true, fmt.Errorf("%s skipped: %s", name, r.reason)
	}
	return false, nil
}

// finish cancels the context and runs the cleanups, last first.
func (r *runner) finish() {
	r.cancel()
	for {
		r.mu.Lock()
		if len(r.cleanups) == 0 {
			r.mu.Unlock()
			return
		}
		f := r.cleanups[len(r.cleanups)-1]
		r.cleanups = r.cleanups[:len(r.cleanups)-1]
		r.mu.Unlock()
		func() {
			defer func() {
				if p := recover(); p != nil {
					r.Logf("cleanup panicked: %v", p)
				}
			}()
			f()
		}()
	}
}

func (r *runner) Cleanup(f func()) {
	r.mu.Lock()
	r.cleanups = append(r.cleanups, f)
	r.mu.Unlock()
}

func (r *runner) Log(args ...any) { fmt.Fprintf(r.logw, "[%s] %s\n", r.name, fmt.Sprint(args...)) }
func (r *runner) Logf(format string, args ...any) {
	fmt.Fprintf(r.logw, "[%s] %s\n", r.name, fmt.Sprintf(format, args...))
}

func (r *runner) fail(msg string) {
	r.mu.Lock()
	r.failed = true
	if r.reason == "" {
		r.reason = msg
	}
	r.mu.Unlock()
}

func (r *runner) Error(args ...any) { r.Log(args...); r.fail(fmt.Sprint(args...)) }
func (r *runner) Errorf(format string, args ...any) {
	r.Logf(format, args...)
	r.fail(fmt.Sprintf(format, args...))
}
func (r *runner) Fail()    { r.fail("failed") }
func (r *runner) FailNow() { r.fail("failed"); panic(unwind{}) }
func (r *runner) Failed() bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.failed
}
func (r *runner) Fatal(args ...any) { r.Error(args...); panic(unwind{}) }
func (r *runner) Fatalf(format string, args ...any) {
	r.Errorf(format, args...)
	panic(unwind{})
}
func (r *runner) Helper()      {}
func (r *runner) Name() string { return r.name }
func (r *runner) Setenv(key, value string) {
	old, had := os.LookupEnv(key)
	_ = os.Setenv(key, value)
	r.Cleanup(func() {
		if had {
			_ = os.Setenv(key, old)
		} else {
			_ = os.Unsetenv(key)
		}
	})
}
func (r *runner) Chdir(dir string) {
	old, err := os.Getwd()
	if err != nil {
		r.Fatal(err)
	}
	if err := os.Chdir(dir); err != nil {
		r.Fatal(err)
	}
	r.Cleanup(func() { _ = os.Chdir(old) })
}
func (r *runner) Skip(args ...any) { r.skip(fmt.Sprint(args...)) }
func (r *runner) Skipf(format string, args ...any) {
	r.skip(fmt.Sprintf(format, args...))
}
func (r *runner) SkipNow() { r.skip("skipped") }
func (r *runner) skip(msg string) {
	r.Log("SKIP: " + msg)
	r.mu.Lock()
	r.skipped = true
	r.reason = msg
	r.mu.Unlock()
	panic(unwind{})
}
func (r *runner) Skipped() bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.skipped
}
func (r *runner) TempDir() string {
	dir, err := os.MkdirTemp("", "overlaybench-")
	if err != nil {
		r.Fatal(err)
	}
	r.Cleanup(func() { _ = os.RemoveAll(dir) })
	return dir
}
func (r *runner) Context() context.Context { return r.ctx }
func (r *runner) Output() io.Writer        { return r.logw }
func (r *runner) ArtifactDir() string      { return r.TempDir() }
func (r *runner) Attr(key, value string)   {}

var _ testing.TB = (*runner)(nil)
