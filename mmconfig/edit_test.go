package mmconfig

import (
	"bytes"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"runtime"
	"strings"
	"testing"
)

var update = flag.Bool("update", false, "rewrite testdata/*.golden.json from the current output")

var testTLS = TLS{
	ListenAddress: ":443",
	CertFile:      "/opt/mattermost/config/fullchain.pem",
	KeyFile:       "/opt/mattermost/config/privkey.pem",
}

func TestEditGolden(t *testing.T) {
	inputs, err := filepath.Glob("testdata/*.in.json")
	if err != nil || len(inputs) == 0 {
		t.Fatalf("no golden inputs: %v", err)
	}
	for _, in := range inputs {
		name := strings.TrimSuffix(filepath.Base(in), ".in.json")
		t.Run(name, func(t *testing.T) {
			doc, err := os.ReadFile(in)
			if err != nil {
				t.Fatal(err)
			}
			out, changes, err := Edit(doc, testTLS.Settings())
			if err != nil {
				t.Fatalf("Edit: %v", err)
			}
			golden := strings.TrimSuffix(in, ".in.json") + ".golden.json"
			if *update {
				if err := os.WriteFile(golden, out, 0o644); err != nil {
					t.Fatal(err)
				}
			}
			want, err := os.ReadFile(golden)
			if err != nil {
				t.Fatalf("read golden (run with -update to create): %v", err)
			}
			if !bytes.Equal(out, want) {
				t.Errorf("output differs from %s:\n%s", golden, out)
			}
			if !json.Valid(out) {
				t.Fatalf("output is not valid JSON:\n%s", out)
			}
			assertOnlyOwnedChanged(t, doc, out)
			if name == "already-set" && (len(changes) != 0 || !bytes.Equal(out, doc)) {
				t.Errorf("already-set config changed: %v", changes)
			}
			// Applying the edit again changes nothing.
			again, changes2, err := Edit(out, testTLS.Settings())
			if err != nil || len(changes2) != 0 || !bytes.Equal(again, out) {
				t.Errorf("second edit: err %v, changes %v", err, changes2)
			}
		})
	}
}

// assertOnlyOwnedChanged decodes both documents and checks that everything
// but the owned keys is semantically identical.
func assertOnlyOwnedChanged(t *testing.T, before, after []byte) {
	t.Helper()
	strip := func(doc []byte) map[string]any {
		var m map[string]any
		if err := json.Unmarshal(doc, &m); err != nil {
			t.Fatalf("decode: %v", err)
		}
		// Keys match ignoring case, as Mattermost decodes them.
		for sec, v := range m {
			ss, ok := v.(map[string]any)
			if !ok || !strings.EqualFold(sec, Section) {
				continue
			}
			for k := range ss {
				for _, owned := range OwnedKeys() {
					if strings.EqualFold(k, strings.TrimPrefix(owned, Section+".")) {
						delete(ss, k)
					}
				}
			}
			if len(ss) == 0 {
				delete(m, sec)
			}
		}
		return m
	}
	if a, b := strip(before), strip(after); !reflect.DeepEqual(a, b) {
		t.Errorf("keys other than the owned ones changed:\nbefore %v\nafter  %v", a, b)
	}
	var m struct {
		ServiceSettings struct {
			ListenAddress, ConnectionSecurity, TLSCertFile, TLSKeyFile, SiteURL any
			UseLetsEncrypt                                                      any
		}
	}
	json.Unmarshal(after, &m)
	got := map[string]any{"ListenAddress": m.ServiceSettings.ListenAddress, "ConnectionSecurity": m.ServiceSettings.ConnectionSecurity,
		"TLSCertFile": m.ServiceSettings.TLSCertFile, "TLSKeyFile": m.ServiceSettings.TLSKeyFile, "SiteURL": m.ServiceSettings.SiteURL,
		"UseLetsEncrypt": m.ServiceSettings.UseLetsEncrypt}
	for _, s := range testTLS.Settings() {
		if got := got[s.Key]; !reflect.DeepEqual(got, s.Value) {
			t.Errorf("%s = %v, want %v", s.Name(), got, s.Value)
		}
	}
}

func TestEditReportsChanges(t *testing.T) {
	doc, _ := os.ReadFile("testdata/typical.in.json")
	_, changes, err := Edit(doc, testTLS.Settings())
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, c := range changes {
		got = append(got, c.Key+" "+string(c.Old)+" -> "+string(c.New))
	}
	want := []string{
		`ServiceSettings.ListenAddress ":8065" -> ":443"`,
		`ServiceSettings.ConnectionSecurity "" -> "TLS"`,
		`ServiceSettings.TLSCertFile "" -> "/opt/mattermost/config/fullchain.pem"`,
		`ServiceSettings.TLSKeyFile "" -> "/opt/mattermost/config/privkey.pem"`,
	}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("changes:\n got %q\nwant %q", got, want)
	}
}

func TestEditRefuses(t *testing.T) {
	tests := []struct {
		name, doc, want string
	}{
		{"not json", `{"ServiceSettings": {`, "parse config: line 1, column 21: unexpected end of JSON input"},
		{"array", `[1, 2]`, "config: not a JSON object"},
		{"section not object", `{"ServiceSettings": "x"}`, "config: ServiceSettings: not a JSON object"},
		{"trailing garbage", `{} {}`, "parse config: line 1, column 4: invalid character '{' after top-level value"},
		{"a missing comma, line 3", "{\n  \"ServiceSettings\": {\n    \"SiteURL\": \"https://x\"\n    \"ListenAddress\": \":443\"\n  }\n}", "parse config: line 4, column 5: invalid character '\"' after object key:value pair"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, _, err := Edit([]byte(tt.doc), testTLS.Settings())
			if err == nil || err.Error() != tt.want {
				t.Errorf("Edit error = %v, want %q", err, tt.want)
			}
		})
	}
}

func FuzzEdit(f *testing.F) {
	for _, in := range []string{"typical", "compact", "tabs-crlf", "duplicate-keys", "empty-service-settings"} {
		doc, err := os.ReadFile("testdata/" + in + ".in.json")
		if err != nil {
			f.Fatal(err)
		}
		f.Add(doc)
	}
	f.Add([]byte(`{"ServiceSettings":{"ListenAddress":"\u0022:1\\\""}}`))
	f.Fuzz(func(t *testing.T, doc []byte) {
		out, _, err := Edit(doc, testTLS.Settings())
		if err != nil {
			return
		}
		if !json.Valid(out) {
			t.Fatalf("Edit produced invalid JSON from %q:\n%q", doc, out)
		}
		var before, after map[string]any
		if json.Unmarshal(doc, &before) != nil || json.Unmarshal(out, &after) != nil {
			return // valid JSON but not an object map (duplicate-key type clash)
		}
		assertOnlyOwnedChanged(t, doc, out)
		again, changes, err := Edit(out, testTLS.Settings())
		if err != nil || len(changes) != 0 || !bytes.Equal(again, out) {
			t.Fatalf("edit not idempotent: %v %v", err, changes)
		}
	})
}

func TestLookup(t *testing.T) {
	doc := []byte(`{"ServiceSettings": {"SiteURL": "https://a", "SiteURL": "https://b", "N": null}, "X": 1}`)
	for _, tt := range []struct{ key, want string }{{"SiteURL", "https://b"}, {"N", ""}, {"Missing", ""}} {
		got, err := LookupString(doc, Section, tt.key)
		if err != nil || got != tt.want {
			t.Errorf("LookupString(%s) = %q, %v; want %q", tt.key, got, err, tt.want)
		}
	}
	if _, err := Lookup([]byte(`{"ServiceSettings": 3}`), Section, "SiteURL"); err == nil || err.Error() != "config: ServiceSettings: not a JSON object" {
		t.Errorf("non-object section: %v", err)
	}
}

// Keys match as Mattermost decodes them (encoding/json ignores case): a
// key in another case is edited in place, and a key spelled two ways is
// refused, since the last one wins whatever mmtls writes.
func TestEditMatchesKeysAsMattermostDecodes(t *testing.T) {
	doc := []byte(`{"ServiCeSettings": {"tlskeyfile": "/old", "SiteURL": "https://chat.example.com"}}`)
	out, _, err := Edit(doc, testTLS.Settings())
	if err != nil {
		t.Fatal(err)
	}
	if bytes.Contains(out, []byte(`"ServiceSettings"`)) || bytes.Contains(out, []byte(`"TLSKeyFile"`)) {
		t.Errorf("added a second spelling instead of editing in place:\n%s", out)
	}
	var got struct{ ServiceSettings struct{ TLSKeyFile string } }
	if err := json.Unmarshal(out, &got); err != nil || got.ServiceSettings.TLSKeyFile != testTLS.KeyFile {
		t.Errorf("as Mattermost decodes it, TLSKeyFile = %q (%v), want %q", got.ServiceSettings.TLSKeyFile, err, testTLS.KeyFile)
	}

	for _, amb := range []string{
		`{"ServiceSettings": {"TLSKeyFile": "/old", "tlskeyfile": "/etc/hostname"}}`,
		`{"ServiceSettings": {"TLSKeyFile": "/old"}, "servicesettings": {"TLSKeyFile": "/etc/hostname"}}`,
	} {
		if _, _, err := Edit([]byte(amb), testTLS.Settings()); !errors.Is(err, ErrAmbiguous) {
			t.Errorf("Edit(%s) = %v, want ErrAmbiguous", amb, err)
		}
		if _, err := Lookup([]byte(amb), "ServiceSettings", "TLSKeyFile"); !errors.Is(err, ErrAmbiguous) {
			t.Errorf("Lookup(%s) = %v, want ErrAmbiguous", amb, err)
		}
	}
	if v, err := LookupString([]byte(`{"sqlsettings": {"datasource": "postgres://x"}}`), "SqlSettings", "DataSource"); err != nil || v != "postgres://x" {
		t.Errorf("LookupString in another case = %q, %v", v, err)
	}
}

// Thousands of duplicate members cost one copy of the document, not one
// per duplicate (which made a 680 KB file take 32 s).
func TestEditDuplicatesIsLinear(t *testing.T) {
	doc := duplicates(4000)
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	out, _, err := Edit(doc, testTLS.Settings())
	runtime.ReadMemStats(&after)
	if err != nil {
		t.Fatal(err)
	}
	if n := bytes.Count(out, []byte(testTLS.KeyFile)); n != 4000 {
		t.Errorf("%d of 4000 duplicates set", n)
	}
	if alloc := after.TotalAlloc - before.TotalAlloc; alloc > uint64(500*len(doc)) { // one copy per duplicate is 4000x
		t.Errorf("editing a %d-byte document allocated %d bytes: quadratic in its duplicates", len(doc), alloc)
	}
}

func BenchmarkEditDuplicates(b *testing.B) {
	doc := duplicates(40000)
	b.SetBytes(int64(len(doc)))
	for b.Loop() {
		if _, _, err := Edit(doc, testTLS.Settings()); err != nil {
			b.Fatal(err)
		}
	}
}

// duplicates is a config with n duplicate TLSKeyFile members.
func duplicates(n int) []byte {
	var b bytes.Buffer
	b.WriteString(`{"ServiceSettings": {`)
	for i := range n {
		fmt.Fprintf(&b, `"TLSKeyFile": "/old/%d", `, i)
	}
	b.WriteString(`"SiteURL": "https://chat.example.com"}}`)
	return b.Bytes()
}
