//! The typed client of the cloud's HTTP API, for the operator's CLI, the edge's worker and the
//! tests: one place that knows the routes, the bearer token and the error bodies.
use std::time::Duration;

use bytes::Bytes;
use reqwest::StatusCode;
use serde::de::DeserializeOwned;

use crate::config::job::{JobSpec, LoadedJob};
use crate::protocol::{
    routes, ErrorBody, FailureReport, JobStatus, JobSummary, RoundState, RoundSummary, SubmitJob, Task, TaskResponse,
    UploadResponse, MAX_HISTORY_PAGE,
};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The cloud could not be reached, or the exchange broke off.
    #[error("{what}: {source}")]
    Transport { what: String, source: reqwest::Error },
    /// The cloud answered with an error status (and the message of its error body).
    #[error("{what}: the cloud answered {status}: {message}")]
    Refused { what: String, status: StatusCode, message: String },
    /// The TLS settings could not be used, or plain HTTP was refused.
    #[error(transparent)]
    Tls(#[from] nereid_net::tls::TlsError),
}

impl ClientError {
    /// The status the cloud answered with, if it answered.
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            ClientError::Refused { status, .. } => Some(*status),
            ClientError::Transport { .. } | ClientError::Tls(_) => None,
        }
    }
}

pub type Result<T> = std::result::Result<T, ClientError>;

/// An HTTP client builder for reaching `url` (a cloud's base URL): rustls with `tls`; plain HTTP
/// only to loopback unless `allow_plaintext` (then with a warning).
pub fn cloud_http(
    url: &str,
    tls: &nereid_net::tls::ClientTls,
    allow_plaintext: bool,
) -> std::result::Result<reqwest::ClientBuilder, nereid_net::tls::TlsError> {
    check_cloud_plaintext(url, allow_plaintext)?;
    Ok(tls.http_client()?.tcp_nodelay(true))
}

/// Refuses an `http://` `url` off loopback unless `allow_plaintext` (then warns).
pub fn check_cloud_plaintext(url: &str, allow_plaintext: bool) -> std::result::Result<(), nereid_net::tls::TlsError> {
    match nereid_net::tls::plain_http_host(url) {
        Some(host) => nereid_net::tls::check_plaintext(
            &format!("the connection to {url}"),
            host,
            allow_plaintext,
            "allow_plaintext = true, or --allow-plaintext",
        ),
        None => Ok(()),
    }
}

/// A client of one cloud with one bearer token (an operator's or a node's).
#[derive(Clone)]
pub struct CloudClient {
    base: String,
    token: String,
    http: reqwest::Client,
}

impl CloudClient {
    /// A client whose requests time out after `timeout`, trusting the system's CA certificates.
    pub fn new(base: &str, token: &str, timeout: Duration) -> Result<CloudClient> {
        CloudClient::connect(base, token, timeout, &nereid_net::tls::ClientTls::default(), false)
    }

    /// A client whose requests time out after `timeout`, with `tls` for `https://` (its CA, and
    /// its certificate for mutual TLS). Plain `http://` is refused for a host that is not
    /// loopback unless `allow_plaintext`. An empty `token` sends none (a node known by its
    /// certificate).
    pub fn connect(
        base: &str,
        token: &str,
        timeout: Duration,
        tls: &nereid_net::tls::ClientTls,
        allow_plaintext: bool,
    ) -> Result<CloudClient> {
        let http = cloud_http(base, tls, allow_plaintext)?
            .timeout(timeout)
            .build()
            .map_err(|source| ClientError::Transport { what: "building the HTTP client".into(), source })?;
        Ok(CloudClient::with_http(base, token, http))
    }

    pub fn with_http(base: &str, token: &str, http: reqwest::Client) -> CloudClient {
        CloudClient { base: base.trim_end_matches('/').to_string(), token: token.to_string(), http }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    async fn send(&self, what: String, req: reqwest::RequestBuilder) -> Result<reqwest::Response> {
        let req = if self.token.is_empty() { req } else { req.bearer_auth(&self.token) };
        let resp = match req.send().await {
            Ok(r) => r,
            Err(source) => return Err(ClientError::Transport { what, source }),
        };
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        let text = resp.text().await.unwrap_or_default();
        let message = serde_json::from_str::<ErrorBody>(&text).map(|e| e.error).unwrap_or(text);
        Err(ClientError::Refused { what, status, message })
    }

    async fn json<T: DeserializeOwned>(&self, what: String, req: reqwest::RequestBuilder) -> Result<T> {
        let resp = self.send(what.clone(), req).await?;
        resp.json().await.map_err(|source| ClientError::Transport { what, source })
    }

    async fn bytes(&self, what: String, req: reqwest::RequestBuilder) -> Result<Bytes> {
        let resp = self.send(what.clone(), req).await?;
        resp.bytes().await.map_err(|source| ClientError::Transport { what, source })
    }

    async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        self.json(format!("GET {path}"), self.http.get(self.url(path))).await
    }

    async fn post_json<T: DeserializeOwned>(&self, path: &str, body: &impl serde::Serialize) -> Result<T> {
        self.json(format!("POST {path}"), self.http.post(self.url(path)).json(body)).await
    }

    /// Whether the cloud answers its liveness check.
    pub async fn health(&self) -> bool {
        matches!(self.http.get(self.url(routes::HEALTH)).send().await, Ok(r) if r.status().is_success())
    }

    // ---- nodes -----------------------------------------------------------------------------

    /// What this node should do now.
    pub async fn task(&self) -> Result<Option<Task>> {
        self.task_within(0).await
    }

    /// What this node should do, waiting up to `wait_secs` for a task (a long poll; a cloud
    /// that does not hold requests answers at once). A task read after its round's deadline
    /// (the process was paused, or the answer waited in its socket) may be for a round that
    /// closed meanwhile: the cloud is asked again at once, and its answer is the task. Asking
    /// again costs a request; working for a closed round costs the round's work and can make the
    /// next round late too. A round still open past its deadline (short of updates) is given
    /// again.
    pub async fn task_within(&self, wait_secs: u32) -> Result<Option<Task>> {
        let Some(task) = self.ask_task(wait_secs).await? else { return Ok(None) };
        if task.deadline_ms > crate::store::now_ms() {
            return Ok(Some(task));
        }
        let fresh = self.ask_task(0).await?;
        let now = match &fresh {
            Some(f) if (f.job.as_str(), f.round) == (task.job.as_str(), task.round) => return Ok(fresh),
            Some(f) => format!("round {} of `{}`", f.round, f.job),
            None => "no task".into(),
        };
        tracing::info!(job = %task.job, round = task.round, "a task read after its round's deadline; asked again: {now}");
        Ok(fresh)
    }

    async fn ask_task(&self, wait_secs: u32) -> Result<Option<Task>> {
        Ok(self.get::<TaskResponse>(&routes::waiting(routes::TASK, wait_secs)).await?.task)
    }

    /// A job's global model version `version` (safetensors).
    pub async fn model(&self, job: &str, version: u32) -> Result<Bytes> {
        let path = routes::model(job, version);
        self.bytes(format!("GET {path}"), self.http.get(self.url(&path))).await
    }

    /// A plugin component by its digest.
    pub async fn component(&self, digest: &str) -> Result<Bytes> {
        let path = routes::component(digest);
        self.bytes(format!("GET {path}"), self.http.get(self.url(&path))).await
    }

    /// Uploads an update (safetensors with its metadata).
    pub async fn upload(&self, job: &str, round: u32, update: Vec<u8>) -> Result<UploadResponse> {
        self.upload_body(job, round, update.into()).await
    }

    /// Uploads an update from any body, e.g. a file streamed from disk.
    pub async fn upload_body(&self, job: &str, round: u32, update: reqwest::Body) -> Result<UploadResponse> {
        let path = routes::update(job, round);
        self.json(format!("uploading to {path}"), self.http.post(self.url(&path)).body(update)).await
    }

    /// Tells the cloud this node cannot make its update for a round.
    pub async fn report_failure(&self, job: &str, round: u32, reason: &str) -> Result<UploadResponse> {
        self.post_json(&routes::failure(job, round), &FailureReport { reason: reason.to_string() }).await
    }

    /// Whether a round still waits for the caller.
    pub async fn round_state(&self, job: &str, round: u32) -> Result<RoundState> {
        self.round_state_within(job, round, 0).await
    }

    /// Whether a round still waits for the caller, held by the cloud up to `wait_secs` while it
    /// does (a long poll).
    pub async fn round_state_within(&self, job: &str, round: u32, wait_secs: u32) -> Result<RoundState> {
        self.get(&routes::waiting(&routes::round(job, round), wait_secs)).await
    }

    // ---- operators -------------------------------------------------------------------------

    /// Stores a component on the cloud; returns its digest.
    pub async fn put_component(&self, bytes: Vec<u8>) -> Result<String> {
        let answer: serde_json::Value = self
            .json(format!("POST {}", routes::COMPONENTS), self.http.post(self.url(routes::COMPONENTS)).body(bytes))
            .await?;
        Ok(answer["digest"].as_str().unwrap_or_default().to_string())
    }

    /// Stores an external model's initial weights on the cloud; returns their digest.
    pub async fn put_initial_weights(&self, bytes: Vec<u8>) -> Result<String> {
        let path = routes::INITIAL_WEIGHTS;
        let answer: serde_json::Value =
            self.json(format!("POST {path}"), self.http.post(self.url(path)).body(bytes)).await?;
        Ok(answer["digest"].as_str().unwrap_or_default().to_string())
    }

    /// Sends a job spec (its components must be on the cloud).
    pub async fn submit(&self, spec: JobSpec) -> Result<JobSummary> {
        self.post_json(routes::JOBS, &SubmitJob { spec }).await
    }

    /// Uploads the job's components, then the job.
    pub async fn apply(&self, job: LoadedJob) -> Result<JobSummary> {
        for bytes in job.components.into_values() {
            self.put_component(bytes).await?;
        }
        if let Some(bytes) = job.initial_weights {
            self.put_initial_weights(bytes).await?;
        }
        self.submit(job.spec).await
    }

    pub async fn jobs(&self) -> Result<Vec<JobSummary>> {
        self.get(routes::JOBS).await
    }

    /// A job's status with the newest page of its history.
    pub async fn status(&self, job: &str) -> Result<JobStatus> {
        self.get(&routes::job(job)).await
    }

    /// A job's status with the history page of at most `limit` rounds from round `from` (the
    /// newest page without `from`; the cloud's default size without `limit`).
    pub async fn status_page(&self, job: &str, from: Option<u32>, limit: Option<u32>) -> Result<JobStatus> {
        self.get(&routes::job_page(job, from, limit)).await
    }

    /// Every closed round's summary of a job, oldest first, fetched page by page.
    pub async fn history(&self, job: &str) -> Result<Vec<RoundSummary>> {
        let mut history = Vec::new();
        let mut from = Some(1);
        while let Some(round) = from {
            let page = self.status_page(job, Some(round), Some(MAX_HISTORY_PAGE)).await?;
            history.extend(page.history);
            // Pages move forward: a next page that does not cannot loop.
            from = page.history_next.filter(|&next| next > round);
        }
        Ok(history)
    }

    pub async fn stop(&self, job: &str) -> Result<JobStatus> {
        let path = routes::job_stop(job);
        self.json(format!("POST {path}"), self.http.post(self.url(&path))).await
    }

    /// The hard examples kept for a service, `(node, id)`.
    pub async fn hard_examples(&self, service: &str) -> Result<Vec<(String, i64)>> {
        self.get(&routes::hard_examples(service)).await
    }
}
