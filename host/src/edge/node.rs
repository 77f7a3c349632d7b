//! The edge node's composition root: what edge.toml's `listen` side runs (inference services,
//! the replay buffer, the incremental-learning job, the store they share), loaded together and
//! started together. The API ([`super::api`]) serves a node.
use std::path::Path;
use std::sync::Arc;

use anyhow::Context;

use super::incremental::IncrementalJob;
use super::replay::ReplayBuffer;
use super::services::Services;
use crate::components::Components;
use crate::config::EdgeConfig;
use crate::runtime::Runtime;
use crate::store::EdgeStore;
use crate::trainer::SharedTrainer;

pub struct Node {
    pub services: Arc<Services>,
    /// The replay buffer, if edge.toml has a `[replay]`.
    pub replay: Option<Arc<ReplayBuffer>>,
    /// The incremental-learning job, if edge.toml has an `[incremental]` (it needs `[replay]`).
    pub incremental: Option<Arc<IncrementalJob>>,
    pub store: Arc<EdgeStore>,
    /// Durations of the API's requests.
    pub http: crate::metrics::HttpMetrics,
}

impl Node {
    /// Loads every part edge.toml names (`base` is its directory); errors name the section.
    pub async fn load(
        edge: &EdgeConfig,
        base: &Path,
        runtime: &Runtime,
        components: &Components,
        store: Arc<EdgeStore>,
        trainer: Option<SharedTrainer>,
    ) -> anyhow::Result<Node> {
        let services = Services::load(edge, base, runtime, components, store.clone()).await?;
        let mut replay = match &edge.replay {
            Some(cfg) => {
                Some(ReplayBuffer::load(cfg, base, runtime, components, store.clone()).await.context("[replay]")?)
            }
            None => None,
        };
        let incremental = match &edge.incremental {
            None => None,
            Some(cfg) => {
                let job = IncrementalJob::load(cfg, edge, base, store.clone(), trainer).context("[incremental]")?;
                replay
                    .as_mut()
                    .context("[incremental]: the job needs a replay buffer ([replay] in edge.toml)")?
                    .feed_training(job.trainable())
                    .context("[incremental]")?;
                job.resume(&services).context("[incremental]")?;
                Some(Arc::new(job))
            }
        };
        Ok(Node {
            services: Arc::new(services),
            replay: replay.map(Arc::new),
            incremental,
            store,
            http: crate::metrics::HttpMetrics::default(),
        })
    }

    /// Starts what runs on its own: the outbox, split planning, the incremental job's checks
    /// and its MQTT subscription.
    pub fn start(&self) {
        tokio::spawn(self.services.clone().deliver_outbox());
        tokio::spawn(self.services.clone().plan_all());
        if let (Some(job), Some(replay)) = (&self.incremental, &self.replay) {
            tokio::spawn(super::incremental::run(job.clone(), self.services.clone(), replay.clone()));
            tokio::spawn(super::mqtt::subscribe(job.clone(), replay.clone()));
        }
    }
}
