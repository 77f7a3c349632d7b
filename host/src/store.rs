//! State that must survive a crash, in SQLite (WAL, synchronous commits): the cloud's jobs,
//! rounds, accepted updates, model versions, node tokens and components; an edge's trained
//! updates. Everything is written before it is acknowledged.
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use rusqlite::{params, Connection, OptionalExtension};
use serde::{Deserialize, Serialize};

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

fn open(path: &Path, schema: &str) -> Result<Connection> {
    let fail = |source| StoreError::Open { path: path.display().to_string(), source };
    let conn = Connection::open(path).map_err(fail)?;
    conn.pragma_update(None, "journal_mode", "WAL").map_err(fail)?;
    conn.pragma_update(None, "synchronous", "FULL").map_err(fail)?;
    conn.busy_timeout(std::time::Duration::from_secs(10)).map_err(fail)?;
    conn.execute_batch(schema).map_err(fail)?;
    Ok(conn)
}

const CLOUD_SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS nodes (name TEXT PRIMARY KEY, token_sha256 TEXT NOT NULL UNIQUE);
CREATE TABLE IF NOT EXISTS components (digest TEXT PRIMARY KEY, bytes BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS jobs (
    name TEXT PRIMARY KEY, spec TEXT NOT NULL, status TEXT NOT NULL, reason TEXT,
    next_round INTEGER NOT NULL, created_ms INTEGER NOT NULL, finished_ms INTEGER, pending_spec TEXT);
CREATE TABLE IF NOT EXISTS swaps (
    job TEXT NOT NULL, round INTEGER NOT NULL, slot TEXT NOT NULL, from_plugin TEXT NOT NULL,
    to_plugin TEXT NOT NULL, error TEXT, at_ms INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS models (job TEXT NOT NULL, version INTEGER NOT NULL, bytes BLOB NOT NULL, PRIMARY KEY (job, version));
CREATE TABLE IF NOT EXISTS rounds (
    job TEXT NOT NULL, round INTEGER NOT NULL, selected TEXT NOT NULL, opened_ms INTEGER NOT NULL,
    deadline_ms INTEGER NOT NULL, closed_ms INTEGER, summary TEXT, PRIMARY KEY (job, round));
CREATE TABLE IF NOT EXISTS updates (
    job TEXT NOT NULL, round INTEGER NOT NULL, node TEXT NOT NULL, num_examples INTEGER NOT NULL,
    metrics TEXT NOT NULL, file TEXT NOT NULL, received_ms INTEGER NOT NULL, PRIMARY KEY (job, round, node));
CREATE TABLE IF NOT EXISTS failures (
    job TEXT NOT NULL, round INTEGER NOT NULL, node TEXT NOT NULL, reason TEXT NOT NULL,
    at_ms INTEGER NOT NULL, PRIMARY KEY (job, round, node));
CREATE TABLE IF NOT EXISTS hard_examples (
    node TEXT NOT NULL, id INTEGER NOT NULL, service TEXT NOT NULL, input BLOB NOT NULL,
    queued_ms INTEGER NOT NULL, received_ms INTEGER NOT NULL, PRIMARY KEY (node, id));
";

#[derive(Debug, Clone)]
pub struct JobRow {
    pub name: String,
    pub spec: String,
    pub status: String,
    pub reason: Option<String>,
    pub next_round: u32,
    pub created_ms: i64,
    pub finished_ms: Option<i64>,
    /// A spec applied to the running job, waiting for the next round boundary.
    pub pending_spec: Option<String>,
}

/// A plugin swap (or a refused one) on a job.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct SwapRow {
    /// The first round the new plugin serves (or would have).
    pub round: u32,
    pub slot: String,
    pub from: String,
    pub to: String,
    /// Why the new plugin was refused (the old one kept running).
    pub error: Option<String>,
    pub at_ms: i64,
}

#[derive(Debug, Clone)]
pub struct RoundRow {
    pub round: u32,
    pub selected: Vec<String>,
    pub opened_ms: i64,
    pub deadline_ms: i64,
    pub closed_ms: Option<i64>,
    pub summary: Option<String>,
}

#[derive(Debug, Clone)]
pub struct UpdateRow {
    pub node: String,
    pub num_examples: u64,
    pub metrics: String,
    /// The update's safetensors file, under the store's update directory.
    pub file: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Inserted {
    New,
    Duplicate,
}

/// The cloud's state: SQLite for everything but the updates' tensors, which are files next to it
/// (written and fsynced before their row commits), as SQLite advises for large blobs.
pub struct CloudStore {
    conn: Mutex<Connection>,
    updates_dir: PathBuf,
}

impl CloudStore {
    pub fn open(path: &Path) -> Result<CloudStore> {
        let updates_dir = path.with_extension("updates");
        let incoming = updates_dir.join("incoming");
        // Uploads that were arriving when the process ended were never accepted.
        let _ = std::fs::remove_dir_all(&incoming);
        std::fs::create_dir_all(&incoming).map_err(|e| StoreError::Files { path: incoming.clone(), source: e })?;
        let conn = open(path, CLOUD_SCHEMA)?;
        // A state written before hot swap existed has no `pending_spec` column yet.
        let has_pending: bool = conn
            .query_row("SELECT COUNT(*) > 0 FROM pragma_table_info('jobs') WHERE name = 'pending_spec'", [], |r| {
                r.get(0)
            })
            .map_err(|source| StoreError::Open { path: path.display().to_string(), source })?;
        if !has_pending {
            conn.execute_batch("ALTER TABLE jobs ADD COLUMN pending_spec TEXT")
                .map_err(|source| StoreError::Open { path: path.display().to_string(), source })?;
        }
        Ok(CloudStore { conn: Mutex::new(conn), updates_dir })
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock leaves SQLite consistent (transactions roll back).
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn set_node_token(&self, node: &str, token_sha256: &str) -> Result<()> {
        self.conn().execute(
            "INSERT INTO nodes (name, token_sha256) VALUES (?1, ?2)
             ON CONFLICT(name) DO UPDATE SET token_sha256 = excluded.token_sha256",
            params![node, token_sha256],
        )?;
        Ok(())
    }

    pub fn node_for_token(&self, token_sha256: &str) -> Result<Option<String>> {
        Ok(self
            .conn()
            .query_row("SELECT name FROM nodes WHERE token_sha256 = ?1", [token_sha256], |r| r.get(0))
            .optional()?)
    }

    /// All node names, sorted.
    pub fn nodes(&self) -> Result<Vec<String>> {
        let conn = self.conn();
        let mut stmt = conn.prepare("SELECT name FROM nodes ORDER BY name")?;
        let rows = stmt.query_map([], |r| r.get(0))?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    pub fn put_component(&self, digest: &str, bytes: &[u8]) -> Result<()> {
        self.conn()
            .execute("INSERT OR IGNORE INTO components (digest, bytes) VALUES (?1, ?2)", params![digest, bytes])?;
        Ok(())
    }

    pub fn component(&self, digest: &str) -> Result<Option<Vec<u8>>> {
        Ok(self
            .conn()
            .query_row("SELECT bytes FROM components WHERE digest = ?1", [digest], |r| r.get(0))
            .optional()?)
    }

    /// Creates a job with its initial model (version 0), atomically.
    pub fn insert_job(&self, name: &str, spec_json: &str, initial_model: &[u8]) -> Result<()> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let exists: bool = tx.query_row("SELECT EXISTS(SELECT 1 FROM jobs WHERE name = ?1)", [name], |r| r.get(0))?;
        if exists {
            return Err(StoreError::JobExists(name.to_string()));
        }
        tx.execute(
            "INSERT INTO jobs (name, spec, status, next_round, created_ms) VALUES (?1, ?2, 'running', 1, ?3)",
            params![name, spec_json, now_ms()],
        )?;
        tx.execute("INSERT INTO models (job, version, bytes) VALUES (?1, 0, ?2)", params![name, initial_model])?;
        tx.commit()?;
        Ok(())
    }

    fn job_row(r: &rusqlite::Row) -> rusqlite::Result<JobRow> {
        Ok(JobRow {
            name: r.get(0)?,
            spec: r.get(1)?,
            status: r.get(2)?,
            reason: r.get(3)?,
            next_round: r.get(4)?,
            created_ms: r.get(5)?,
            finished_ms: r.get(6)?,
            pending_spec: r.get(7)?,
        })
    }

    pub fn jobs(&self) -> Result<Vec<JobRow>> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT name, spec, status, reason, next_round, created_ms, finished_ms, pending_spec FROM jobs ORDER BY created_ms",
        )?;
        let rows = stmt.query_map([], Self::job_row)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    pub fn job(&self, name: &str) -> Result<Option<JobRow>> {
        Ok(self
            .conn()
            .query_row(
                "SELECT name, spec, status, reason, next_round, created_ms, finished_ms, pending_spec FROM jobs WHERE name = ?1",
                [name],
                Self::job_row,
            )
            .optional()?)
    }

    /// Sets the spec a running job switches to at its next round boundary.
    pub fn set_pending_spec(&self, name: &str, spec_json: &str) -> Result<()> {
        self.conn().execute(
            "UPDATE jobs SET pending_spec = ?2 WHERE name = ?1 AND status = 'running'",
            params![name, spec_json],
        )?;
        Ok(())
    }

    /// Makes the pending spec (if any) the job's spec; returns it.
    pub fn promote_pending_spec(&self, name: &str) -> Result<Option<String>> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let pending: Option<String> =
            tx.query_row("SELECT pending_spec FROM jobs WHERE name = ?1", [name], |r| r.get(0)).optional()?.flatten();
        if let Some(spec) = &pending {
            tx.execute("UPDATE jobs SET spec = ?2, pending_spec = NULL WHERE name = ?1", params![name, spec])?;
        }
        tx.commit()?;
        Ok(pending)
    }

    pub fn set_spec(&self, name: &str, spec_json: &str) -> Result<()> {
        self.conn().execute("UPDATE jobs SET spec = ?2 WHERE name = ?1", params![name, spec_json])?;
        Ok(())
    }

    pub fn record_swap(&self, job: &str, swap: &SwapRow) -> Result<()> {
        self.conn().execute(
            "INSERT INTO swaps (job, round, slot, from_plugin, to_plugin, error, at_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![job, swap.round, swap.slot, swap.from, swap.to, swap.error, swap.at_ms],
        )?;
        Ok(())
    }

    pub fn swaps(&self, job: &str) -> Result<Vec<SwapRow>> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT round, slot, from_plugin, to_plugin, error, at_ms FROM swaps WHERE job = ?1 ORDER BY rowid",
        )?;
        let rows = stmt.query_map([job], |r| {
            Ok(SwapRow {
                round: r.get(0)?,
                slot: r.get(1)?,
                from: r.get(2)?,
                to: r.get(3)?,
                error: r.get(4)?,
                at_ms: r.get(5)?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    pub fn finish_job(&self, name: &str, status: &str, reason: &str) -> Result<()> {
        self.conn().execute(
            "UPDATE jobs SET status = ?2, reason = ?3, finished_ms = ?4 WHERE name = ?1 AND status = 'running'",
            params![name, status, reason, now_ms()],
        )?;
        Ok(())
    }

    pub fn model(&self, job: &str, version: u32) -> Result<Option<Vec<u8>>> {
        Ok(self
            .conn()
            .query_row("SELECT bytes FROM models WHERE job = ?1 AND version = ?2", params![job, version], |r| r.get(0))
            .optional()?)
    }

    pub fn open_round(&self, job: &str, round: u32, selected: &[String], deadline_ms: i64) -> Result<()> {
        let selected = serde_json::to_string(selected).expect("strings serialize");
        self.conn().execute(
            "INSERT OR IGNORE INTO rounds (job, round, selected, opened_ms, deadline_ms) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![job, round, selected, now_ms(), deadline_ms],
        )?;
        Ok(())
    }

    fn round_row(r: &rusqlite::Row) -> rusqlite::Result<RoundRow> {
        let selected: String = r.get(1)?;
        Ok(RoundRow {
            round: r.get(0)?,
            selected: serde_json::from_str(&selected).unwrap_or_default(),
            opened_ms: r.get(2)?,
            deadline_ms: r.get(3)?,
            closed_ms: r.get(4)?,
            summary: r.get(5)?,
        })
    }

    pub fn round(&self, job: &str, round: u32) -> Result<Option<RoundRow>> {
        Ok(self
            .conn()
            .query_row(
                "SELECT round, selected, opened_ms, deadline_ms, closed_ms, summary FROM rounds WHERE job = ?1 AND round = ?2",
                params![job, round],
                Self::round_row,
            )
            .optional()?)
    }

    pub fn rounds(&self, job: &str) -> Result<Vec<RoundRow>> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT round, selected, opened_ms, deadline_ms, closed_ms, summary FROM rounds WHERE job = ?1 ORDER BY round",
        )?;
        let rows = stmt.query_map([job], Self::round_row)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// A fresh path for an arriving update's file, in `incoming/` until it is accepted (so
    /// that collecting old update files never takes one still arriving). Its name is random,
    /// nothing a caller sent: no job or node name can lead the file elsewhere or make its name
    /// too long.
    pub fn new_update_file(&self) -> PathBuf {
        use rand::RngCore;
        let mut id = [0u8; 16];
        rand::rngs::OsRng.fill_bytes(&mut id);
        self.updates_dir.join("incoming").join(format!("{}.safetensors", hex::encode(id)))
    }

    /// Moves an arrived update's file (written and fsynced) out of `incoming/`, durably; returns
    /// where it is now, what [`CloudStore::insert_update`] records.
    pub fn settle_update_file(&self, incoming: &Path) -> Result<PathBuf> {
        let files = |source| StoreError::Files { path: self.updates_dir.clone(), source };
        let name = incoming.file_name().ok_or_else(|| files(std::io::Error::other("no file name")))?;
        let settled = self.updates_dir.join(name);
        std::fs::rename(incoming, &settled).map_err(files)?;
        std::fs::File::open(&self.updates_dir).and_then(|d| d.sync_all()).map_err(files)?;
        Ok(settled)
    }

    /// Records an update whose file (from `new_update_file`) is written and fsynced; a second
    /// upload of the same (job, round, node) changes nothing and its file is removed.
    pub fn insert_update(
        &self,
        job: &str,
        round: u32,
        node: &str,
        num_examples: u64,
        metrics: &str,
        file: &Path,
    ) -> Result<Inserted> {
        let name = file.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
        let n = self.conn().execute(
            "INSERT OR IGNORE INTO updates (job, round, node, num_examples, metrics, file, received_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![job, round, node, num_examples as i64, metrics, name, now_ms()],
        )?;
        if n == 1 {
            Ok(Inserted::New)
        } else {
            let _ = std::fs::remove_file(file);
            Ok(Inserted::Duplicate)
        }
    }

    /// Deletes update files no row refers to (left by a crash between a file and its row) and
    /// the files of closed rounds (their models are committed).
    pub fn collect_update_files(&self) -> Result<usize> {
        let keep: std::collections::HashSet<String> = {
            let conn = self.conn();
            let mut stmt = conn.prepare(
                "SELECT u.file FROM updates u JOIN rounds r ON r.job = u.job AND r.round = u.round WHERE r.closed_ms IS NULL",
            )?;
            let rows = stmt.query_map([], |r| r.get(0))?;
            rows.collect::<rusqlite::Result<_>>()?
        };
        let mut removed = 0;
        let entries = std::fs::read_dir(&self.updates_dir)
            .map_err(|e| StoreError::Files { path: self.updates_dir.clone(), source: e })?;
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_file())
                && !keep.contains(&entry.file_name().to_string_lossy().to_string())
                && std::fs::remove_file(entry.path()).is_ok()
            {
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// Records that `node` could not make its update for a round (the reason it gave), unless
    /// it sent one or reported a failure already; returns whether this is new.
    pub fn record_failure(&self, job: &str, round: u32, node: &str, reason: &str) -> Result<bool> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let uploaded: bool = tx.query_row(
            "SELECT EXISTS(SELECT 1 FROM updates WHERE job = ?1 AND round = ?2 AND node = ?3)",
            params![job, round, node],
            |r| r.get(0),
        )?;
        let n = if uploaded {
            0
        } else {
            tx.execute(
                "INSERT OR IGNORE INTO failures (job, round, node, reason, at_ms) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![job, round, node, reason, now_ms()],
            )?
        };
        tx.commit()?;
        Ok(n == 1)
    }

    /// (node, reason) of the nodes that reported a failure in a round, by name.
    pub fn failures(&self, job: &str, round: u32) -> Result<Vec<(String, String)>> {
        let conn = self.conn();
        let mut stmt = conn.prepare("SELECT node, reason FROM failures WHERE job = ?1 AND round = ?2 ORDER BY node")?;
        let rows = stmt.query_map(params![job, round], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Nodes with an update in a round, by name (the canonical fold order).
    pub fn update_nodes(&self, job: &str, round: u32) -> Result<Vec<String>> {
        let conn = self.conn();
        let mut stmt = conn.prepare("SELECT node FROM updates WHERE job = ?1 AND round = ?2 ORDER BY node")?;
        let rows = stmt.query_map(params![job, round], |r| r.get(0))?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    pub fn update(&self, job: &str, round: u32, node: &str) -> Result<Option<UpdateRow>> {
        Ok(self
            .conn()
            .query_row(
                "SELECT node, num_examples, metrics, file FROM updates WHERE job = ?1 AND round = ?2 AND node = ?3",
                params![job, round, node],
                |r| {
                    Ok(UpdateRow {
                        node: r.get(0)?,
                        num_examples: r.get::<_, i64>(1)? as u64,
                        metrics: r.get(2)?,
                        file: self.updates_dir.join(r.get::<_, String>(3)?),
                    })
                },
            )
            .optional()?)
    }

    /// (node, examples, metrics JSON) of a round's updates, without their tensors.
    pub fn update_metrics(&self, job: &str, round: u32) -> Result<Vec<(String, u64, String)>> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare("SELECT node, num_examples, metrics FROM updates WHERE job = ?1 AND round = ?2 ORDER BY node")?;
        let rows = stmt.query_map(params![job, round], |r| Ok((r.get(0)?, r.get::<_, i64>(1)? as u64, r.get(2)?)))?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Commits round `round`'s model as version `round`, closes the round and moves the job on,
    /// in one transaction.
    pub fn close_round(&self, job: &str, round: u32, model: &[u8], summary: &str) -> Result<()> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        tx.execute(
            "INSERT OR REPLACE INTO models (job, version, bytes) VALUES (?1, ?2, ?3)",
            params![job, round, model],
        )?;
        tx.execute(
            "UPDATE rounds SET closed_ms = ?3, summary = ?4 WHERE job = ?1 AND round = ?2",
            params![job, round, now_ms(), summary],
        )?;
        tx.execute("UPDATE jobs SET next_round = ?2 WHERE name = ?1", params![job, round + 1])?;
        tx.commit()?;
        Ok(())
    }
}

impl CloudStore {
    /// Keeps a hard example an edge sent; true if it is new (a resend of one already kept is
    /// acknowledged and not kept twice).
    pub fn save_hard_example(&self, node: &str, id: i64, service: &str, input: &[u8], queued_ms: i64) -> Result<bool> {
        let n = self.conn().execute(
            "INSERT OR IGNORE INTO hard_examples (node, id, service, input, queued_ms, received_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![node, id, service, input, queued_ms, now_ms()],
        )?;
        Ok(n == 1)
    }

    /// Ids of the hard examples kept for `service`, per node.
    pub fn hard_examples(&self, service: &str) -> Result<Vec<(String, i64)>> {
        let conn = self.conn();
        let mut stmt = conn.prepare("SELECT node, id FROM hard_examples WHERE service = ?1 ORDER BY node, id")?;
        let rows = stmt
            .query_map(params![service], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<std::result::Result<Vec<_>, _>>()?;
        Ok(rows)
    }
}

const EDGE_SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS trained (
    job TEXT NOT NULL, round INTEGER NOT NULL, num_examples INTEGER NOT NULL, metrics TEXT NOT NULL,
    bytes BLOB NOT NULL, uploaded INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (job, round));
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT, service TEXT NOT NULL, input BLOB NOT NULL, queued_ms INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS replay_samples (id INTEGER PRIMARY KEY, label INTEGER NOT NULL, bytes BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS replay_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS new_samples (id INTEGER PRIMARY KEY, label INTEGER NOT NULL, bytes BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS inbox_files (digest TEXT PRIMARY KEY, name TEXT NOT NULL, ingested_ms INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS model_versions (
    version INTEGER PRIMARY KEY, service TEXT NOT NULL, created_ms INTEGER NOT NULL, parent INTEGER,
    trigger TEXT NOT NULL, new_samples INTEGER NOT NULL, replayed INTEGER NOT NULL, metrics TEXT NOT NULL,
    decision TEXT NOT NULL, reason TEXT NOT NULL, onnx BLOB NOT NULL);
";

/// What the replay buffer holds, as its sampler needs it after a restart.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ReplayState {
    /// (id, label) of every held sample, by id.
    pub held: Vec<(u64, i64)>,
    /// Samples offered so far (the next one gets id `offered + 1`).
    pub offered: u64,
    /// The samples' element type and shape, fixed by the first one kept.
    pub layout: Option<String>,
}

/// One offered sample and what the sampler decided for it.
pub struct ReplayOffer<'a> {
    pub id: u64,
    pub label: i64,
    pub bytes: &'a [u8],
    /// Kept (evicting the sample with this id, if any) or not.
    pub keep: Option<Option<u64>>,
}

/// Where a batch of offers came from and what else it feeds, written with it.
#[derive(Default)]
pub struct OfferBatch<'a> {
    /// An incremental-learning job trains on the batch's samples (all of them, kept or not).
    pub keep_new: bool,
    /// The inbox file (content digest, name) the batch was read from.
    pub source: Option<(&'a str, &'a str)>,
}

/// A model version of an incremental-learning job: how it came about, its metrics (JSON) and
/// what was decided.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VersionRow {
    pub version: u32,
    pub service: String,
    pub created_ms: i64,
    /// The version it was fine-tuned from (none for the first).
    pub parent: Option<u32>,
    /// What started the round ("initial" for the model the job began with).
    pub trigger: String,
    pub new_samples: u64,
    pub replayed: u64,
    pub metrics: serde_json::Value,
    /// "initial", "deployed" or "kept" (the serving version stayed).
    pub decision: String,
    pub reason: String,
}

/// A hard example the edge has not yet delivered to the cloud.
#[derive(Debug, Clone)]
pub struct OutboxRow {
    pub id: i64,
    pub service: String,
    pub input: Vec<u8>,
    pub queued_ms: i64,
}

/// An edge's own state: the updates it trained, and whether the cloud acknowledged them.
pub struct EdgeStore {
    conn: Mutex<Connection>,
}

#[derive(Debug, Clone)]
pub struct TrainedRow {
    pub num_examples: u64,
    pub metrics: String,
    pub bytes: Vec<u8>,
    pub uploaded: bool,
}

impl EdgeStore {
    pub fn open(path: &Path) -> Result<EdgeStore> {
        Ok(EdgeStore { conn: Mutex::new(open(path, EDGE_SCHEMA)?) })
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn trained(&self, job: &str, round: u32) -> Result<Option<TrainedRow>> {
        Ok(self
            .conn()
            .query_row(
                "SELECT num_examples, metrics, bytes, uploaded FROM trained WHERE job = ?1 AND round = ?2",
                params![job, round],
                |r| {
                    Ok(TrainedRow {
                        num_examples: r.get::<_, i64>(0)? as u64,
                        metrics: r.get(1)?,
                        bytes: r.get(2)?,
                        uploaded: r.get(3)?,
                    })
                },
            )
            .optional()?)
    }

    pub fn save_trained(&self, job: &str, round: u32, num_examples: u64, metrics: &str, bytes: &[u8]) -> Result<()> {
        self.conn().execute(
            "INSERT OR REPLACE INTO trained (job, round, num_examples, metrics, bytes) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![job, round, num_examples as i64, metrics, bytes],
        )?;
        Ok(())
    }

    pub fn mark_uploaded(&self, job: &str, round: u32) -> Result<()> {
        self.conn().execute("UPDATE trained SET uploaded = 1 WHERE job = ?1 AND round = ?2", params![job, round])?;
        Ok(())
    }

    /// Queues a hard example (committed before this returns); its id travels with it, so the
    /// cloud keeps it once however often it is sent.
    pub fn enqueue(&self, service: &str, input: &[u8], queued_ms: i64) -> Result<i64> {
        let conn = self.conn();
        conn.execute(
            "INSERT INTO outbox (service, input, queued_ms) VALUES (?1, ?2, ?3)",
            params![service, input, queued_ms],
        )?;
        Ok(conn.last_insert_rowid())
    }

    /// The oldest undelivered hard examples.
    pub fn outbox(&self, limit: usize) -> Result<Vec<OutboxRow>> {
        let conn = self.conn();
        let mut stmt = conn.prepare("SELECT id, service, input, queued_ms FROM outbox ORDER BY id LIMIT ?1")?;
        let rows = stmt
            .query_map(params![limit as i64], |r| {
                Ok(OutboxRow { id: r.get(0)?, service: r.get(1)?, input: r.get(2)?, queued_ms: r.get(3)? })
            })?
            .collect::<std::result::Result<Vec<_>, _>>()?;
        Ok(rows)
    }

    pub fn outbox_len(&self) -> Result<u64> {
        Ok(self.conn().query_row("SELECT COUNT(*) FROM outbox", [], |r| r.get::<_, i64>(0))? as u64)
    }

    /// The cloud acknowledged it.
    pub fn delivered(&self, id: i64) -> Result<()> {
        self.conn().execute("DELETE FROM outbox WHERE id = ?1", params![id])?;
        Ok(())
    }

    pub fn replay_state(&self) -> Result<ReplayState> {
        let (_, offered, layout) = self.replay_summary()?;
        let conn = self.conn();
        let mut stmt = conn.prepare("SELECT id, label FROM replay_samples ORDER BY id")?;
        let held = stmt
            .query_map([], |r| Ok((r.get::<_, i64>(0)? as u64, r.get(1)?)))?
            .collect::<std::result::Result<Vec<_>, _>>()?;
        Ok(ReplayState { held, offered, layout })
    }

    /// How many samples the buffer holds, how many were offered, and their layout (without
    /// reading the held ids: what a batch of offers needs).
    pub fn replay_summary(&self) -> Result<(u64, u64, Option<String>)> {
        let conn = self.conn();
        let meta = |key: &str| -> Result<Option<String>> {
            Ok(conn.query_row("SELECT value FROM replay_meta WHERE key = ?1", params![key], |r| r.get(0)).optional()?)
        };
        let offered = meta("offered")?.and_then(|v| v.parse().ok()).unwrap_or(0);
        let held = conn.query_row("SELECT COUNT(*) FROM replay_samples", [], |r| r.get::<_, i64>(0))? as u64;
        Ok((held, offered, meta("layout")?))
    }

    /// Records a batch of offers in one transaction: kept samples (bytes and all) in, evicted
    /// ones out, the offered count and the layout. All or nothing.
    pub fn record_offers(&self, offers: &[ReplayOffer], offered: u64, layout: &str, batch: &OfferBatch) -> Result<()> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        for o in offers {
            if batch.keep_new {
                tx.execute(
                    "INSERT INTO new_samples (id, label, bytes) VALUES (?1, ?2, ?3)",
                    params![o.id as i64, o.label, o.bytes],
                )?;
            }
            if let Some(evict) = o.keep {
                if let Some(e) = evict {
                    tx.execute("DELETE FROM replay_samples WHERE id = ?1", params![e as i64])?;
                }
                tx.execute(
                    "INSERT INTO replay_samples (id, label, bytes) VALUES (?1, ?2, ?3)",
                    params![o.id as i64, o.label, o.bytes],
                )?;
            }
        }
        tx.execute(
            "INSERT OR REPLACE INTO replay_meta (key, value) VALUES ('offered', ?1)",
            params![offered.to_string()],
        )?;
        tx.execute("INSERT OR REPLACE INTO replay_meta (key, value) VALUES ('layout', ?1)", params![layout])?;
        if let Some((digest, name)) = batch.source {
            // Not OR REPLACE: the same content arriving twice at once fails the second batch,
            // whose next attempt finds the first one's record.
            tx.execute(
                "INSERT INTO inbox_files (digest, name, ingested_ms) VALUES (?1, ?2, ?3)",
                params![digest, name, now_ms()],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Whether an inbox file with this content was taken in already.
    pub fn inbox_ingested(&self, digest: &str) -> Result<bool> {
        Ok(self
            .conn()
            .query_row("SELECT 1 FROM inbox_files WHERE digest = ?1", params![digest], |_| Ok(()))
            .optional()?
            .is_some())
    }

    /// How many samples arrived since the last round.
    pub fn new_samples_count(&self) -> Result<u64> {
        Ok(self.conn().query_row("SELECT COUNT(*) FROM new_samples", [], |r| r.get::<_, i64>(0))? as u64)
    }

    /// The samples that arrived since the last round, by id: (id, label, bytes).
    pub fn new_samples(&self) -> Result<Vec<(u64, i64, Vec<u8>)>> {
        let conn = self.conn();
        let mut stmt = conn.prepare("SELECT id, label, bytes FROM new_samples ORDER BY id")?;
        let rows = stmt
            .query_map([], |r| Ok((r.get::<_, i64>(0)? as u64, r.get(1)?, r.get(2)?)))?
            .collect::<std::result::Result<Vec<_>, _>>()?;
        Ok(rows)
    }

    /// Records a model version (`row.version`, refused if it exists) with its ONNX bytes and, in
    /// the same transaction, forgets the new samples it was trained on (ids up to `trained_up_to`).
    pub fn record_version(&self, row: &VersionRow, onnx: &[u8], trained_up_to: Option<u64>) -> Result<()> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        tx.execute(
            "INSERT INTO model_versions (version, service, created_ms, parent, trigger, new_samples, replayed, metrics, \
             decision, reason, onnx) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
            params![
                row.version,
                row.service,
                row.created_ms,
                row.parent,
                row.trigger,
                row.new_samples as i64,
                row.replayed as i64,
                row.metrics.to_string(),
                row.decision,
                row.reason,
                onnx
            ],
        )?;
        if let Some(last) = trained_up_to {
            tx.execute("DELETE FROM new_samples WHERE id <= ?1", params![last as i64])?;
        }
        tx.commit()?;
        Ok(())
    }

    /// The number the next version gets.
    pub fn next_version(&self) -> Result<u32> {
        Ok(self.conn().query_row("SELECT COALESCE(MAX(version) + 1, 0) FROM model_versions", [], |r| r.get(0))?)
    }

    /// Every model version, oldest first (without the model bytes).
    pub fn versions(&self) -> Result<Vec<VersionRow>> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT version, service, created_ms, parent, trigger, new_samples, replayed, metrics, decision, reason \
             FROM model_versions ORDER BY version",
        )?;
        let rows = stmt
            .query_map([], |r| {
                let metrics: String = r.get(7)?;
                Ok(VersionRow {
                    version: r.get(0)?,
                    service: r.get(1)?,
                    created_ms: r.get(2)?,
                    parent: r.get(3)?,
                    trigger: r.get(4)?,
                    new_samples: r.get::<_, i64>(5)? as u64,
                    replayed: r.get::<_, i64>(6)? as u64,
                    metrics: serde_json::from_str(&metrics).unwrap_or(serde_json::Value::Null),
                    decision: r.get(8)?,
                    reason: r.get(9)?,
                })
            })?
            .collect::<std::result::Result<Vec<_>, _>>()?;
        Ok(rows)
    }

    /// The version that serves: the newest initial or deployed one, with its ONNX bytes.
    pub fn serving_version(&self) -> Result<Option<(u32, Vec<u8>)>> {
        Ok(self
            .conn()
            .query_row(
                "SELECT version, onnx FROM model_versions WHERE decision IN ('initial', 'deployed') \
                 ORDER BY version DESC LIMIT 1",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?)
    }

    /// The label and bytes of held samples, in the order of `ids` (ids not held are skipped).
    pub fn replay_samples(&self, ids: &[u64]) -> Result<Vec<(u64, i64, Vec<u8>)>> {
        let conn = self.conn();
        let mut stmt = conn.prepare("SELECT label, bytes FROM replay_samples WHERE id = ?1")?;
        let mut out = Vec::with_capacity(ids.len());
        for &id in ids {
            if let Some((label, bytes)) =
                stmt.query_row(params![id as i64], |r| Ok((r.get(0)?, r.get(1)?))).optional()?
            {
                out.push((id, label, bytes));
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_state_from_before_hot_swap_gains_the_pending_spec_column() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("cloud.db");
        let old = Connection::open(&path).expect("open");
        old.execute_batch(
            "CREATE TABLE jobs (name TEXT PRIMARY KEY, spec TEXT NOT NULL, status TEXT NOT NULL, reason TEXT,
             next_round INTEGER NOT NULL, created_ms INTEGER NOT NULL, finished_ms INTEGER);
             INSERT INTO jobs VALUES ('j', '{}', 'running', NULL, 1, 0, NULL);",
        )
        .expect("old schema");
        drop(old);
        let store = CloudStore::open(&path).expect("migrated");
        store.set_pending_spec("j", "{\"new\":1}").expect("pending");
        assert_eq!(store.job("j").expect("row").expect("job").pending_spec.as_deref(), Some("{\"new\":1}"));
        assert_eq!(store.promote_pending_spec("j").expect("promote").as_deref(), Some("{\"new\":1}"));
        let row = store.job("j").expect("row").expect("job");
        assert_eq!((row.spec.as_str(), row.pending_spec), ("{\"new\":1}", None));
        drop(store);
        CloudStore::open(&path).expect("a second open changes nothing");
    }
}
