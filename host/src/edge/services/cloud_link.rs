//! Calls from an edge service to its side on the cloud (hard examples, tails of split models,
//! profiles): safetensors both ways, a refusal told apart from an unreachable cloud.
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use super::super::error::BadRequest;
use crate::inference::wire;
use crate::protocol::COMPUTE_HEADER;
use crate::runtime::TensorData;

/// Outcome of a call to the cloud.
/// Outcome of a call to the cloud.
pub(super) enum CloudCall {
    Answered { outputs: Vec<TensorData>, compute_ms: f64 },
    Unreachable(String),
}

pub(super) struct CloudLink {
    pub(super) http: reqwest::Client,
    pub(super) base: String,
    pub(super) service: String,
    pub(super) token: String,
    pub(super) timeout: Duration,
}

impl CloudLink {
    fn url(&self, suffix: &str) -> String {
        format!("{}{}{suffix}", self.base.trim_end_matches('/'), crate::protocol::routes::infer(&self.service))
    }

    /// POSTs safetensors and reads safetensors back. A refusal (4xx) is an error for the caller;
    /// anything else that goes wrong means the cloud is unreachable.
    pub(super) async fn post(
        &self,
        suffix: &str,
        body: Vec<u8>,
        headers: &[(&str, String)],
    ) -> anyhow::Result<CloudCall> {
        let mut req = self.http.post(self.url(suffix)).bearer_auth(&self.token).timeout(self.timeout).body(body);
        for (k, v) in headers {
            req = req.header(*k, v);
        }
        let resp = match req.send().await {
            Ok(r) => r,
            Err(e) => return Ok(CloudCall::Unreachable(e.to_string())),
        };
        let status = resp.status();
        let compute_ms = resp
            .headers()
            .get(COMPUTE_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        let bytes = match resp.bytes().await {
            Ok(b) => b,
            Err(e) => return Ok(CloudCall::Unreachable(e.to_string())),
        };
        if status.is_client_error() {
            let why =
                format!("cloud service `{}` refused: {status}: {}", self.service, String::from_utf8_lossy(&bytes));
            return Err(BadRequest(why).into());
        }
        if !status.is_success() {
            return Ok(CloudCall::Unreachable(format!("{status}: {}", String::from_utf8_lossy(&bytes))));
        }
        Ok(CloudCall::Answered { outputs: wire::from_safetensors(&bytes)?, compute_ms })
    }

    /// The cloud's model digest and per-node milliseconds for the service's model.
    pub(super) async fn profile(&self) -> Option<(String, BTreeMap<String, f64>)> {
        #[derive(serde::Deserialize)]
        struct CloudProfile {
            digest: String,
            node_ms: BTreeMap<String, f64>,
        }
        let req = self.http.get(self.url("/profile")).bearer_auth(&self.token).timeout(Duration::from_secs(60));
        let p: CloudProfile = req.send().await.ok()?.error_for_status().ok()?.json().await.ok()?;
        Some((p.digest, p.node_ms))
    }

    /// Round-trip time (median of 5 pings) and bandwidth (one probe upload of `probe` bytes) to
    /// the cloud: (Mbit/s, ms).
    pub(super) async fn measure(&self, probe: usize) -> anyhow::Result<(f64, f64)> {
        let ping = format!("{}{}", self.base.trim_end_matches('/'), crate::protocol::routes::PING);
        let mut rtts = Vec::new();
        for _ in 0..5 {
            let t = Instant::now();
            let req = self.http.get(&ping).bearer_auth(&self.token).timeout(self.timeout);
            req.send().await?.error_for_status()?;
            rtts.push(t.elapsed().as_secs_f64() * 1e3);
        }
        rtts.sort_by(f64::total_cmp);
        let rtt = rtts[rtts.len() / 2];
        let t = Instant::now();
        let upload = self.http.post(&ping).bearer_auth(&self.token).timeout(Duration::from_secs(120));
        upload.body(vec![0u8; probe]).send().await?.error_for_status()?;
        let wire_ms = (t.elapsed().as_secs_f64() * 1e3 - rtt).max(0.05);
        Ok((probe as f64 * 8.0 / (wire_ms * 1e3), rtt))
    }
}
