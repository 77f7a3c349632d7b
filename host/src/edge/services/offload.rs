//! Offloading whole requests of a joint service (`offload_when_faster`): the service keeps a
//! latency estimate of each path (the edge model with its router, and a round trip to the
//! cloud's service) and sends a request where the estimate is lower. The path not taken is
//! measured again every `relink_secs`, so a slowed edge, a faster link or a loaded cloud moves
//! requests over within a few such periods.
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::lock;

/// Weight of a new measure in a path's estimate while the path is in use.
const SMOOTHING: f64 = 0.3;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Path {
    Edge,
    Cloud,
}

#[derive(Default)]
struct Estimate {
    /// Milliseconds per request; None until measured (or after the cloud failed).
    ms: Option<f64>,
    /// When a request last took this path.
    taken: Option<Instant>,
    /// The next measure starts the estimate afresh (the path was measured again after a while
    /// unused: what it cost then says little about now).
    fresh: bool,
    /// The first measure of a path was taken and dropped: it pays for cold starts (a model
    /// session's first run, a new connection) that later requests do not.
    warmed: bool,
}

pub(super) struct Offload {
    /// How often the path not taken is measured again (None: never).
    remeasure: Option<Duration>,
    paths: Mutex<[Estimate; 2]>,
}

fn slot(path: Path) -> usize {
    match path {
        Path::Edge => 0,
        Path::Cloud => 1,
    }
}

impl Offload {
    pub(super) fn new(remeasure: Option<Duration>) -> Offload {
        Offload { remeasure, paths: Mutex::new(Default::default()) }
    }

    /// The path for the next request. The edge's is measured first (it answers without the
    /// cloud); then the cloud's once; then the faster one, except that the other is taken once
    /// every `remeasure`. A path's first request only warms it up.
    pub(super) fn choose(&self, now: Instant) -> Path {
        let mut paths = lock(&self.paths);
        let due = |e: &Estimate| match (e.taken, self.remeasure) {
            (None, _) => true,
            (Some(t), Some(every)) => now.saturating_duration_since(t) >= every,
            (Some(_), None) => false,
        };
        let path = match (paths[0].ms, paths[1].ms) {
            (None, _) => Path::Edge,
            (Some(_), None) if due(&paths[1]) => Path::Cloud,
            (Some(_), None) => Path::Edge,
            (Some(edge), Some(cloud)) => {
                let (fast, slow) = if cloud < edge { (Path::Cloud, Path::Edge) } else { (Path::Edge, Path::Cloud) };
                if due(&paths[slot(slow)]) {
                    paths[slot(slow)].fresh = true;
                    slow
                } else {
                    fast
                }
            }
        };
        // Marked when chosen, so concurrent requests do not all go to measure the same path.
        paths[slot(path)].taken = Some(now);
        path
    }

    /// A request took `ms` on `path`.
    pub(super) fn measured(&self, path: Path, ms: f64) {
        if !ms.is_finite() || ms < 0.0 {
            return;
        }
        let mut paths = lock(&self.paths);
        let e = &mut paths[slot(path)];
        if !e.warmed {
            // Dropped, and the path is due to be measured again at once.
            e.warmed = true;
            e.taken = None;
            return;
        }
        e.ms = Some(match e.ms {
            Some(old) if !e.fresh => old + SMOOTHING * (ms - old),
            _ => ms,
        });
        e.fresh = false;
    }

    /// The cloud did not answer: requests stay on the edge until it is tried again after
    /// `remeasure` (or, without one, for good).
    pub(super) fn cloud_failed(&self) {
        let mut paths = lock(&self.paths);
        paths[1].ms = None;
        paths[1].fresh = false;
    }

    /// The estimates (edge, cloud) in milliseconds.
    pub(super) fn estimates(&self) -> (Option<f64>, Option<f64>) {
        let paths = lock(&self.paths);
        (paths[0].ms, paths[1].ms)
    }

    /// For `GET /v1/infer/<service>/plan`: each path's estimate and the one requests take.
    pub(super) fn report(&self) -> serde_json::Value {
        let (edge, cloud) = self.estimates();
        let path = match (edge, cloud) {
            (Some(e), Some(c)) if c < e => "cloud",
            _ => "edge",
        };
        serde_json::json!({ "offload_when_faster": true, "path": path, "edge_ms": edge, "cloud_ms": cloud })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both paths' warm-up requests.
    fn warm(o: &Offload, now: Instant) {
        assert_eq!(o.choose(now), Path::Edge);
        o.measured(Path::Edge, 100.0);
        let mut paths = lock(&o.paths);
        paths[1].warmed = true;
    }

    #[test]
    fn the_faster_path_serves_and_the_other_is_measured_again_every_period() {
        let every = Duration::from_secs(10);
        let o = Offload::new(Some(every));
        let t0 = Instant::now();
        assert_eq!(o.choose(t0), Path::Edge, "the edge is measured first");
        o.measured(Path::Edge, 500.0);
        assert_eq!(o.estimates(), (None, None), "a cold start is no measure");
        assert_eq!(o.choose(t0), Path::Edge);
        o.measured(Path::Edge, 20.0);
        assert_eq!(o.choose(t0), Path::Cloud, "then the cloud once");
        o.measured(Path::Cloud, 300.0);
        assert_eq!(o.choose(t0), Path::Cloud, "after its warm-up");
        o.measured(Path::Cloud, 5.0);
        assert_eq!(o.estimates(), (Some(20.0), Some(5.0)));
        for s in 1..10 {
            assert_eq!(o.choose(t0 + Duration::from_secs(s)), Path::Cloud);
            o.measured(Path::Cloud, 6.0);
        }
        // Ten seconds after the edge was last taken, one request measures it again, and its
        // measure replaces the old estimate instead of being averaged into it.
        assert_eq!(o.choose(t0 + every), Path::Edge);
        assert_eq!(o.choose(t0 + every), Path::Cloud, "only one request goes to measure it");
        o.measured(Path::Edge, 2.0);
        assert_eq!(o.estimates().0, Some(2.0));
        assert_eq!(o.choose(t0 + every), Path::Edge, "the edge is faster now");
        // While in use, a path's estimate moves by a share of each measure.
        o.measured(Path::Edge, 12.0);
        assert_eq!(o.estimates().0, Some(2.0 + SMOOTHING * 10.0));
    }

    #[test]
    fn a_failed_cloud_is_left_alone_until_it_is_due_again() {
        let every = Duration::from_secs(5);
        let o = Offload::new(Some(every));
        let t0 = Instant::now();
        warm(&o, t0);
        assert_eq!(o.choose(t0), Path::Edge);
        o.measured(Path::Edge, 20.0);
        assert_eq!(o.choose(t0), Path::Cloud);
        o.cloud_failed();
        assert_eq!(o.estimates().1, None);
        assert_eq!(o.choose(t0 + Duration::from_secs(1)), Path::Edge);
        assert_eq!(o.choose(t0 + every), Path::Cloud, "tried again after the period");
        o.measured(Path::Cloud, 4.0);
        assert_eq!(o.choose(t0 + every), Path::Cloud);

        let never = Offload::new(None);
        warm(&never, t0);
        assert_eq!(never.choose(t0), Path::Edge);
        never.measured(Path::Edge, 1.0);
        assert_eq!(never.choose(t0), Path::Cloud, "measured once even without a period");
        never.measured(Path::Cloud, 9.0);
        assert!((0..5).all(|s| never.choose(t0 + Duration::from_secs(s * 100)) == Path::Edge));
        let before = o.estimates();
        o.measured(Path::Edge, f64::NAN);
        o.measured(Path::Edge, -1.0);
        assert_eq!(o.estimates(), before, "a measure that is not a duration is ignored");
    }
}
