package main

import (
	"runtime/debug"
	"testing"
)

func TestApplyMemoryDefaults(t *testing.T) {
	old := debug.SetGCPercent(100)
	defer debug.SetGCPercent(old)
	env := func(m map[string]string) func(string) string { return func(k string) string { return m[k] } }
	if applyMemoryDefaults(env(map[string]string{"GOGC": "200"})) {
		t.Fatal("GOGC set: the default was applied anyway")
	}
	if got := debug.SetGCPercent(100); got != 100 {
		t.Fatalf("GOGC set: GC percent changed to %d", got)
	}
	if !applyMemoryDefaults(env(nil)) {
		t.Fatal("GOGC unset: the default was not applied")
	}
	if got := debug.SetGCPercent(100); got != defaultGCPercent {
		t.Fatalf("GOGC unset: GC percent %d, want %d", got, defaultGCPercent)
	}
}
