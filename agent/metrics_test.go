package agent

import (
	"testing"
	"time"
)

// A process that manages no certificate (a balancer alone) exports no
// expiry, which would read as 1970 and fire every expiry alert.
func TestNotAfterExportedOnlyWhereACertificateIsManaged(t *testing.T) {
	m := NewMetrics()
	has := func() bool {
		fams, err := m.Registry.Gather()
		if err != nil {
			t.Fatal(err)
		}
		for _, f := range fams {
			if f.GetName() == "mmtls_cert_not_after_timestamp_seconds" {
				return true
			}
		}
		return false
	}
	if has() {
		t.Fatal("not_after exported before any certificate is managed")
	}
	m.certNotAfter(time.Unix(1800000000, 0))
	m.certNotAfter(time.Unix(1800000001, 0))
	if !has() {
		t.Error("not_after not exported once a certificate is managed")
	}
}
