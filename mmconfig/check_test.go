package mmconfig

import (
	"errors"
	"os"
	"testing"
)

func TestCheck(t *testing.T) {
	base := `{"ServiceSettings": {"SiteURL": "https://chat.example.com", "ListenAddress": ":8065"}, "SqlSettings": {"DriverName": "mysql"}}`
	pending := []string{testTLS.CertFile, testTLS.KeyFile}
	tests := []struct {
		name    string
		before  string
		tls     TLS
		pending []string
		wantKey string
		wantMsg string
	}{
		{name: "good edit, files pending", before: base, tls: testTLS, pending: pending},
		{name: "files neither pending nor present", before: base, tls: testTLS, wantKey: "ServiceSettings.TLSCertFile",
			wantMsg: `ServiceSettings.TLSCertFile "/opt/mattermost/config/fullchain.pem" does not exist (model.config.is_valid.tls_cert_file_missing.app_error)`},
		{name: "named port", before: base, tls: TLS{ListenAddress: ":https", CertFile: testTLS.CertFile, KeyFile: testTLS.KeyFile}, pending: pending,
			wantKey: "ServiceSettings.ListenAddress",
			wantMsg: `ServiceSettings.ListenAddress ":https" is not a host and numeric port, such as ":443" (model.config.is_valid.listen_address.app_error)`},
		{name: "forward80 needs 443", before: `{"ServiceSettings": {"Forward80To443": true}}`,
			tls: TLS{ListenAddress: ":8443", CertFile: testTLS.CertFile, KeyFile: testTLS.KeyFile}, pending: pending,
			wantKey: "ServiceSettings.Forward80To443",
			wantMsg: `ServiceSettings.Forward80To443 is on but ListenAddress ":8443" does not listen on port 443; Mattermost would fail to start: listen on :443 or turn Forward80To443 off`},
		{name: "forward80 with 443 is fine", before: `{"ServiceSettings": {"Forward80To443": true}}`, tls: testTLS, pending: pending},
		{name: "bad site url", before: base, tls: TLS{SiteURL: "chat example", CertFile: testTLS.CertFile, KeyFile: testTLS.KeyFile}, pending: pending,
			wantKey: "ServiceSettings.SiteURL"},
		// A problem the admin already had is not ours to refuse.
		{name: "pre-existing invalid cipher", before: `{"ServiceSettings": {"TLSOverwriteCiphers": ["NOPE"]}}`, tls: testTLS, pending: pending},
		{name: "cipher problem introduced elsewhere is still reported", before: `{"ServiceSettings": {"TLSOverwriteCiphers": ["NOPE"], "ListenAddress": ":80"}}`,
			tls: TLS{ListenAddress: "bad", CertFile: testTLS.CertFile, KeyFile: testTLS.KeyFile}, pending: pending, wantKey: "ServiceSettings.ListenAddress"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			after, _, err := Edit([]byte(tt.before), tt.tls.Settings())
			if err != nil {
				t.Fatal(err)
			}
			err = Check([]byte(tt.before), after, tt.pending)
			if tt.wantKey == "" {
				if err != nil {
					t.Errorf("Check: %v", err)
				}
				return
			}
			var ce *ConfigError
			if !errors.As(err, &ce) || !errors.Is(err, ErrInvalid) {
				t.Fatalf("Check = %v, want a *ConfigError", err)
			}
			if ce.Key != tt.wantKey {
				t.Errorf("key = %q, want %q (%v)", ce.Key, tt.wantKey, err)
			}
			if tt.wantMsg != "" && err.Error() != tt.wantMsg {
				t.Errorf("error:\n got %s\nwant %s", err, tt.wantMsg)
			}
		})
	}
}

func TestCheckStatsExistingFiles(t *testing.T) {
	dir := t.TempDir()
	cert, key := dir+"/c.pem", dir+"/k.pem"
	os.WriteFile(cert, []byte("x"), 0o600)
	os.WriteFile(key, []byte("x"), 0o600)
	before := []byte(`{}`)
	after, _, err := Edit(before, TLS{CertFile: cert, KeyFile: key}.Settings())
	if err != nil {
		t.Fatal(err)
	}
	if err := Check(before, after, nil); err != nil {
		t.Errorf("Check with existing files: %v", err)
	}
}
