package balance

import (
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

func TestRedirectHandler(t *testing.T) {
	webroot := t.TempDir()
	dir := filepath.Join(webroot, ".well-known", "acme-challenge")
	os.MkdirAll(dir, 0o755)
	os.WriteFile(filepath.Join(dir, "tok_EN-1"), []byte("tok_EN-1.keyauth"), 0o644)
	h, err := RedirectHandler("https://chat.example.test", webroot)
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		path     string
		code     int
		location string
		body     string
	}{
		{"/login?redirect_to=%2Fteam", 301, "https://chat.example.test/login?redirect_to=%2Fteam", ""},
		{"/", 301, "https://chat.example.test/", ""},
		{"/.well-known/acme-challenge/tok_EN-1", 200, "", "tok_EN-1.keyauth"},
		{"/.well-known/acme-challenge/missing", 404, "", ""},
		{"/.well-known/acme-challenge/..%2f..%2fetc%2fpasswd", 404, "", ""},
	}
	for _, tt := range tests {
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, httptest.NewRequest(http.MethodGet, "http://chat.example.test"+tt.path, nil))
		if rec.Code != tt.code || rec.Header().Get("Location") != tt.location || (tt.body != "" && rec.Body.String() != tt.body) {
			t.Errorf("%s: %d %q %q", tt.path, rec.Code, rec.Header().Get("Location"), rec.Body.String())
		}
	}
	noRoot, _ := RedirectHandler("https://chat.example.test:8443", "")
	rec := httptest.NewRecorder()
	noRoot.ServeHTTP(rec, httptest.NewRequest(http.MethodGet, "http://x/.well-known/acme-challenge/tok", nil))
	if rec.Code != 404 {
		t.Errorf("challenge without a webroot: %d", rec.Code)
	}
	rec = httptest.NewRecorder()
	noRoot.ServeHTTP(rec, httptest.NewRequest(http.MethodGet, "http://x/a", nil))
	if rec.Header().Get("Location") != "https://chat.example.test:8443/a" {
		t.Errorf("port kept: %q", rec.Header().Get("Location"))
	}
	if _, err := RedirectHandler("http://chat.example.test", ""); err == nil {
		t.Error("http SiteURL accepted")
	}
}

// A symlink planted in the webroot (by whoever may write there) does not
// make the root balancer serve the file it points to.
func TestRedirectChallengeNeverFollowsLinks(t *testing.T) {
	webroot := t.TempDir()
	dir := filepath.Join(webroot, ".well-known", "acme-challenge")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	secret := filepath.Join(t.TempDir(), "shadow")
	if err := os.WriteFile(secret, []byte("root:secret"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(secret, filepath.Join(dir, "tok")); err != nil {
		t.Fatal(err)
	}
	if err := unix.Mkfifo(filepath.Join(dir, "fifo"), 0o644); err != nil {
		t.Fatal(err)
	}
	h, err := RedirectHandler("https://chat.example.test", webroot)
	if err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{"tok", "fifo"} {
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, httptest.NewRequest(http.MethodGet, "http://chat.example.test/.well-known/acme-challenge/"+name, nil))
		if rec.Code != http.StatusNotFound || strings.Contains(rec.Body.String(), "secret") {
			t.Errorf("%s: %d %q, want 404", name, rec.Code, rec.Body.String())
		}
	}
}
