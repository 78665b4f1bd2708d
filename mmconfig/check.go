package mmconfig

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"slices"

	"github.com/mattermost/mattermost/server/public/model"
)

// ErrInvalid is wrapped by every *ConfigError.
var ErrInvalid = errors.New("invalid Mattermost config")

// ConfigError is a problem Mattermost would find in the config at start.
type ConfigError struct {
	Key     string // "ServiceSettings.ListenAddress", or "" when Mattermost does not say
	ID      string // Mattermost's i18n id, for searching its docs and code
	Message string // a sentence for the administrator
}

func (e *ConfigError) Error() string {
	if e.ID == "" {
		return e.Message
	}
	return fmt.Sprintf("%s (%s)", e.Message, e.ID)
}

func (e *ConfigError) Unwrap() error { return ErrInvalid }

// Check reports the problems that turning before into after introduces, as
// Mattermost's own validation (json.Unmarshal, SetDefaults, IsValid) will see
// them at start. Only ServiceSettings is checked, in isolation, so problems
// elsewhere that an older server tolerates (this model rejects MySQL, for
// one) do not block a push. pending lists files that will exist once the
// push installs them: IsValid stats TLSCertFile and TLSKeyFile, which may
// not exist yet while planning.
func Check(before, after []byte, pending []string) error {
	cfg, err := decodeService(after)
	if err != nil {
		return err
	}
	old, err := decodeService(before)
	if err != nil {
		old = &model.Config{}
		old.SetDefaults()
	}
	// IsValid stops at the first problem. One the old config shares is not
	// ours: put that setting back to its default in both and look again.
	nc, oc := cfg.Clone(), old.Clone()
	for range len(resetters) + 1 {
		newErr := validate(nc, pending)
		if newErr == nil {
			break
		}
		oldErr := validate(oc, pending)
		reset, ok := resetters[newErr.Id]
		if oldErr == nil || oldErr.Id != newErr.Id || !ok {
			if oldErr != nil && oldErr.Id == newErr.Id {
				break // shared, and we cannot see past it
			}
			return explain(newErr, nc)
		}
		reset(&nc.ServiceSettings)
		reset(&oc.ServiceSettings)
		nc.SetDefaults()
		oc.SetDefaults()
	}
	ss := cfg.ServiceSettings
	if *ss.Forward80To443 {
		if port, err := ListenPort(*ss.ListenAddress); err == nil && port != "443" {
			return &ConfigError{
				Key: "ServiceSettings.Forward80To443",
				Message: fmt.Sprintf("ServiceSettings.Forward80To443 is on but ListenAddress %q does not listen on port 443; "+
					"Mattermost would fail to start: listen on :443 or turn Forward80To443 off", *ss.ListenAddress),
			}
		}
	}
	return nil
}

// resetters put back to its default the setting an IsValid id is about.
var resetters = map[string]func(*model.ServiceSettings){
	"model.config.is_valid.webserver_security.app_error":                    func(s *model.ServiceSettings) { s.ConnectionSecurity = nil },
	"model.config.is_valid.tls_overwrite_cipher.app_error":                  func(s *model.ServiceSettings) { s.TLSOverwriteCiphers = nil },
	"model.config.is_valid.max_payload_size.app_error":                      func(s *model.ServiceSettings) { s.MaximumPayloadSizeBytes = nil },
	"model.config.is_valid.max_url_length.app_error":                        func(s *model.ServiceSettings) { s.MaximumURLLength = nil },
	"model.config.is_valid.read_timeout.app_error":                          func(s *model.ServiceSettings) { s.ReadTimeout = nil },
	"model.config.is_valid.write_timeout.app_error":                         func(s *model.ServiceSettings) { s.WriteTimeout = nil },
	"model.config.is_valid.time_between_user_typing.app_error":              func(s *model.ServiceSettings) { s.TimeBetweenUserTypingUpdatesMilliseconds = nil },
	"model.config.is_valid.login_attempts.app_error":                        func(s *model.ServiceSettings) { s.MaximumLoginAttempts = nil },
	"model.config.is_valid.site_url.app_error":                              func(s *model.ServiceSettings) { s.SiteURL = nil },
	"model.config.is_valid.websocket_url.app_error":                         func(s *model.ServiceSettings) { s.WebsocketURL = nil },
	"model.config.is_valid.minimum_desktop_app_version.app_error":           func(s *model.ServiceSettings) { s.MinimumDesktopAppVersion = nil },
	"model.config.is_valid.listen_address.app_error":                        func(s *model.ServiceSettings) { s.ListenAddress = nil },
	"model.config.is_valid.outgoing_integrations_request_timeout.app_error": func(s *model.ServiceSettings) { s.OutgoingIntegrationRequestsTimeout = nil },
	"model.config.is_valid.group_unread_channels.app_error":                 func(s *model.ServiceSettings) { s.ExperimentalGroupUnreadChannels = nil },
	"model.config.is_valid.collapsed_threads.app_error":                     func(s *model.ServiceSettings) { s.CollapsedThreads = nil },
	"model.config.is_valid.collapsed_threads.autofollow.app_error":          func(s *model.ServiceSettings) { s.CollapsedThreads = nil },
}

// decodeService decodes the document's ServiceSettings, alone, into a
// defaulted model.Config.
func decodeService(doc []byte) (*model.Config, error) {
	raw, err := lookupSection(doc, Section)
	if err != nil {
		return nil, err
	}
	cfg := &model.Config{}
	if raw != nil {
		if err := json.Unmarshal(raw, &cfg.ServiceSettings); err != nil {
			return nil, fmt.Errorf("decode %s: %w", Section, err)
		}
	}
	cfg.SetDefaults()
	return cfg, nil
}

// validate runs IsValid on a copy in which pending files stand in for
// files that exist.
func validate(cfg *model.Config, pending []string) *model.AppError {
	check := cfg.Clone()
	for _, p := range []*string{check.ServiceSettings.TLSCertFile, check.ServiceSettings.TLSKeyFile} {
		if slices.Contains(pending, *p) {
			*p = os.DevNull
		}
	}
	return check.IsValid()
}

func lookupSection(doc []byte, section string) (json.RawMessage, error) {
	top, err := parseObjectChecked(doc)
	if err != nil {
		return nil, err
	}
	secs := top.find(section)
	if err := unambiguous(secs, section); err != nil {
		return nil, err
	}
	if len(secs) == 0 {
		return nil, nil
	}
	m := secs[len(secs)-1]
	return json.RawMessage(doc[m.valStart:m.valEnd]), nil
}

func parseObjectChecked(doc []byte) (*object, error) {
	if !json.Valid(doc) {
		var v any
		_ = v
		return nil, syntaxError(doc)
	}
	o, err := parseObject(doc, skipWS(doc, 0))
	if err != nil {
		return nil, fmt.Errorf("config: %w", err)
	}
	return o, nil
}

// explain turns a Mattermost i18n id into a sentence for the keys mmtls owns.
func explain(e *model.AppError, cfg *model.Config) *ConfigError {
	ss := cfg.ServiceSettings
	ce := &ConfigError{ID: e.Id}
	switch e.Id {
	case "model.config.is_valid.listen_address.app_error":
		ce.Key = "ServiceSettings.ListenAddress"
		ce.Message = fmt.Sprintf("ServiceSettings.ListenAddress %q is not a host and numeric port, such as \":443\"", *ss.ListenAddress)
	case "model.config.is_valid.webserver_security.app_error":
		ce.Key = "ServiceSettings.ConnectionSecurity"
		ce.Message = fmt.Sprintf("ServiceSettings.ConnectionSecurity %q must be \"\" or \"TLS\"", *ss.ConnectionSecurity)
	case "model.config.is_valid.tls_cert_file_missing.app_error":
		ce.Key = "ServiceSettings.TLSCertFile"
		ce.Message = fmt.Sprintf("ServiceSettings.TLSCertFile %q does not exist", *ss.TLSCertFile)
	case "model.config.is_valid.tls_key_file_missing.app_error":
		ce.Key = "ServiceSettings.TLSKeyFile"
		ce.Message = fmt.Sprintf("ServiceSettings.TLSKeyFile %q does not exist", *ss.TLSKeyFile)
	case "model.config.is_valid.site_url.app_error":
		ce.Key = "ServiceSettings.SiteURL"
		ce.Message = fmt.Sprintf("ServiceSettings.SiteURL %q is not an absolute URL", *ss.SiteURL)
	case "model.config.is_valid.tls_overwrite_cipher.app_error":
		ce.Key = "ServiceSettings.TLSOverwriteCiphers"
		ce.Message = fmt.Sprintf("ServiceSettings.TLSOverwriteCiphers names a cipher Mattermost does not support: %q", ss.TLSOverwriteCiphers)
	default:
		ce.Message = "Mattermost would refuse the edited ServiceSettings"
	}
	return ce
}

// Effective returns the document's ServiceSettings as Mattermost will see
// them: decoded into model.Config and defaulted. Other sections are left at
// their defaults.
func Effective(doc []byte) (*model.ServiceSettings, error) {
	cfg, err := decodeService(doc)
	if err != nil {
		return nil, err
	}
	return &cfg.ServiceSettings, nil
}
