package mmconfig

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"reflect"
	"strings"
)

// Setting is one value to set at Section.Key of a config document.
type Setting struct {
	Section, Key string
	Value        any // encoded with encoding/json
}

// Name returns "Section.Key".
func (s Setting) Name() string { return s.Section + "." + s.Key }

// Change is one setting whose value an edit changes. Old is nil when the key
// was absent.
type Change struct {
	Key string          `json:"key"`
	Old json.RawMessage `json:"old,omitempty"`
	New json.RawMessage `json:"new"`
}

// ErrNotObject is returned for a document, or a section, that is not a JSON object.
var ErrNotObject = errors.New("not a JSON object")

// Edit sets each setting in doc and returns the new document and what
// changed. Only the bytes of the values it changes (or the members it adds)
// differ: every other key, unknown ones included, keeps its value, order and
// formatting. A setting that already holds an equal value is left as it is;
// when nothing changes, the returned document is doc itself. Keys match as
// Mattermost decodes them, ignoring case; duplicate keys are all set, since
// encoding/json lets the last one win, and a key spelled two ways is refused
// (ErrAmbiguous). Edit is pure, linear in the document's size, and safe for
// concurrent use.
func Edit(doc []byte, settings []Setting) ([]byte, []Change, error) {
	if !json.Valid(doc) {
		return nil, nil, syntaxError(doc)
	}
	out := doc
	var changes []Change
	for _, s := range settings {
		newRaw, err := encode(s.Value)
		if err != nil {
			return nil, nil, fmt.Errorf("encode %s: %w", s.Name(), err)
		}
		var changed bool
		var old json.RawMessage
		out, old, changed, err = set(out, s.Section, s.Key, newRaw)
		if err != nil {
			return nil, nil, err
		}
		if changed {
			changes = append(changes, Change{Key: s.Name(), Old: old, New: newRaw})
		}
	}
	return out, changes, nil
}

func encode(v any) ([]byte, error) {
	var b bytes.Buffer
	enc := json.NewEncoder(&b)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(v); err != nil {
		return nil, err
	}
	return bytes.TrimRight(b.Bytes(), "\n"), nil
}

// set puts raw at section.key. old is the previous value (the last one, if
// duplicated), nil when absent.
func set(doc []byte, section, key string, raw []byte) ([]byte, json.RawMessage, bool, error) {
	top, err := parseObject(doc, skipWS(doc, 0))
	if err != nil {
		return nil, nil, false, fmt.Errorf("config: %w", err)
	}
	secs := top.find(section)
	if err := unambiguous(secs, section); err != nil {
		return nil, nil, false, err
	}
	if len(secs) == 0 {
		member := fmt.Sprintf("%q: {%q: %s}", section, key, raw)
		if top.multiline(doc) {
			ind := top.memberIndent(doc)
			member = fmt.Sprintf("%q: {\n%s%q: %s\n%s}", section, ind+"    ", key, raw, ind)
		}
		return top.insert(doc, member), nil, true, nil
	}
	// Every member that decodes into the setting is set; the edits are
	// collected and applied in one pass, so a document with thousands of
	// duplicates costs one copy, not one per duplicate.
	var (
		old     json.RawMessage
		edits   []span
		members []member
		lastObj *object
	)
	for i, sec := range secs {
		if doc[sec.valStart] != '{' {
			return nil, nil, false, fmt.Errorf("config: %s: %w", section, ErrNotObject)
		}
		obj, err := parseObject(doc, sec.valStart)
		if err != nil {
			return nil, nil, false, fmt.Errorf("config: %s: %w", section, err)
		}
		if i == len(secs)-1 {
			lastObj = obj
		}
		members = append(members, obj.find(key)...)
	}
	if err := unambiguous(members, section+"."+key); err != nil {
		return nil, nil, false, err
	}
	if len(members) > 0 {
		// encoding/json lets the last one win: that is the value in force.
		m := members[len(members)-1]
		old = append(json.RawMessage(nil), doc[m.valStart:m.valEnd]...)
	}
	for _, m := range members {
		if !sameJSON(doc[m.valStart:m.valEnd], raw) {
			edits = append(edits, span{m.valStart, m.valEnd, raw})
		}
	}
	if len(lastObj.find(key)) == 0 {
		// The last section's values win when decoding: add it there too.
		sep := ": "
		if len(lastObj.members) > 0 {
			last := lastObj.members[len(lastObj.members)-1]
			sep = string(doc[last.keyEnd:last.valStart])
		}
		spelling := key
		if len(members) > 0 {
			spelling = members[0].key // one spelling, the one already there
		}
		edits = append(edits, lastObj.insertSpan(doc, fmt.Sprintf("%q%s%s", spelling, sep, raw)))
	}
	if len(edits) == 0 {
		return doc, old, false, nil
	}
	return applySpans(doc, edits), old, true, nil
}

// span replaces doc[start:end] with repl.
type span struct {
	start, end int
	repl       []byte
}

// applySpans applies non-overlapping spans, given in document order, in one
// pass.
func applySpans(doc []byte, spans []span) []byte {
	n := len(doc)
	for _, s := range spans {
		n += len(s.repl) - (s.end - s.start)
	}
	out := make([]byte, 0, n)
	at := 0
	for _, s := range spans {
		out = append(out, doc[at:s.start]...)
		out = append(out, s.repl...)
		at = s.end
	}
	return append(out, doc[at:]...)
}

// ErrAmbiguous is returned for a config with two spellings of one key
// ("TLSKeyFile" and "tlskeyfile"): Mattermost decodes keys ignoring case,
// so both set one setting and the last wins, whatever mmtls edits.
var ErrAmbiguous = errors.New("ambiguous key")

// unambiguous refuses members that spell one key in more than one way.
func unambiguous(ms []member, name string) error {
	for _, m := range ms[min(1, len(ms)):] {
		if m.key != ms[0].key {
			return fmt.Errorf("config: %s is written both as %q and as %q; Mattermost reads keys ignoring case, "+
				"so both set the same setting and the last one wins: keep one spelling (%w)", name, ms[0].key, m.key, ErrAmbiguous)
		}
	}
	return nil
}

func sameJSON(a, b []byte) bool {
	if bytes.Equal(a, b) {
		return true
	}
	var va, vb any
	if json.Unmarshal(a, &va) != nil || json.Unmarshal(b, &vb) != nil {
		return false
	}
	return reflect.DeepEqual(va, vb)
}

// The scanner below runs only on documents json.Valid accepted, so it can be
// small: it finds spans, it does not validate.

type member struct {
	key              string
	keyStart, keyEnd int // the quoted key
	valStart, valEnd int
}

type object struct {
	start, end int // '{' and one past '}'
	members    []member
}

// find returns the members that encoding/json decodes into the field key:
// its name in any case (Unicode simple folding, as encoding/json matches).
func (o *object) find(key string) []member {
	var out []member
	for _, m := range o.members {
		if strings.EqualFold(m.key, key) {
			out = append(out, m)
		}
	}
	return out
}

func (o *object) multiline(doc []byte) bool {
	return bytes.IndexByte(doc[o.start:o.end], '\n') >= 0
}

// memberIndent is the whitespace before the object's last member on its
// line, or the object's own indentation plus four spaces when it is empty.
func (o *object) memberIndent(doc []byte) string {
	if len(o.members) > 0 {
		return lineIndent(doc, o.members[len(o.members)-1].keyStart)
	}
	return lineIndent(doc, o.start) + "    "
}

func lineIndent(doc []byte, pos int) string {
	ls := bytes.LastIndexByte(doc[:pos], '\n') + 1
	i := ls
	for i < pos && (doc[i] == ' ' || doc[i] == '\t') {
		i++
	}
	return string(doc[ls:i])
}

// insert adds member text as the object's last member, in the object's style.
func (o *object) insert(doc []byte, text string) []byte {
	return applySpans(doc, []span{o.insertSpan(doc, text)})
}

// insertSpan is the edit that insert makes.
func (o *object) insertSpan(doc []byte, text string) span {
	nl := "\n"
	if bytes.Contains(doc, []byte("\r\n")) {
		nl = "\r\n"
	}
	text = strings.ReplaceAll(text, "\n", nl)
	if len(o.members) == 0 {
		if bytes.IndexByte(doc, '\n') >= 0 {
			outer := lineIndent(doc, o.start)
			return span{o.start + 1, o.end - 1, []byte(nl + outer + "    " + text + nl + outer)}
		}
		return span{o.start + 1, o.end - 1, []byte(text)}
	}
	last := o.members[len(o.members)-1]
	sep := ","
	if o.multiline(doc) {
		sep = "," + nl + o.memberIndent(doc)
	} else if bytes.HasPrefix(doc[last.keyEnd:], []byte(": ")) {
		sep = ", "
	}
	return span{last.valEnd, last.valEnd, []byte(sep + text)}
}

func parseObject(doc []byte, i int) (*object, error) {
	if i >= len(doc) || doc[i] != '{' {
		return nil, ErrNotObject
	}
	o := &object{start: i}
	i = skipWS(doc, i+1)
	if doc[i] == '}' {
		o.end = i + 1
		return o, nil
	}
	for {
		var m member
		m.keyStart = i
		m.keyEnd = scanString(doc, i)
		if err := json.Unmarshal(doc[m.keyStart:m.keyEnd], &m.key); err != nil {
			return nil, err
		}
		i = skipWS(doc, m.keyEnd)
		i = skipWS(doc, i+1) // ':'
		m.valStart = i
		m.valEnd = scanValue(doc, i)
		o.members = append(o.members, m)
		i = skipWS(doc, m.valEnd)
		if doc[i] == '}' {
			o.end = i + 1
			return o, nil
		}
		i = skipWS(doc, i+1) // ','
	}
}

func skipWS(doc []byte, i int) int {
	for i < len(doc) && strings.IndexByte(" \t\r\n", doc[i]) >= 0 {
		i++
	}
	return i
}

// scanString returns one past the closing quote of the string at i.
func scanString(doc []byte, i int) int {
	for i++; i < len(doc); i++ {
		switch doc[i] {
		case '\\':
			i++
		case '"':
			return i + 1
		}
	}
	return i
}

// scanValue returns one past the end of the value at i.
func scanValue(doc []byte, i int) int {
	switch doc[i] {
	case '"':
		return scanString(doc, i)
	case '{', '[':
		depth := 0
		for ; i < len(doc); i++ {
			switch doc[i] {
			case '"':
				i = scanString(doc, i) - 1
			case '{', '[':
				depth++
			case '}', ']':
				if depth--; depth == 0 {
					return i + 1
				}
			}
		}
		return i
	default:
		for i < len(doc) && strings.IndexByte(",}] \t\r\n", doc[i]) < 0 {
			i++
		}
		return i
	}
}

// syntaxError describes why doc is not JSON, with the line and column of
// the mistake, as an editor shows them.
func syntaxError(doc []byte) error {
	var v any
	err := json.Unmarshal(doc, &v)
	var se *json.SyntaxError
	if errors.As(err, &se) {
		// Offset counts the bytes read, the offending one included.
		bad := max(min(int(se.Offset), len(doc))-1, 0)
		line := 1 + bytes.Count(doc[:bad], []byte("\n"))
		col := bad - bytes.LastIndexByte(doc[:bad], '\n')
		return fmt.Errorf("parse config: line %d, column %d: %w", line, col, err)
	}
	return fmt.Errorf("parse config: %w", err)
}
