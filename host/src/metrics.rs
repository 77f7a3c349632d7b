//! Prometheus metrics of the cloud and the edge, encoded by `prometheus-client` (label values
//! escaped, histograms with buckets, the process's own metrics). A scrape builds a [`Scrape`]
//! from the hosts' current counters and long-lived histograms, so a family disappears with what
//! it measured (a removed service, a deleted job).
use std::fmt;
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, HeaderMap};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

/// A sample's labels, in order.
pub type Labels = Vec<(&'static str, String)>;

/// A latency histogram: 16 buckets from 0.5 ms to 16 s, doubling.
pub fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

/// Request durations by route template (never the raw path, so the series stay few), method and
/// status code: `nereid_http_request_duration_seconds`.
#[derive(Clone)]
pub struct HttpMetrics(Family<Labels, Histogram, fn() -> Histogram>);

impl Default for HttpMetrics {
    fn default() -> Self {
        HttpMetrics(Family::new_with_constructor(latency_histogram))
    }
}

/// Axum middleware observing every request into `metrics`.
pub async fn observe_request(State(metrics): State<HttpMetrics>, request: Request, next: Next) -> Response {
    let route = request.extensions().get::<MatchedPath>().map_or("unmatched", |p| p.as_str()).to_string();
    // A caller may send any method token: only the standard ones get series of their own.
    let method = match request.method().as_str() {
        m @ ("GET" | "POST" | "PUT" | "DELETE" | "HEAD" | "PATCH" | "OPTIONS") => m,
        _ => "other",
    }
    .to_string();
    let started = Instant::now();
    let response = next.run(request).await;
    let labels = vec![("route", route), ("method", method), ("code", response.status().as_u16().to_string())];
    metrics.0.get_or_create(&labels).observe(started.elapsed().as_secs_f64());
    response
}

/// One scrape's metrics.
pub struct Scrape {
    registry: Registry,
    sampled: Sampled,
}

impl Default for Scrape {
    fn default() -> Self {
        Scrape::new()
    }
}

impl Scrape {
    /// A scrape holding the process's metrics (`process_*`).
    pub fn new() -> Scrape {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(ProcessCollector));
        Scrape { registry, sampled: Sampled::default() }
    }

    /// A counter family (`name` without `_total`: the encoder appends it).
    pub fn counter(&mut self, name: &'static str, help: &'static str, rows: impl IntoIterator<Item = (Labels, u64)>) {
        let rows = rows.into_iter().map(|(l, v)| (l, Value::Counter(v))).collect();
        self.sampled.0.push(SampledFamily { name, help, kind: MetricType::Counter, rows });
    }

    pub fn gauge(&mut self, name: &'static str, help: &'static str, rows: impl IntoIterator<Item = (Labels, f64)>) {
        let rows = rows.into_iter().map(|(l, v)| (l, Value::Gauge(v))).collect();
        self.sampled.0.push(SampledFamily { name, help, kind: MetricType::Gauge, rows });
    }

    /// A histogram family of long-lived histograms (cloned handles: the samples are theirs).
    pub fn histogram(
        &mut self,
        name: &'static str,
        help: &'static str,
        rows: impl IntoIterator<Item = (Labels, Histogram)>,
    ) {
        let rows = rows.into_iter().map(|(l, h)| (l, Value::Histogram(h))).collect();
        self.sampled.0.push(SampledFamily { name, help, kind: MetricType::Histogram, rows });
    }

    pub fn http(&mut self, http: &HttpMetrics) {
        self.registry.register(
            "nereid_http_request_duration_seconds",
            "Time to answer an API request, by route, method and status code.",
            http.0.clone(),
        );
    }

    /// The exposition: OpenMetrics when the scraper asks for it (as Prometheus does), the
    /// Prometheus text format 0.0.4 otherwise.
    pub fn response(mut self, headers: &HeaderMap) -> Response {
        self.registry.register_collector(Box::new(self.sampled));
        let openmetrics = headers
            .get(header::ACCEPT)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.contains("application/openmetrics-text"));
        let mut out = String::new();
        let (encoded, content_type) = if openmetrics {
            (
                prometheus_client::encoding::text::encode(&mut out, &self.registry),
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )
        } else {
            (
                prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry),
                prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
            )
        };
        match encoded {
            Ok(()) => ([(header::CONTENT_TYPE, content_type)], out).into_response(),
            Err(_) => (axum::http::StatusCode::INTERNAL_SERVER_ERROR, "metrics could not be encoded").into_response(),
        }
    }
}

#[derive(Debug)]
enum Value {
    Counter(u64),
    Gauge(f64),
    Histogram(Histogram),
}

#[derive(Debug)]
struct SampledFamily {
    name: &'static str,
    help: &'static str,
    kind: MetricType,
    rows: Vec<(Labels, Value)>,
}

/// The families read at scrape time, encoded as a collector.
#[derive(Debug, Default)]
struct Sampled(Vec<SampledFamily>);

impl Collector for Sampled {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        for family in &self.0 {
            let mut metric = encoder.encode_descriptor(family.name, family.help, None, family.kind)?;
            for (labels, value) in &family.rows {
                let sample = metric.encode_family(labels)?;
                match value {
                    Value::Counter(v) => ConstCounter::new(*v).encode(sample)?,
                    Value::Gauge(v) => ConstGauge::new(*v).encode(sample)?,
                    Value::Histogram(h) => h.encode(sample)?,
                }
            }
        }
        Ok(())
    }
}

/// The standard `process_*` metrics, read from `/proc/self` at each scrape.
#[derive(Debug)]
struct ProcessCollector;

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let Some(p) = ProcessStats::read() else { return Ok(()) };
        let gauges = [
            ("process_resident_memory_bytes", "Resident memory size in bytes.", p.rss_bytes),
            ("process_virtual_memory_bytes", "Virtual memory size in bytes.", p.vsize_bytes),
            ("process_start_time_seconds", "Start time of the process since the Unix epoch in seconds.", p.start_time),
            ("process_open_fds", "Number of open file descriptors.", p.open_fds),
            ("process_max_fds", "Maximum number of open file descriptors.", p.max_fds),
            ("process_threads", "Number of OS threads in the process.", p.threads),
        ];
        let cpu = ConstCounter::new(p.cpu_seconds);
        cpu.encode(encoder.encode_descriptor(
            "process_cpu_seconds",
            "Total user and system CPU time spent in seconds.",
            None,
            MetricType::Counter,
        )?)?;
        for (name, help, value) in gauges {
            ConstGauge::new(value).encode(encoder.encode_descriptor(name, help, None, MetricType::Gauge)?)?;
        }
        Ok(())
    }
}

struct ProcessStats {
    cpu_seconds: f64,
    rss_bytes: f64,
    vsize_bytes: f64,
    start_time: f64,
    open_fds: f64,
    max_fds: f64,
    threads: f64,
}

impl ProcessStats {
    fn read() -> Option<ProcessStats> {
        let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
        // The command name may hold spaces and parentheses: fields start after the last ')'.
        let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
        // Numbered as in proc(5) from field 3 (state), so field n is fields[n - 3].
        let field = |n: usize| fields.get(n - 3).and_then(|f| f.parse::<f64>().ok());
        // SAFETY: sysconf has no preconditions.
        let (ticks, page) = unsafe { (libc::sysconf(libc::_SC_CLK_TCK), libc::sysconf(libc::_SC_PAGESIZE)) };
        let (ticks, page) = (ticks.max(1) as f64, page.max(1) as f64);
        let boot = std::fs::read_to_string("/proc/stat")
            .ok()?
            .lines()
            .find_map(|l| l.strip_prefix("btime ").and_then(|v| v.trim().parse::<f64>().ok()))?;
        let max_fds = std::fs::read_to_string("/proc/self/limits")
            .ok()?
            .lines()
            .find(|l| l.starts_with("Max open files"))
            .and_then(|l| l.split_whitespace().nth(3).and_then(|v| v.parse::<f64>().ok()))
            .unwrap_or(f64::INFINITY);
        Some(ProcessStats {
            cpu_seconds: (field(14)? + field(15)?) / ticks,
            threads: field(20)?,
            start_time: boot + field(22)? / ticks,
            vsize_bytes: field(23)?,
            rss_bytes: field(24)? * page,
            open_fds: std::fs::read_dir("/proc/self/fd").ok()?.count() as f64,
            max_fds,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn text(scrape: Scrape, accept: Option<&str>) -> (String, String) {
        let mut headers = HeaderMap::new();
        if let Some(a) = accept {
            headers.insert(header::ACCEPT, a.parse().expect("header"));
        }
        let response = scrape.response(&headers);
        let ct = response.headers()[header::CONTENT_TYPE].to_str().expect("ct").to_string();
        let body = axum::body::to_bytes(response.into_body(), 1 << 20).await.expect("body");
        (ct, String::from_utf8(body.to_vec()).expect("utf-8"))
    }

    #[tokio::test]
    async fn labels_are_escaped_histograms_have_buckets_and_the_process_is_measured() {
        let mut scrape = Scrape::new();
        scrape.counter("nereid_things", "Things.", [(vec![("job", "a\"b\\c\nd".to_string())], 3)]);
        let h = latency_histogram();
        h.observe(0.003);
        h.observe(20.0);
        scrape.histogram("nereid_latency_seconds", "Latency.", [(vec![("route", "edge".to_string())], h)]);
        let (ct, body) = text(scrape, None).await;
        assert!(ct.starts_with("text/plain; version=0.0.4"), "{ct}");
        assert!(body.contains(r#"nereid_things_total{job="a\"b\\c\nd"} 3"#), "{body}");
        assert!(body.contains(r#"nereid_latency_seconds_bucket{route="edge",le="0.004"} 1"#), "{body}");
        assert!(body.contains(r#"nereid_latency_seconds_bucket{route="edge",le="+Inf"} 2"#), "{body}");
        assert!(body.contains(r#"nereid_latency_seconds_count{route="edge"} 2"#), "{body}");
        let rss = body
            .lines()
            .find_map(|l| l.strip_prefix("process_resident_memory_bytes "))
            .and_then(|v| v.parse::<f64>().ok())
            .expect("rss");
        assert!(rss > 1e6, "{body}");
        assert!(body.contains("process_cpu_seconds_total "), "{body}");
        assert!(!body.contains("# EOF"), "{body}");
    }

    #[tokio::test]
    async fn requests_are_observed_by_route_template_and_odd_methods_share_one_series() {
        use tower::ServiceExt;
        let http = HttpMetrics::default();
        let router = axum::Router::new()
            .route("/v1/jobs/{job}", axum::routing::get(|| async { "ok" }))
            .layer(axum::middleware::from_fn_with_state(http.clone(), observe_request));
        for (method, path) in [("GET", "/v1/jobs/a"), ("GET", "/v1/jobs/b"), ("FOO", "/v1/jobs/a"), ("BAR", "/x")] {
            let request = Request::builder().method(method).uri(path).body(axum::body::Body::empty()).expect("request");
            router.clone().oneshot(request).await.expect("answer");
        }
        let mut scrape = Scrape::new();
        scrape.http(&http);
        let (_, body) = text(scrape, None).await;
        let count = |labels: &str| {
            body.lines()
                .find_map(|l| l.strip_prefix(&format!("nereid_http_request_duration_seconds_count{{{labels}}} ")))
                .unwrap_or_else(|| panic!("no {labels} in {body}"))
                .to_string()
        };
        assert_eq!(count(r#"route="/v1/jobs/{job}",method="GET",code="200""#), "2");
        assert_eq!(count(r#"route="/v1/jobs/{job}",method="other",code="405""#), "1");
        assert_eq!(count(r#"route="unmatched",method="other",code="404""#), "1");
        assert!(!body.contains("FOO") && !body.contains("/v1/jobs/a"), "{body}");
    }

    #[tokio::test]
    async fn openmetrics_is_served_to_a_scraper_that_asks_for_it() {
        let mut scrape = Scrape::new();
        scrape.gauge("nereid_level", "Level.", [(vec![], 1.5)]);
        let (ct, body) = text(scrape, Some("application/openmetrics-text;version=1.0.0,text/plain;q=0.5")).await;
        assert!(ct.starts_with("application/openmetrics-text"), "{ct}");
        assert!(body.contains("nereid_level 1.5"), "{body}");
        assert!(body.ends_with("# EOF\n"), "{body}");
    }
}
