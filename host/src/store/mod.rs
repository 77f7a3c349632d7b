//! State that must survive a crash, in SQLite (WAL, synchronous commits): the cloud's
//! ([`cloud::CloudStore`]: jobs, rounds, accepted updates and their files, model versions, node
//! tokens, components, hard examples; a regional aggregator's relayed rounds, [`relay`]) and an edge's ([`edge::EdgeStore`]: trained updates, the
//! outbox, the replay buffer, the incremental job's samples and model versions). Everything is
//! written before it is acknowledged.
use std::path::{Path, PathBuf};

use rusqlite::Connection;

mod cloud;
mod edge;
mod relay;

pub use cloud::{CloudStore, Inserted, JobRow, RoundRow, UpdateRow};
pub use edge::{EdgeStore, OfferBatch, OutboxRow, ReplayOffer, ReplayState, TrainedRow};
pub use relay::Relayed;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("state database {path}: {source}")]
    Open { path: String, source: rusqlite::Error },
    #[error("state database: {0}")]
    Sql(#[from] rusqlite::Error),
    #[error("state database: a job named `{0}` exists already")]
    JobExists(String),
    #[error("update files {path}: {source}")]
    Files { path: PathBuf, source: std::io::Error },
}

pub type Result<T> = std::result::Result<T, StoreError>;

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

pub(crate) fn open(path: &Path, schema: &str) -> Result<Connection> {
    let fail = |source| StoreError::Open { path: path.display().to_string(), source };
    let conn = Connection::open(path).map_err(fail)?;
    conn.pragma_update(None, "journal_mode", "WAL").map_err(fail)?;
    conn.pragma_update(None, "synchronous", "FULL").map_err(fail)?;
    conn.busy_timeout(std::time::Duration::from_secs(10)).map_err(fail)?;
    conn.execute_batch(schema).map_err(fail)?;
    Ok(conn)
}
