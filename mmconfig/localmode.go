package mmconfig

import (
	"context"
	"encoding/json"
	"fmt"
	"time"

	"github.com/mattermost/mattermost/server/public/model"
)

// DefaultLocalModeSocket is ServiceSettings.LocalModeSocketLocation's
// default.
const DefaultLocalModeSocket = "/var/tmp/mattermost_local.socket"

// localModeTimeout bounds one call to the local-mode API.
const localModeTimeout = 30 * time.Second

// LocalModeSocket returns the local-mode socket of doc (the configuration
// a node runs with), or an error saying how to enable it.
func LocalModeSocket(doc []byte) (string, error) {
	on, err := Lookup(doc, Section, "EnableLocalMode")
	if err != nil {
		return "", err
	}
	if string(on) != "true" {
		return "", fmt.Errorf("ServiceSettings.EnableLocalMode is off: turn it on (mmctl config set ServiceSettings.EnableLocalMode true, then restart Mattermost) so mmtls can set TLS through Mattermost's own API")
	}
	sock, err := LookupString(doc, Section, "LocalModeSocketLocation")
	if err != nil {
		return "", err
	}
	if sock == "" {
		sock = DefaultLocalModeSocket
	}
	return sock, nil
}

// PatchLocal sets settings through Mattermost's API on its local-mode
// socket (PUT /api/v4/config/patch): Mattermost validates the patch (the TLS
// files must exist), saves it in its store and tells the cluster.
func PatchLocal(ctx context.Context, socket string, settings []Setting) error {
	patch := map[string]map[string]any{}
	for _, s := range settings {
		if patch[s.Section] == nil {
			patch[s.Section] = map[string]any{}
		}
		patch[s.Section][s.Key] = s.Value
	}
	b, err := json.Marshal(patch)
	if err != nil {
		return err
	}
	var cfg model.Config
	if err := json.Unmarshal(b, &cfg); err != nil {
		return fmt.Errorf("local-mode patch: %w", err)
	}
	ctx, cancel := context.WithTimeout(ctx, localModeTimeout)
	defer cancel()
	c := model.NewAPIv4SocketClient(socket)
	c.HTTPClient.Timeout = localModeTimeout
	if _, _, err := c.PatchConfig(ctx, &cfg); err != nil {
		return fmt.Errorf("set TLS through Mattermost's local-mode API (%s): %w", socket, err)
	}
	return nil
}

// OwnedValues returns the owned settings as doc has them (absent keys
// left out): what a rollback patches back.
func OwnedValues(doc []byte) ([]Setting, error) {
	var out []Setting
	for _, s := range (TLS{SiteURL: "x"}).Settings() {
		raw, err := Lookup(doc, s.Section, s.Key)
		if err != nil {
			return nil, err
		}
		if raw == nil {
			continue
		}
		var v any
		if err := json.Unmarshal(raw, &v); err != nil {
			return nil, fmt.Errorf("%s: %w", s.Name(), err)
		}
		out = append(out, Setting{s.Section, s.Key, v})
	}
	return out, nil
}
