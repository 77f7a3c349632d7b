//! An operator's client of the cloud's API (`nereid job ...`, the demo).
use anyhow::{bail, Context};
use serde::de::DeserializeOwned;

use nereid::job::LoadedJob;
use nereid::protocol::{ErrorBody, JobStatus, JobSummary, SubmitJob};

pub struct Api {
    base: String,
    token: String,
    http: reqwest::Client,
}

impl Api {
    pub fn new(base: &str, token: &str) -> anyhow::Result<Api> {
        let http = reqwest::Client::builder().timeout(std::time::Duration::from_secs(120)).build()?;
        Ok(Api { base: base.trim_end_matches('/').to_string(), token: token.to_string(), http })
    }

    async fn check(resp: reqwest::Response, what: &str) -> anyhow::Result<reqwest::Response> {
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        let message = serde_json::from_str::<ErrorBody>(&text).map(|e| e.error).unwrap_or(text);
        bail!("{what}: the cloud answered {status}: {message}")
    }

    async fn get<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        let url = format!("{}{path}", self.base);
        let resp = self.http.get(&url).bearer_auth(&self.token).send().await.with_context(|| format!("GET {url}"))?;
        Ok(Self::check(resp, &format!("GET {path}")).await?.json().await?)
    }

    pub async fn bytes(&self, path: &str) -> anyhow::Result<Vec<u8>> {
        let url = format!("{}{path}", self.base);
        let resp = self.http.get(&url).bearer_auth(&self.token).send().await.with_context(|| format!("GET {url}"))?;
        Ok(Self::check(resp, &format!("GET {path}")).await?.bytes().await?.to_vec())
    }

    async fn post<T: DeserializeOwned>(&self, path: &str, body: reqwest::Body, json: bool) -> anyhow::Result<T> {
        let url = format!("{}{path}", self.base);
        let mut req = self.http.post(&url).bearer_auth(&self.token).body(body);
        if json {
            req = req.header(reqwest::header::CONTENT_TYPE, "application/json");
        }
        let resp = req.send().await.with_context(|| format!("POST {url}"))?;
        Ok(Self::check(resp, &format!("POST {path}")).await?.json().await?)
    }

    pub async fn health(&self) -> bool {
        matches!(self.http.get(format!("{}/v1/health", self.base)).send().await, Ok(r) if r.status().is_success())
    }

    /// Uploads the job's components, then the job.
    pub async fn apply(&self, job: LoadedJob) -> anyhow::Result<JobSummary> {
        for bytes in job.components.into_values() {
            let _: serde_json::Value = self.post("/v1/components", bytes.into(), false).await?;
        }
        let body = serde_json::to_vec(&SubmitJob { spec: job.spec })?;
        self.post("/v1/jobs", body.into(), true).await
    }

    pub async fn jobs(&self) -> anyhow::Result<Vec<JobSummary>> {
        self.get("/v1/jobs").await
    }

    pub async fn status(&self, name: &str) -> anyhow::Result<JobStatus> {
        self.get(&format!("/v1/jobs/{name}")).await
    }

    pub async fn stop(&self, name: &str) -> anyhow::Result<JobStatus> {
        self.post(&format!("/v1/jobs/{name}/stop"), Vec::new().into(), false).await
    }
}
