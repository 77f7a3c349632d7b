//! State that must survive a crash, in SQLite (WAL, synchronous commits): the cloud's
//! ([`cloud::CloudStore`]: jobs, accepted updates and their files, node tokens, components, hard
//! examples; a job's rounds, models and history, [`rounds`]; a regional aggregator's relayed
//! rounds, [`relay`]) and an edge's ([`edge::EdgeStore`]: trained updates, the outbox, the replay
//! buffer, the incremental job's samples and model versions). Everything is written before it is
//! acknowledged.
use std::path::{Path, PathBuf};

use rusqlite::Connection;

mod cloud;
mod edge;
mod relay;
mod rounds;

pub use cloud::{CloudStore, Inserted, JobRow, UpdateRow};
pub use edge::{EdgeStore, OfferBatch, OutboxRow, ReplayOffer, ReplayState, TrainedRow};
pub use relay::Relayed;
pub use rounds::{RoundRow, Summaries};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("state database {path}: {error}")]
    Open { path: String, error: rusqlite::Error },
    #[error("state database {path}: {error}")]
    Create { path: String, error: std::io::Error },
    #[error("state database: {0}")]
    Sql(#[from] rusqlite::Error),
    #[error("state database: a job named `{0}` exists already")]
    JobExists(String),
    #[error("update files {path}: {error}")]
    Files { path: PathBuf, error: std::io::Error },
}

pub type Result<T> = std::result::Result<T, StoreError>;

impl StoreError {
    /// The state directory is full or read-only: the write failed as a whole (SQLite rolls the
    /// transaction back, a half-written file is removed) and succeeds again once space returns.
    pub fn is_storage(&self) -> bool {
        match self {
            StoreError::Open { error, .. } | StoreError::Sql(error) => sql_is_storage(error),
            StoreError::Files { error, .. } | StoreError::Create { error, .. } => io_is_storage(error),
            StoreError::JobExists(_) => false,
        }
    }
}

/// A write failed because the file system is full, out of quota or read-only.
pub fn io_is_storage(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT | libc::EROFS))
        || matches!(e.kind(), std::io::ErrorKind::StorageFull | std::io::ErrorKind::ReadOnlyFilesystem)
}

/// SQLite's "disk I/O error" counts too: it is what a write gets once the kernel has turned the
/// file system read-only under an open database (ext4's `errors=remount-ro` after a disk error),
/// which is a storage fault to wait out, not a fault of the job.
fn sql_is_storage(e: &rusqlite::Error) -> bool {
    use rusqlite::ErrorCode::{DiskFull, ReadOnly, SystemIoFailure};
    matches!(e.sqlite_error_code(), Some(DiskFull | ReadOnly | SystemIoFailure))
}

/// Whether anywhere in `e`'s chain is a [`StoreError`], an I/O or an SQLite error that says the
/// state directory is full or read-only.
pub fn is_storage_error(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<StoreError>().is_some_and(StoreError::is_storage)
            || c.downcast_ref::<std::io::Error>().is_some_and(io_is_storage)
            || c.downcast_ref::<rusqlite::Error>().is_some_and(sql_is_storage)
    })
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

pub(crate) fn open(path: &Path, schema: &str) -> Result<Connection> {
    let fail = |error| StoreError::Open { path: path.display().to_string(), error };
    // SQLite says only "unable to open database file"; creating the file first says why (a
    // read-only file system, a missing directory, permissions).
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|error| StoreError::Create { path: path.display().to_string(), error })?;
    let conn = Connection::open(path).map_err(fail)?;
    conn.pragma_update(None, "journal_mode", "WAL").map_err(fail)?;
    conn.pragma_update(None, "synchronous", "FULL").map_err(fail)?;
    conn.busy_timeout(std::time::Duration::from_secs(10)).map_err(fail)?;
    conn.execute_batch(schema).map_err(fail)?;
    Ok(conn)
}
