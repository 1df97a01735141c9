package kvstore

import (
	"encoding/json"
	"errors"
	"fmt"
)

// SchemaVersion is the record schema this build writes and the only one it
// reads.
const SchemaVersion = 1

// ErrSchema: a record has no schema version or one this build does not
// know (typically written by a newer release).
var ErrSchema = errors.New("unsupported record schema")

// Encode wraps v's JSON in a versioned envelope: {"schema":1,"data":...}.
func Encode(v any) ([]byte, error) {
	data, err := json.Marshal(v)
	if err != nil {
		return nil, fmt.Errorf("encode record: %w", err)
	}
	return json.Marshal(struct {
		Schema int             `json:"schema"`
		Data   json.RawMessage `json:"data"`
	}{SchemaVersion, data})
}

// Decode unwraps a record written by Encode into v. A missing, unknown or
// newer schema is ErrSchema; the data is not looked at then.
func Decode(b []byte, v any) error {
	var env struct {
		Schema *int            `json:"schema"`
		Data   json.RawMessage `json:"data"`
	}
	if err := json.Unmarshal(b, &env); err != nil {
		return fmt.Errorf("decode record: %w", err)
	}
	switch {
	case env.Schema == nil:
		return fmt.Errorf("decode record: no schema version: %w", ErrSchema)
	case *env.Schema != SchemaVersion:
		return fmt.Errorf("decode record: schema %d, this build reads only schema %d: %w", *env.Schema, SchemaVersion, ErrSchema)
	case len(env.Data) == 0:
		return errors.New("decode record: no data")
	}
	if err := json.Unmarshal(env.Data, v); err != nil {
		return fmt.Errorf("decode record (schema %d): %w", SchemaVersion, err)
	}
	return nil
}
