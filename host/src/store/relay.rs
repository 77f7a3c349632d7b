//! A regional aggregator's record of the upper cloud's rounds it runs (`relayed`): each one's
//! deadline, and what became of its result once the local round closed. A row commits in the
//! same transaction as the job's spec and the upper global model the round starts from, so a
//! restarted region knows exactly which rounds it owes the upper cloud.
use rusqlite::{params, OptionalExtension};

use super::cloud::CloudStore;
use super::{now_ms, Result};

/// What [`CloudStore::relay_round`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Relayed {
    /// The round is recorded (`started`: the local job was created by it, so its loop must start).
    Taken { started: bool },
    /// The job exists here but is not the region's copy of an upper job, or it ended here.
    Conflict(String),
}

fn relayed_exists(conn: &rusqlite::Connection, job: &str) -> rusqlite::Result<bool> {
    conn.query_row("SELECT EXISTS(SELECT 1 FROM relayed WHERE job = ?1)", [job], |r| r.get(0))
}

impl CloudStore {
    /// Records upper round `round` of `job` for this region, in one transaction: the job's spec
    /// (creating the job, or as its pending spec when it changed), the upper global model as
    /// version `round - 1` (the region's own result for that round went up already or is
    /// superseded: the upper cloud moved on), the round's deadline, and every earlier round
    /// not sent yet marked superseded.
    pub fn relay_round(
        &self,
        job: &str,
        spec_json: &str,
        round: u32,
        model: &[u8],
        deadline_ms: i64,
    ) -> Result<Relayed> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let row: Option<(String, String)> = tx
            .query_row("SELECT status, spec FROM jobs WHERE name = ?1", [job], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()?;
        let relayed = relayed_exists(&tx, job)?;
        let started = match row {
            None => {
                tx.execute(
                    "INSERT INTO jobs (name, spec, status, next_round, created_ms) VALUES (?1, ?2, 'running', ?3, ?4)",
                    params![job, spec_json, round, now_ms()],
                )?;
                true
            }
            Some(_) if !relayed => {
                return Ok(Relayed::Conflict(format!("this region runs a job named `{job}` of its own")));
            }
            Some((status, _)) if status != "running" => {
                return Ok(Relayed::Conflict(format!("the region's copy of job `{job}` is {status}")));
            }
            Some((_, spec)) => {
                let pending = (spec != spec_json).then_some(spec_json);
                tx.execute(
                    "UPDATE jobs SET next_round = MAX(next_round, ?2), pending_spec = COALESCE(?3, pending_spec) WHERE name = ?1",
                    params![job, round, pending],
                )?;
                false
            }
        };
        tx.execute(
            "INSERT OR REPLACE INTO models (job, version, bytes) VALUES (?1, ?2, ?3)",
            params![job, round - 1, model],
        )?;
        tx.execute(
            "UPDATE relayed SET outcome = 'superseded' WHERE job = ?1 AND round < ?2 AND outcome IS NULL",
            params![job, round],
        )?;
        tx.execute(
            "INSERT OR IGNORE INTO relayed (job, round, deadline_ms) VALUES (?1, ?2, ?3)",
            params![job, round, deadline_ms],
        )?;
        tx.commit()?;
        Ok(Relayed::Taken { started })
    }

    /// Whether `job` is a region's copy of an upper job.
    pub fn is_relayed_job(&self, job: &str) -> Result<bool> {
        Ok(relayed_exists(&self.conn(), job)?)
    }

    /// The deadline of relayed round `round` of `job`, if the upper cloud gave it to this region.
    pub fn relayed_deadline(&self, job: &str, round: u32) -> Result<Option<i64>> {
        Ok(self
            .conn()
            .query_row("SELECT deadline_ms FROM relayed WHERE job = ?1 AND round = ?2", params![job, round], |r| {
                r.get(0)
            })
            .optional()?)
    }

    /// Relayed rounds whose outcome is not settled yet (their result not sent), oldest first.
    pub fn unsent_relayed(&self) -> Result<Vec<(String, u32)>> {
        let conn = self.conn();
        let mut stmt = conn.prepare("SELECT job, round FROM relayed WHERE outcome IS NULL ORDER BY job, round")?;
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Settles a relayed round: `outcome` says what became of its result ("sent", "late", ...).
    pub fn settle_relayed(&self, job: &str, round: u32, outcome: &str) -> Result<()> {
        self.conn()
            .execute("UPDATE relayed SET outcome = ?3 WHERE job = ?1 AND round = ?2", params![job, round, outcome])?;
        Ok(())
    }
}
