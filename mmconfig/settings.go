package mmconfig

import (
	"encoding/json"
	"fmt"
	"net"
)

// DefaultListenAddress is where mmtls makes Mattermost listen when not told
// otherwise.
const DefaultListenAddress = ":443"

// Section is the config section every owned key lives in.
const Section = "ServiceSettings"

// TLS is the state mmtls puts into Mattermost's config.
type TLS struct {
	// ListenAddress is ServiceSettings.ListenAddress. Empty means
	// DefaultListenAddress.
	ListenAddress string
	// CertFile and KeyFile are the absolute paths of the installed files.
	CertFile, KeyFile string
	// SiteURL, if not empty, is also set.
	SiteURL string
}

// Settings returns the owned settings and their values: ListenAddress,
// ConnectionSecurity "TLS", TLSCertFile, TLSKeyFile, UseLetsEncrypt false
// (it would make Mattermost ignore the files), and SiteURL when set.
func (t TLS) Settings() []Setting {
	listen := t.ListenAddress
	if listen == "" {
		listen = DefaultListenAddress
	}
	s := []Setting{
		{Section, "ListenAddress", listen},
		{Section, "ConnectionSecurity", "TLS"},
		{Section, "TLSCertFile", t.CertFile},
		{Section, "TLSKeyFile", t.KeyFile},
		{Section, "UseLetsEncrypt", false},
	}
	if t.SiteURL != "" {
		s = append(s, Setting{Section, "SiteURL", t.SiteURL})
	}
	return s
}

// OwnedKeys lists the keys mmtls may set, as "Section.Key".
func OwnedKeys() []string {
	var out []string
	for _, s := range (TLS{SiteURL: "x"}).Settings() {
		out = append(out, s.Name())
	}
	return out
}

// Lookup returns the raw JSON value of section.key in doc as encoding/json
// decodes it (keys in any case, the last one if duplicated), or nil if
// absent. A key spelled two ways is an error (ErrAmbiguous).
func Lookup(doc []byte, section, key string) (json.RawMessage, error) {
	raw, err := lookupSection(doc, section)
	if err != nil || raw == nil {
		return nil, err
	}
	obj, err := parseObject(raw, 0)
	if err != nil {
		return nil, fmt.Errorf("config: %s: %w", section, err)
	}
	ms := obj.find(key)
	if err := unambiguous(ms, section+"."+key); err != nil {
		return nil, err
	}
	if len(ms) == 0 {
		return nil, nil
	}
	m := ms[len(ms)-1]
	return raw[m.valStart:m.valEnd], nil
}

// LookupString returns section.key as a string; "" when absent or null.
func LookupString(doc []byte, section, key string) (string, error) {
	raw, err := Lookup(doc, section, key)
	if err != nil || raw == nil {
		return "", err
	}
	var s *string
	if err := json.Unmarshal(raw, &s); err != nil {
		return "", fmt.Errorf("config: %s.%s: %w", section, key, err)
	}
	if s == nil {
		return "", nil
	}
	return *s, nil
}

// ListenPort returns the port of a ListenAddress, as Mattermost parses it.
func ListenPort(addr string) (string, error) {
	_, port, err := net.SplitHostPort(addr)
	if err != nil {
		return "", fmt.Errorf("listen address %q: %w", addr, err)
	}
	return port, nil
}
