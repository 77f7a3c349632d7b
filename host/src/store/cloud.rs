//! The cloud's state: SQLite for everything but the updates' tensors, which are files next to
//! it (written and fsynced before their row commits), as SQLite advises for large blobs.
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use rusqlite::{params, Connection, OptionalExtension};

use super::{now_ms, open, Result, StoreError};
use crate::protocol::SwapRow;

const CLOUD_SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS nodes (name TEXT PRIMARY KEY, token_sha256 TEXT NOT NULL UNIQUE);
CREATE TABLE IF NOT EXISTS components (digest TEXT PRIMARY KEY, bytes BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS initial_weights (digest TEXT PRIMARY KEY, bytes BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS jobs (
    name TEXT PRIMARY KEY, spec TEXT NOT NULL, status TEXT NOT NULL, reason TEXT,
    next_round INTEGER NOT NULL, created_ms INTEGER NOT NULL, finished_ms INTEGER, pending_spec TEXT);
CREATE TABLE IF NOT EXISTS swaps (
    job TEXT NOT NULL, round INTEGER NOT NULL, slot TEXT NOT NULL, from_plugin TEXT NOT NULL,
    to_plugin TEXT NOT NULL, error TEXT, at_ms INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS models (job TEXT NOT NULL, version INTEGER NOT NULL, bytes BLOB NOT NULL, PRIMARY KEY (job, version));
CREATE TABLE IF NOT EXISTS strategy_states (
    job TEXT NOT NULL, version INTEGER NOT NULL, aggregator TEXT NOT NULL, bytes BLOB NOT NULL,
    PRIMARY KEY (job, version));
CREATE TABLE IF NOT EXISTS rounds (
    job TEXT NOT NULL, round INTEGER NOT NULL, selected TEXT NOT NULL, opened_ms INTEGER NOT NULL,
    deadline_ms INTEGER NOT NULL, closed_ms INTEGER, summary TEXT, population INTEGER, PRIMARY KEY (job, round));
CREATE TABLE IF NOT EXISTS updates (
    job TEXT NOT NULL, round INTEGER NOT NULL, node TEXT NOT NULL, num_examples INTEGER NOT NULL,
    metrics TEXT NOT NULL, file TEXT NOT NULL, received_ms INTEGER NOT NULL, PRIMARY KEY (job, round, node));
CREATE TABLE IF NOT EXISTS failures (
    job TEXT NOT NULL, round INTEGER NOT NULL, node TEXT NOT NULL, reason TEXT NOT NULL,
    at_ms INTEGER NOT NULL, PRIMARY KEY (job, round, node));
CREATE TABLE IF NOT EXISTS relayed (
    job TEXT NOT NULL, round INTEGER NOT NULL, deadline_ms INTEGER NOT NULL, outcome TEXT,
    PRIMARY KEY (job, round));
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
    /// Model versions kept per job (the newest); all without it.
    pub(super) keep_versions: Option<u32>,
}

impl CloudStore {
    pub fn open(path: &Path) -> Result<CloudStore> {
        let updates_dir = path.with_extension("updates");
        let incoming = updates_dir.join("incoming");
        // Uploads that were arriving when the process ended were never accepted.
        let _ = std::fs::remove_dir_all(&incoming);
        std::fs::create_dir_all(&incoming).map_err(|e| StoreError::Files { path: incoming.clone(), error: e })?;
        let conn = open(path, CLOUD_SCHEMA)?;
        // Columns added since the first states were written: a state without them gains them.
        let add_column = |table: &str, column: &str, decl: &str| -> Result<()> {
            let opened = |error| StoreError::Open { path: path.display().to_string(), error };
            let has: bool = conn
                .query_row(
                    "SELECT COUNT(*) > 0 FROM pragma_table_info(?1) WHERE name = ?2",
                    params![table, column],
                    |r| r.get(0),
                )
                .map_err(opened)?;
            if !has {
                conn.execute_batch(&format!("ALTER TABLE {table} ADD COLUMN {column} {decl}")).map_err(opened)?;
            }
            Ok(())
        };
        add_column("jobs", "pending_spec", "TEXT")?;
        add_column("rounds", "population", "INTEGER")?;
        // A closed round's upload bytes, so a job's total is a sum over a column rather than over
        // every summary's JSON (NULL in rounds closed before it existed: taken from the summary).
        add_column("rounds", "bytes_up", "INTEGER")?;
        Ok(CloudStore { conn: Mutex::new(conn), updates_dir, keep_versions: None })
    }

    /// Keeps only the newest `versions` model versions of each job (and the newest aggregator
    /// state), dropping older ones as rounds close; None keeps every version.
    pub fn keeping_model_versions(self, versions: Option<u32>) -> CloudStore {
        CloudStore { keep_versions: versions.map(|n| n.max(1)), ..self }
    }

    pub fn kept_model_versions(&self) -> Option<u32> {
        self.keep_versions
    }

    pub(super) fn conn(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock leaves SQLite consistent (transactions roll back).
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn set_node_token(&self, node: &str, token_sha256: &str) -> Result<()> {
        self.set_node_tokens(&[(node.to_string(), token_sha256.to_string())])
    }

    /// Tokens for many nodes in one transaction (bulk enrolment): all or none.
    pub fn set_node_tokens(&self, tokens: &[(String, String)]) -> Result<()> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        {
            let mut stmt = tx.prepare(
                "INSERT INTO nodes (name, token_sha256) VALUES (?1, ?2)
                 ON CONFLICT(name) DO UPDATE SET token_sha256 = excluded.token_sha256",
            )?;
            for (node, sha) in tokens {
                stmt.execute(params![node, sha])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Every (token hash, node).
    pub fn node_tokens(&self) -> Result<Vec<(String, String)>> {
        let conn = self.conn();
        let mut stmt = conn.prepare("SELECT token_sha256, name FROM nodes")?;
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
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

    /// Keeps the initial weights of an external model (safetensors), by content digest.
    pub fn put_initial_weights(&self, digest: &str, bytes: &[u8]) -> Result<()> {
        self.conn()
            .execute("INSERT OR IGNORE INTO initial_weights (digest, bytes) VALUES (?1, ?2)", params![digest, bytes])?;
        Ok(())
    }

    pub fn initial_weights(&self, digest: &str) -> Result<Option<Vec<u8>>> {
        Ok(self
            .conn()
            .query_row("SELECT bytes FROM initial_weights WHERE digest = ?1", [digest], |r| r.get(0))
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
        let files = |error| StoreError::Files { path: self.updates_dir.clone(), error };
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
            .map_err(|e| StoreError::Files { path: self.updates_dir.clone(), error: e })?;
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

    /// The strategy state round `round` begins from: the one the latest earlier round that folded
    /// updates committed, if `aggregator` left it (a swapped-in aggregator starts from nothing).
    pub fn strategy_state(&self, job: &str, round: u32, aggregator: &str) -> Result<Option<Vec<u8>>> {
        let latest: Option<(String, Vec<u8>)> = self
            .conn()
            .query_row(
                "SELECT aggregator, bytes FROM strategy_states WHERE job = ?1 AND version < ?2
                 ORDER BY version DESC LIMIT 1",
                params![job, round],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        Ok(latest.filter(|(by, _)| by == aggregator).map(|(_, bytes)| bytes))
    }

    /// Each node's training loss in its newest update of `job` among the rounds `since..`.
    pub fn last_losses(&self, job: &str, since: u32) -> Result<HashMap<String, f64>> {
        let conn = self.conn();
        let mut stmt =
            conn.prepare("SELECT node, metrics FROM updates WHERE job = ?1 AND round >= ?2 ORDER BY round")?;
        let rows = stmt.query_map(params![job, since], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?;
        let mut losses = HashMap::new();
        for row in rows {
            let (node, metrics) = row?;
            if let Ok(m) = serde_json::from_str::<crate::protocol::UpdateMetrics>(&metrics) {
                if m.train_loss.is_finite() {
                    losses.insert(node, m.train_loss);
                }
            }
        }
        Ok(losses)
    }

    /// (node, examples, metrics JSON) of a round's updates, without their tensors.
    pub fn update_metrics(&self, job: &str, round: u32) -> Result<Vec<(String, u64, String)>> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare("SELECT node, num_examples, metrics FROM updates WHERE job = ?1 AND round = ?2 ORDER BY node")?;
        let rows = stmt.query_map(params![job, round], |r| Ok((r.get(0)?, r.get::<_, i64>(1)? as u64, r.get(2)?)))?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
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
