package kvstore

import (
	"encoding/json"
	"errors"
	"reflect"
	"testing"
)

type testRecord struct {
	Name string   `json:"name"`
	VNI  uint32   `json:"vni"`
	Tags []string `json:"tags,omitempty"`
}

func TestRecordRoundTrip(t *testing.T) {
	in := testRecord{Name: "net1", VNI: 4097, Tags: []string{"a"}}
	b, err := Encode(in)
	if err != nil {
		t.Fatal(err)
	}
	if want := `{"schema":1,"data":{"name":"net1","vni":4097,"tags":["a"]}}`; string(b) != want {
		t.Fatalf("Encode = %s, want %s", b, want)
	}
	var out testRecord
	if err := Decode(b, &out); err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(in, out) {
		t.Fatalf("round trip = %+v, want %+v", out, in)
	}
	if _, err := Encode(func() {}); err == nil {
		t.Fatal("Encode of a func succeeded")
	}
}

func TestDecodeRejects(t *testing.T) {
	tests := []struct {
		name       string
		in         string
		wantSchema bool // ErrSchema expected
	}{
		{"newer schema", `{"schema":2,"data":{"name":"x"}}`, true},
		{"schema zero", `{"schema":0,"data":{}}`, true},
		{"no schema", `{"data":{"name":"x"}}`, true},
		{"bare object", `{"name":"x","vni":1}`, true},
		{"not JSON", `net1`, false},
		{"empty", ``, false},
		{"schema not a number", `{"schema":"1","data":{}}`, false},
		{"no data", `{"schema":1}`, false},
		{"data of the wrong type", `{"schema":1,"data":{"vni":"high"}}`, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var out testRecord
			err := Decode([]byte(tt.in), &out)
			if err == nil {
				t.Fatalf("Decode(%s) succeeded: %+v", tt.in, out)
			}
			if errors.Is(err, ErrSchema) != tt.wantSchema {
				t.Fatalf("Decode(%s) = %v; ErrSchema %v, want %v", tt.in, err, !tt.wantSchema, tt.wantSchema)
			}
		})
	}
}

func FuzzDecode(f *testing.F) {
	for _, seed := range []string{
		`{"schema":1,"data":{"name":"net1","vni":4097}}`,
		`{"schema":2,"data":{}}`,
		`{"schema":1,"data":null}`,
		`{"schema":1e400}`,
		`[]`,
		``,
	} {
		f.Add([]byte(seed))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		var out testRecord
		if err := Decode(b, &out); err != nil {
			return
		}
		// Whatever decodes must survive a round trip unchanged.
		enc, err := Encode(out)
		if err != nil {
			t.Fatalf("Encode(%+v): %v", out, err)
		}
		var again testRecord
		if err := Decode(enc, &again); err != nil {
			t.Fatalf("Decode(Encode(%+v)) = %v", out, err)
		}
		if !reflect.DeepEqual(out, again) {
			t.Fatalf("round trip changed %+v into %+v", out, again)
		}
		var env map[string]json.RawMessage
		if err := json.Unmarshal(enc, &env); err != nil || string(env["schema"]) != "1" {
			t.Fatalf("Encode wrote %s", enc)
		}
	})
}
