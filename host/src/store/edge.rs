//! An edge's state: its trained updates (stored before they are uploaded), the outbox of hard
//! examples, the replay buffer's samples, and the incremental-learning job's new samples and
//! model versions.
use std::path::Path;
use std::sync::{Mutex, MutexGuard};

use rusqlite::{params, Connection, OptionalExtension};

use super::{now_ms, open, Result};
use crate::protocol::VersionRow;

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
CREATE TABLE IF NOT EXISTS sample_requests (
    key TEXT PRIMARY KEY, body_sha256 TEXT NOT NULL, report TEXT NOT NULL, at_ms INTEGER NOT NULL);
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
    /// The request's idempotency key, its body's digest and what the batch did (JSON), answered
    /// again to a retry with the key.
    pub request: Option<(&'a str, &'a str, &'a str)>,
}

/// How many idempotency keys of sample requests an edge remembers (the newest): a retry must
/// come before this many other keyed batches.
pub const KEPT_REQUEST_KEYS: i64 = 100_000;

/// Keeps the newest `keep` idempotency keys (rowids grow with each insert: the oldest go first).
fn forget_old_request_keys(conn: &Connection, keep: i64) -> Result<()> {
    conn.execute("DELETE FROM sample_requests WHERE rowid <= (SELECT MAX(rowid) FROM sample_requests) - ?1", [keep])?;
    Ok(())
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

    /// Records that the cloud kept the update of `round`, and forgets its bytes: the cloud never
    /// asks for a round it holds again, and keeping them made an edge's state grow by a model
    /// per round for as long as a job ran. The row stays, so the round is not trained again.
    pub fn mark_uploaded(&self, job: &str, round: u32) -> Result<()> {
        self.conn().execute(
            "UPDATE trained SET uploaded = 1, bytes = x'' WHERE job = ?1 AND round = ?2",
            params![job, round],
        )?;
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
        if let Some((key, body_sha256, report)) = batch.request {
            tx.execute(
                "INSERT INTO sample_requests (key, body_sha256, report, at_ms) VALUES (?1, ?2, ?3, ?4)",
                params![key, body_sha256, report, now_ms()],
            )?;
            forget_old_request_keys(&tx, KEPT_REQUEST_KEYS)?;
        }
        tx.commit()?;
        Ok(())
    }

    /// The body digest and report (JSON) of the sample batch taken in under idempotency key
    /// `key`, if one was.
    pub fn sample_request(&self, key: &str) -> Result<Option<(String, String)>> {
        Ok(self
            .conn()
            .query_row("SELECT body_sha256, report FROM sample_requests WHERE key = ?1", [key], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .optional()?)
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
    fn an_uploaded_update_is_not_kept_so_a_long_job_does_not_grow_the_state() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("edge.db");
        let store = EdgeStore::open(&path).expect("open");
        let update = vec![7u8; 64 << 10];
        for round in 1..=200 {
            store.save_trained("job", round, 10, "{}", &update).expect("save");
            let kept = store.trained("job", round).expect("read").expect("the row");
            assert_eq!((kept.bytes.len(), kept.uploaded), (update.len(), false), "kept until the cloud has it");
            store.mark_uploaded("job", round).expect("mark");
            let done = store.trained("job", round).expect("read").expect("the row");
            assert!(done.uploaded && done.bytes.is_empty(), "round {round}: {} bytes still kept", done.bytes.len());
        }
        // 200 rounds of 64 KiB would be 12.5 MiB; freed pages are reused.
        let size = std::fs::metadata(&path).expect("size").len();
        assert!(size < 1 << 20, "the state grew to {size} bytes");
    }

    #[test]
    fn a_batchs_idempotency_key_is_kept_with_it_and_only_the_newest_keys_are() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = EdgeStore::open(&dir.path().join("edge.db")).expect("open");
        let offer = ReplayOffer { id: 1, label: 0, bytes: &[1, 2], keep: Some(None) };
        for k in 1..=5 {
            let (key, report) = (format!("key-{k}"), format!("{{\"n\":{k}}}"));
            let batch = OfferBatch { keep_new: false, source: None, request: Some((&key, "sha256:b", &report)) };
            let offers = [ReplayOffer { id: k, ..offer }];
            store.record_offers(&offers, k, "u8[2]", &batch).expect("record");
        }
        assert_eq!(store.sample_request("key-3").expect("read"), Some(("sha256:b".into(), "{\"n\":3}".into())));
        // A key is recorded with its batch or not at all: the second batch under it fails whole.
        let batch = OfferBatch { keep_new: false, source: None, request: Some(("key-3", "sha256:c", "{}")) };
        assert!(store.record_offers(&[ReplayOffer { id: 6, ..offer }], 6, "u8[2]", &batch).is_err());
        assert_eq!(store.replay_state().expect("state").offered, 5);

        forget_old_request_keys(&store.conn(), 2).expect("forget");
        let kept: Vec<bool> =
            (1..=5).map(|k| store.sample_request(&format!("key-{k}")).expect("read").is_some()).collect();
        assert_eq!(kept, [false, false, false, true, true]);
    }
}
