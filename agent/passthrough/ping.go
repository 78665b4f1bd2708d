package passthrough

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
)

// PingPath is Mattermost's health endpoint, which its HA guide has load
// balancers check. It needs no authentication.
const PingPath = "/api/v4/system/ping"

// maxPingBody bounds what is read of a ping answer (a few dozen bytes).
const maxPingBody = 64 << 10

// Ping asks Mattermost's health endpoint at path (PingPath, under SiteURL's
// path if it has one) by connecting to addr whatever host the URL names, so
// that name need not resolve here. With tc, it speaks https to host (the
// SNI and Host header); with tc nil, plain HTTP. Healthy is HTTP 200 with
// "status":"OK". It returns when ctx ends; it starts no goroutine that
// outlives it.
func Ping(ctx context.Context, addr string, tc *tls.Config, host, path string) error {
	dialer := &net.Dialer{}
	tr := &http.Transport{
		DialContext: func(ctx context.Context, network, _ string) (net.Conn, error) {
			return dialer.DialContext(ctx, network, addr)
		},
		TLSClientConfig:   tc,
		DisableKeepAlives: true,
		Proxy:             nil,
	}
	defer tr.CloseIdleConnections()
	scheme := "https"
	if tc == nil {
		scheme, host = "http", addr
	}
	url := scheme + "://" + host + path
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return fmt.Errorf("ping: %w", err)
	}
	resp, err := (&http.Client{Transport: tr}).Do(req)
	if err != nil {
		return fmt.Errorf("ping %s via %s: %w", url, addr, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, maxPingBody))
	if err != nil {
		return fmt.Errorf("ping %s: read: %w", url, err)
	}
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("ping %s: HTTP %d: %s", url, resp.StatusCode, strings.TrimSpace(string(body)))
	}
	var st struct {
		Status string `json:"status"`
	}
	if err := json.Unmarshal(body, &st); err != nil || st.Status != "OK" {
		return fmt.Errorf("ping %s: status %q, want \"OK\" (body %.200s)", url, st.Status, body)
	}
	return nil
}
