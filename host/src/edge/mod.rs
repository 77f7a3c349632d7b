//! The edge host: one node. [`run`] starts what edge.toml asks for: the node's API and what it
//! serves ([`node`]: inference [`services`], the [`replay`] buffer, the [`incremental`]-learning
//! job and its [`mqtt`] source, behind [`api`]) if `listen` is set, and the federated-learning
//! [`worker`] if `data` or `[trainer]` is.
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::Context;

use crate::components::Components;
use crate::config::EdgeConfig;
use crate::runtime::Runtime;
use crate::store::EdgeStore;
use crate::trainer::ExternalTrainer;

pub mod api;
pub mod error;
pub mod incremental;
pub mod learner;
pub mod mqtt;
pub mod node;
pub mod replay;
pub mod services;
pub mod worker;

/// Runs an edge node: its API and inference services if `listen` is set, its federated-learning
/// worker if `data` or `[trainer]` is, until the process ends.
pub async fn run(
    mut config: EdgeConfig,
    base: &Path,
    cache_dir: Option<PathBuf>,
    registry_cache: PathBuf,
) -> anyhow::Result<()> {
    crate::return_large_buffers_to_the_os();
    let io_threads = tokio::runtime::Handle::current().metrics().num_workers();
    tracing::info!(io_threads, io_scheduling = ?config.io_scheduling, "async runtime");
    // SIGTERM stops the API (requests in flight finish) and the worker; what the edge stores is
    // crash-safe, so an unfinished task is taken up again at the next start.
    let stop = tokio_util::sync::CancellationToken::new();
    tokio::spawn({
        let stop = stop.clone();
        async move {
            nereid_net::terminated().await;
            stop.cancel();
        }
    });
    config.cloud_tls = config.cloud_tls.relative_to(base);
    if let Some(mqtt) = config.incremental.as_mut().and_then(|i| i.mqtt.as_mut()) {
        mqtt.tls = mqtt.tls.relative_to(base);
    }
    let tls = match &config.tls {
        Some(tls) => Some(tls.relative_to(base).acceptor().context("edge.toml [tls]")?),
        None => None,
    };
    // Refused before anything starts, not at the first poll.
    crate::client::check_cloud_plaintext(&config.cloud, config.allow_plaintext).context("edge.toml `cloud`")?;
    config.cloud_tls.config().context("edge.toml [cloud_tls]")?;
    let models = match &config.models {
        Some(dir) => crate::runtime::nn::Models::load_dir(&base.join(dir), config.nn_backend).context("models")?,
        None => crate::runtime::nn::Models::new(config.nn_backend),
    };
    let runtime = Runtime::with_models(cache_dir, models)?;
    if config.listen.is_none()
        && (!config.services.is_empty() || config.replay.is_some() || config.incremental.is_some())
    {
        anyhow::bail!("services, [replay] and [incremental] need `listen` (the address of the edge's API)");
    }
    let trains = config.data.is_some() || config.trainer.is_some();
    if config.listen.is_none() && !trains {
        anyhow::bail!(
            "nothing to do: set `data` or [trainer] (federated learning) and/or `listen` (inference services)"
        );
    }
    // Started now: a trainer a killed edge left behind is stopped at once.
    let trainer = match &config.trainer {
        Some(t) => {
            let dir = base.join(&config.state).with_extension("trainer");
            let trainer = ExternalTrainer::new(t.clone(), base, &dir, &config.name).context("[trainer]")?;
            Some(Arc::new(Mutex::new(trainer)))
        }
        None => None,
    };
    let api = match &config.listen {
        Some(listen) => {
            let auth = api::ApiAuth::new(config.api.as_ref())?;
            let components = Components::new(registry_cache.clone(), &config.registries)?;
            let store = Arc::new(EdgeStore::open(&base.join(&config.state))?);
            let node = Arc::new(node::Node::load(&config, base, &runtime, &components, store, trainer.clone()).await?);
            if tls.is_none() {
                nereid_net::tls::check_plaintext(
                    "the edge's API",
                    listen,
                    config.allow_plaintext,
                    "allow_plaintext = true",
                )
                .context("edge.toml `listen`")?;
            }
            let (listen, limits) = (listen.clone(), config.http.clone());
            let stopped = stop.clone().cancelled_owned();
            Some(tokio::spawn(async move { api::serve(&listen, node, auth, limits, tls, stopped).await }))
        }
        None => None,
    };
    if trains {
        let worker = worker::Worker::new(config, base, runtime, registry_cache, trainer)?;
        return match api {
            // Whichever stops first (e.g. the API cannot bind) ends the node with its error; on
            // SIGTERM the API drains and ends, which ends the worker with it.
            Some(task) => tokio::select! {
                r = worker.run() => r,
                r = task => r.context("edge API")?,
            },
            None => tokio::select! {
                r = worker.run() => r,
                () = stop.cancelled() => Ok(()),
            },
        };
    }
    match api {
        Some(task) => task.await.context("edge API")?,
        None => Ok(()),
    }
}
