package agent

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/mmtls/mmtls/agent/clusterdb"
	"github.com/mmtls/mmtls/agent/passthrough"
	"github.com/mmtls/mmtls/agent/push"
)

// metricsShutdownTimeout bounds waiting for scrapes in flight at stop.
const metricsShutdownTimeout = 5 * time.Second

// DefaultMetricsPort is the port of --metrics-listen given without a host.
const DefaultMetricsPort = "9469"

// Metrics are the agent's Prometheus metrics, in a registry of their own.
// A nil *Metrics is valid and records nothing. Safe for concurrent use.
type Metrics struct {
	Registry *prometheus.Registry

	notAfterOnce sync.Once
	notAfter     prometheus.Gauge
	pushes       *prometheus.CounterVec
	restarts     prometheus.Counter
	rollbacks    prometheus.Counter
	verify       prometheus.Histogram
	lastSuccess  prometheus.Gauge
	events       prometheus.Counter
	lockWait     prometheus.Histogram
	inconsistent prometheus.Gauge
	bundleTime   prometheus.Gauge
	rollout      *prometheus.GaugeVec
	nodes        *prometheus.GaugeVec
	capReached   prometheus.Gauge
	nodeCurrent  *prometheus.GaugeVec
	nodeSilent   *prometheus.GaugeVec
	acmeNext     prometheus.Gauge
	acmeErrors   prometheus.Counter
	acmeLastErr  prometheus.Gauge
}

// NewMetrics makes the agent's metrics in a new registry.
func NewMetrics() *Metrics {
	m := &Metrics{
		Registry: prometheus.NewRegistry(),
		notAfter: prometheus.NewGauge(prometheus.GaugeOpts{Name: "mmtls_cert_not_after_timestamp_seconds",
			Help: "NotAfter of the installed leaf certificate, as a Unix time."}),
		pushes: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "mmtls_pushes_total",
			Help: "Pushes by result: changed, unchanged, restarted, refused, rolled-back, rollback-failed, failed."}, []string{"result"}),
		restarts: prometheus.NewCounter(prometheus.CounterOpts{Name: "mmtls_mattermost_restarts_total",
			Help: "Mattermost restarts made by pushes."}),
		rollbacks: prometheus.NewCounter(prometheus.CounterOpts{Name: "mmtls_rollbacks_total",
			Help: "Pushes rolled back, whether or not the rollback worked."}),
		verify: prometheus.NewHistogram(prometheus.HistogramOpts{Name: "mmtls_verify_duration_seconds",
			Help: "Time from the restart until Mattermost served the new certificate.", Buckets: prometheus.ExponentialBuckets(0.25, 2, 12)}),
		lastSuccess: prometheus.NewGauge(prometheus.GaugeOpts{Name: "mmtls_last_success_timestamp_seconds",
			Help: "Unix time of the last push that succeeded (including no-ops)."}),
		events: prometheus.NewCounter(prometheus.CounterOpts{Name: "mmtls_watch_events_total",
			Help: "File notifications about the source pair."}),
		lockWait: prometheus.NewHistogram(prometheus.HistogramOpts{Name: "mmtls_cluster_lock_wait_seconds",
			Help: "Time waited for the cluster-wide restart lock.", Buckets: prometheus.ExponentialBuckets(0.01, 4, 10)}),
		capReached: prometheus.NewGauge(prometheus.GaugeOpts{Name: "mmtls_restart_cap_reached",
			Help: "1 while a push waits because watch.max_restarts_per_hour restarts were made in the last hour."}),
		inconsistent: prometheus.NewGauge(prometheus.GaugeOpts{Name: "mmtls_source_inconsistent",
			Help: "1 while the source pair has been unusable past watch.report_mismatch_after."}),
	}
	m.bundleTime = prometheus.NewGauge(prometheus.GaugeOpts{Name: "mmtls_cluster_bundle_published_timestamp_seconds",
		Help: "Unix time the cluster's current bundle was published (its age is time() minus this)."})
	m.rollout = prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "mmtls_cluster_rollout_state",
		Help: "1 for the state of the current bundle's rollout: rolling, complete or halted."}, []string{"state"})
	m.nodeCurrent = prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "mmtls_cluster_node_on_current_bundle",
		Help: "Per node of the cluster whose agent is alive, as its agent reported: 1 when it installed the current bundle, 0 when not."}, []string{"node"})
	m.nodeSilent = prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "mmtls_cluster_node_silent",
		Help: "Per node of the cluster: 1 when its agent's heartbeat is older than three of its reconcile intervals."}, []string{"node"})
	m.acmeNext = prometheus.NewGauge(prometheus.GaugeOpts{Name: "mmtls_acme_next_renewal_timestamp_seconds",
		Help: "When the ACME certificate is renewed next, as a Unix time."})
	m.acmeErrors = prometheus.NewCounter(prometheus.CounterOpts{Name: "mmtls_acme_errors_total",
		Help: "ACME orders or deliveries that failed (each retried with backoff)."})
	m.acmeLastErr = prometheus.NewGauge(prometheus.GaugeOpts{Name: "mmtls_acme_last_error_timestamp_seconds",
		Help: "When the last ACME order or delivery failed, as a Unix time."})
	m.nodes = prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "mmtls_cluster_nodes",
		Help: "Nodes of the cluster whose agent is alive (which=\"alive\"), those of them that installed the current bundle (which=\"current\"), and those whose heartbeat is older than three reconcile intervals (which=\"silent\")."}, []string{"which"})
	// notAfter is registered at its first value: a balancer-only process
	// manages no certificate, and a 0 there would fire expiry alerts.
	m.Registry.MustRegister(m.pushes, m.restarts, m.rollbacks, m.verify, m.lastSuccess, m.events, m.lockWait, m.inconsistent, m.capReached,
		m.bundleTime, m.rollout, m.nodes, m.nodeCurrent, m.nodeSilent, m.acmeNext, m.acmeErrors, m.acmeLastErr)
	return m
}

func (m *Metrics) observePush(res *push.Result, err error) {
	if m == nil {
		return
	}
	result := "failed"
	switch {
	case err == nil && res != nil:
		result = string(res.Status)
		m.lastSuccess.Set(float64(time.Now().Unix()))
		if res.Verified && res.Restarted {
			m.verify.Observe(res.Timings.Verify / 1000)
		}
	case errors.Is(err, push.ErrRefused), errors.Is(err, push.ErrUsage):
		result = "refused"
	case errors.Is(err, push.ErrRollbackFailed):
		result = "rollback-failed"
		m.rollbacks.Inc()
	case errors.Is(err, push.ErrRolledBack):
		result = "rolled-back"
		m.rollbacks.Inc()
	}
	if res != nil && res.Restarted {
		m.restarts.Inc()
	}
	m.pushes.WithLabelValues(result).Inc()
}

func (m *Metrics) bundleSeen(b *clusterdb.Bundle) {
	if m == nil || b == nil {
		return
	}
	m.bundleTime.Set(float64(b.PublishedAt.Unix()))
	for _, st := range []string{clusterdb.StateRolling, clusterdb.StateComplete, clusterdb.StateHalted} {
		v := 0.0
		if st == b.State {
			v = 1
		}
		m.rollout.WithLabelValues(st).Set(v)
	}
}

// clusterNode is one node's row as the cluster database has it.
type clusterNode struct {
	name            string
	silent, current bool
}

func (m *Metrics) clusterNodes(nodes []clusterNode) {
	if m == nil {
		return
	}
	alive, current, silent := 0, 0, 0
	m.nodeCurrent.Reset()
	m.nodeSilent.Reset()
	for _, n := range nodes {
		m.nodeSilent.WithLabelValues(n.name).Set(b2f(n.silent))
		if n.silent {
			silent++
			continue
		}
		alive++
		if n.current {
			current++
		}
		m.nodeCurrent.WithLabelValues(n.name).Set(b2f(n.current))
	}
	m.nodes.WithLabelValues("alive").Set(float64(alive))
	m.nodes.WithLabelValues("current").Set(float64(current))
	m.nodes.WithLabelValues("silent").Set(float64(silent))
}

func b2f(b bool) float64 {
	if b {
		return 1
	}
	return 0
}

func (m *Metrics) acmeNextRenewal(t time.Time) {
	if m != nil {
		m.acmeNext.Set(float64(t.Unix()))
	}
}

func (m *Metrics) acmeFailed(t time.Time) {
	if m != nil {
		m.acmeErrors.Inc()
		m.acmeLastErr.Set(float64(t.Unix()))
	}
}

func (m *Metrics) restartCap(reached bool) {
	if m == nil {
		return
	}
	if reached {
		m.capReached.Set(1)
	} else {
		m.capReached.Set(0)
	}
}

func (m *Metrics) watchEvent() {
	if m != nil {
		m.events.Inc()
	}
}

func (m *Metrics) sourceInconsistent(on bool) {
	if m == nil {
		return
	}
	if on {
		m.inconsistent.Set(1)
	} else {
		m.inconsistent.Set(0)
	}
}

func (m *Metrics) certNotAfter(t time.Time) {
	if m == nil {
		return
	}
	m.notAfterOnce.Do(func() { m.Registry.MustRegister(m.notAfter) })
	m.notAfter.Set(float64(t.Unix()))
}

func (m *Metrics) lockWaited(d time.Duration) {
	if m != nil {
		m.lockWait.Observe(d.Seconds())
	}
}

// MetricsAddr completes a --metrics-listen value: a bare port or ":port"
// listens on 127.0.0.1.
func MetricsAddr(v string) (string, error) {
	if v == "" {
		return "", nil
	}
	if _, _, err := net.SplitHostPort(v); err != nil {
		v = ":" + v
	}
	host, port, err := net.SplitHostPort(v)
	if err != nil || port == "" {
		return "", fmt.Errorf("--metrics-listen %q: want [host:]port", v)
	}
	if host == "" {
		host = "127.0.0.1"
	}
	return net.JoinHostPort(host, port), nil
}

// ServeMetrics serves m on ln until ctx is cancelled, then shuts down.
func ServeMetrics(ctx context.Context, ln net.Listener, m *Metrics, log *slog.Logger) error {
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(m.Registry, promhttp.HandlerOpts{}))
	// Scrapers reconnect every interval; an idle or slow client must not
	// hold a descriptor for long.
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second, ReadTimeout: 30 * time.Second,
		WriteTimeout: 30 * time.Second, IdleTimeout: 2 * time.Minute, MaxHeaderBytes: 16 << 10}
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(ln) }()
	logger(log).Info("serving metrics", "addr", ln.Addr().String())
	select {
	case <-ctx.Done():
		shut, cancel := context.WithTimeout(context.Background(), metricsShutdownTimeout)
		defer cancel()
		err := srv.Shutdown(shut)
		<-errc
		return err
	case err := <-errc:
		return fmt.Errorf("metrics server: %w", err)
	}
}

// WatchBalancer exports the balancer's per-upstream state.
func (m *Metrics) WatchBalancer(b *passthrough.Balancer) {
	if m == nil {
		return
	}
	m.Registry.MustRegister(&balancerCollector{b: b})
}

var (
	upActiveDesc   = prometheus.NewDesc("mmtls_balance_upstream_connections", "Live connections to the upstream.", []string{"upstream"}, nil)
	upTotalDesc    = prometheus.NewDesc("mmtls_balance_upstream_connections_total", "Connections made to the upstream.", []string{"upstream"}, nil)
	upBytesDesc    = prometheus.NewDesc("mmtls_balance_upstream_bytes_total", "Bytes forwarded, by direction.", []string{"upstream", "direction"}, nil)
	upHealthyDesc  = prometheus.NewDesc("mmtls_balance_upstream_up", "1 when the upstream takes new connections (healthy, not failing, not draining).", []string{"upstream"}, nil)
	upDrainingDesc = prometheus.NewDesc("mmtls_balance_upstream_draining", "1 while the upstream is drained.", []string{"upstream"}, nil)
)

// balancerCollector reads the balancer's state at each scrape.
type balancerCollector struct{ b *passthrough.Balancer }

func (c *balancerCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{upActiveDesc, upTotalDesc, upBytesDesc, upHealthyDesc, upDrainingDesc} {
		ch <- d
	}
}

func (c *balancerCollector) Collect(ch chan<- prometheus.Metric) {
	for _, u := range c.b.Status() {
		ch <- prometheus.MustNewConstMetric(upActiveDesc, prometheus.GaugeValue, float64(u.Active), u.Addr)
		ch <- prometheus.MustNewConstMetric(upTotalDesc, prometheus.CounterValue, float64(u.Total), u.Addr)
		ch <- prometheus.MustNewConstMetric(upBytesDesc, prometheus.CounterValue, float64(u.BytesToUpstream), u.Addr, "to_upstream")
		ch <- prometheus.MustNewConstMetric(upBytesDesc, prometheus.CounterValue, float64(u.BytesToClient), u.Addr, "to_client")
		ch <- prometheus.MustNewConstMetric(upHealthyDesc, prometheus.GaugeValue, b2f(u.Healthy && !u.PassiveDown && !u.Draining), u.Addr)
		ch <- prometheus.MustNewConstMetric(upDrainingDesc, prometheus.GaugeValue, b2f(u.Draining), u.Addr)
	}
}

// StartMetrics serves m on listen ([host:]port; 127.0.0.1 without a host)
// until ctx ends. wait blocks until the server has stopped.
func StartMetrics(ctx context.Context, listen string, m *Metrics, log *slog.Logger) (wait func(), err error) {
	addr, err := MetricsAddr(listen)
	if err != nil {
		return nil, err
	}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("metrics: %w", err)
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		if err := ServeMetrics(ctx, ln, m, log); err != nil {
			logger(log).Error("metrics endpoint stopped", "err", err)
		}
	}()
	return func() { <-done }, nil
}
