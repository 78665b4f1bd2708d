package test

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"go.yaml.in/yaml/v3"

	"github.com/mmtls/mmtls/test/fixture"
)

// The shipped monitoring files, relative to this package.
const (
	alertRules     = "../packaging/monitoring/mmtls-alerts.yml"
	alertTests     = "../packaging/monitoring/mmtls-alerts.test.yml"
	grafanaBoard   = "../packaging/monitoring/mmtls-dashboard.json"
	promtoolBinary = "/usr/bin/promtool"
)

// The alert rules are valid, and each alert fires when it should and stays
// quiet when it should not (promtool's unit tests, Debian's prometheus).
func TestAlertRules(t *testing.T) {
	promtool := needTool(t, "promtool", promtoolBinary)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	for _, args := range [][]string{{"check", "rules", alertRules}, {"test", "rules", alertTests}} {
		if out, err := exec.CommandContext(ctx, promtool, args...).CombinedOutput(); err != nil {
			t.Errorf("promtool %s: %v\n%s", strings.Join(args, " "), err, out)
		}
	}
	// Every alert has a test that expects it to fire.
	tests, _ := os.ReadFile(alertTests)
	for _, name := range alertNames(t) {
		if !strings.Contains(string(tests), "alertname: "+name+"\n        exp_alerts:\n          - exp_labels") {
			t.Errorf("alert %s has no test in which it fires", name)
		}
	}
}

type ruleFile struct {
	Groups []struct {
		Rules []struct {
			Alert string `yaml:"alert"`
			Expr  string `yaml:"expr"`
		} `yaml:"rules"`
	} `yaml:"groups"`
}

func readRules(t *testing.T) ruleFile {
	t.Helper()
	b, err := os.ReadFile(alertRules)
	if err != nil {
		t.Fatal(err)
	}
	var rf ruleFile
	if err := yaml.Unmarshal(b, &rf); err != nil {
		t.Fatal(err)
	}
	return rf
}

func alertNames(t *testing.T) []string {
	var out []string
	for _, g := range readRules(t).Groups {
		for _, r := range g.Rules {
			out = append(out, r.Alert)
		}
	}
	return out
}

// dashboardExprs returns every query of the Grafana dashboard, by panel,
// with its variables given values Prometheus understands.
func dashboardExprs(t *testing.T) map[string]string {
	t.Helper()
	b, err := os.ReadFile(grafanaBoard)
	if err != nil {
		t.Fatal(err)
	}
	var d struct {
		Templating struct {
			List []struct{ Name, Type, Query string }
		}
		Panels []struct {
			Title      string
			Datasource struct{ UID string }
			Targets    []struct{ Expr string }
		}
	}
	if err := json.Unmarshal(b, &d); err != nil {
		t.Fatal(err)
	}
	if len(d.Templating.List) == 0 || d.Templating.List[0].Type != "datasource" || d.Templating.List[0].Query != "prometheus" {
		t.Errorf("the dashboard's data source is not a variable: %+v", d.Templating.List)
	}
	out := map[string]string{}
	for _, p := range d.Panels {
		for i, tg := range p.Targets {
			if p.Datasource.UID != "${datasource}" {
				t.Errorf("panel %q does not use the datasource variable", p.Title)
			}
			e := strings.NewReplacer("$job", "mmtls", "$__rate_interval", "1m").Replace(tg.Expr)
			out[fmt.Sprintf("%s #%d", p.Title, i+1)] = e
		}
	}
	return out
}

// A real Prometheus scrapes a running agent (which pushed a pair) and a
// running balancer (which forwarded connections) on loopback: every
// expression of the rules and the dashboard evaluates without error, and
// those about what the test made return series.
func TestMonitoringAgainstRealPrometheus(t *testing.T) {
	prom := needTool(t, "prometheus", "/usr/bin/prometheus")
	n := newNode(t)
	ps, roots := n.pairs(1)
	tlsAddr, _ := fixture.PickPort()
	agentMetrics, _ := fixture.PickPort()
	n.startWatch(t, ps[0].CertFile, ps[0].KeyFile, roots, tlsAddr, "--metrics-listen", agentMetrics)
	n.waitServes(t, tlsAddr, ps[0].Chain)
	balMetrics, _ := fixture.PickPort()
	bal := startBalancer(t, "--upstream", tlsAddr, "--metrics-listen", balMetrics)
	for range 3 {
		if err := handshake(bal.addr, fixture.SiteHost); err != nil {
			t.Fatal(err)
		}
	}

	dir := t.TempDir()
	promAddr, _ := fixture.PickPort()
	cfg := fmt.Sprintf("global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - %s\nscrape_configs:\n  - job_name: mmtls\n    static_configs:\n      - targets: [%q, %q]\n",
		mustAbs(t, alertRules), agentMetrics, balMetrics)
	os.WriteFile(filepath.Join(dir, "prometheus.yml"), []byte(cfg), 0o644)
	startDaemon(t, "prometheus", exec.Command(prom, "--config.file="+filepath.Join(dir, "prometheus.yml"), "--storage.tsdb.path="+filepath.Join(dir, "data"),
		"--web.listen-address="+promAddr, "--log.level=warn"), 20*time.Second)

	query := func(expr string) (int, error) {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		req, _ := http.NewRequestWithContext(ctx, "GET", "http://"+promAddr+"/api/v1/query?query="+url.QueryEscape(expr), nil)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			return 0, err
		}
		defer resp.Body.Close()
		var r struct {
			Status, Error string
			Data          struct{ Result []json.RawMessage }
		}
		if err := json.NewDecoder(resp.Body).Decode(&r); err != nil {
			return 0, err
		}
		if r.Status != "success" {
			return 0, fmt.Errorf("%s", r.Error)
		}
		return len(r.Data.Result), nil
	}
	// Both targets scraped, and enough samples for rate() over a minute
	// window (two scrapes).
	waitFor(t, time.Minute, func() error {
		n, err := query(`count_over_time(up{job="mmtls"}[1m]) >= 3`)
		if err == nil && n != 2 {
			err = fmt.Errorf("%d targets with three scrapes", n)
		}
		return err
	})

	for _, g := range readRules(t).Groups {
		for _, r := range g.Rules {
			if _, err := query(r.Expr); err != nil {
				t.Errorf("alert %s: %q: %v", r.Alert, r.Expr, err)
			}
		}
	}
	// What the test made must show: the agent's certificate and pushes,
	// the balancer's upstream, the targets.
	mustHaveData := []string{"Days until the installed certificate expires", "Push outcomes", "Upstreams taking new connections",
		"Live connections per upstream", "New connections per upstream", "Bytes per upstream", "Scrape targets up", "Agent state"}
	for name, expr := range dashboardExprs(t) {
		n, err := query(expr)
		if err != nil {
			t.Errorf("dashboard %s: %q: %v", name, expr, err)
			continue
		}
		for _, m := range mustHaveData {
			if strings.HasPrefix(name, m+" #") && n == 0 {
				t.Errorf("dashboard %s: %q returns no series though the test has data", name, expr)
			}
		}
	}
}

func mustAbs(t *testing.T, p string) string {
	t.Helper()
	a, err := filepath.Abs(p)
	if err != nil {
		t.Fatal(err)
	}
	return a
}
