//! A job's rounds in the cloud's state: opening and closing them (the round's model, aggregator
//! state and summary in one transaction, older models dropped under `keep_model_versions`), and
//! reading them back, the history in pages.
use rusqlite::{params, OptionalExtension};

use super::cloud::CloudStore;
use super::{now_ms, Result};

#[derive(Debug, Clone)]
pub struct RoundRow {
    pub round: u32,
    pub selected: Vec<String>,
    pub opened_ms: i64,
    pub deadline_ms: i64,
    pub closed_ms: Option<i64>,
    pub summary: Option<String>,
    /// Nodes online when the round opened (the selection's population): the sampling rate of
    /// the privacy accountant is selected / population.
    pub population: Option<u32>,
}

/// Closed rounds' (round, summary JSON).
pub type Summaries = Vec<(u32, String)>;

impl CloudStore {
    pub fn open_round(
        &self,
        job: &str,
        round: u32,
        selected: &[String],
        deadline_ms: i64,
        population: usize,
    ) -> Result<()> {
        let selected = serde_json::to_string(selected).expect("strings serialize");
        self.conn().execute(
            "INSERT OR IGNORE INTO rounds (job, round, selected, opened_ms, deadline_ms, population)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![job, round, selected, now_ms(), deadline_ms, population as i64],
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
            population: r.get(6)?,
        })
    }

    pub fn round(&self, job: &str, round: u32) -> Result<Option<RoundRow>> {
        Ok(self
            .conn()
            .query_row(
                "SELECT round, selected, opened_ms, deadline_ms, closed_ms, summary, population FROM rounds WHERE job = ?1 AND round = ?2",
                params![job, round],
                Self::round_row,
            )
            .optional()?)
    }

    pub fn rounds(&self, job: &str) -> Result<Vec<RoundRow>> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT round, selected, opened_ms, deadline_ms, closed_ms, summary, population FROM rounds WHERE job = ?1 ORDER BY round",
        )?;
        let rows = stmt.query_map([job], Self::round_row)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// The round of `job` not closed yet, if any.
    pub fn unclosed_round(&self, job: &str) -> Result<Option<RoundRow>> {
        Ok(self
            .conn()
            .query_row(
                "SELECT round, selected, opened_ms, deadline_ms, closed_ms, summary, population FROM rounds
                 WHERE job = ?1 AND closed_ms IS NULL ORDER BY round DESC LIMIT 1",
                [job],
                Self::round_row,
            )
            .optional()?)
    }

    /// Summaries (JSON) of at most `limit` closed rounds of `job` from round `from` on, oldest
    /// first; without `from`, the newest `limit`. Also: the first closed round after the page,
    /// if there is one.
    pub fn summaries(&self, job: &str, from: Option<u32>, limit: u32) -> Result<(Summaries, Option<u32>)> {
        let conn = self.conn();
        let mut rows: Summaries = match from {
            Some(from) => {
                let mut stmt = conn.prepare(
                    "SELECT round, summary FROM rounds WHERE job = ?1 AND round >= ?2 AND summary IS NOT NULL
                     ORDER BY round LIMIT ?3",
                )?;
                let rows = stmt.query_map(params![job, from, limit + 1], |r| Ok((r.get(0)?, r.get(1)?)))?;
                rows.collect::<rusqlite::Result<_>>()?
            }
            None => {
                let mut stmt = conn.prepare(
                    "SELECT round, summary FROM rounds WHERE job = ?1 AND summary IS NOT NULL
                     ORDER BY round DESC LIMIT ?2",
                )?;
                let rows = stmt.query_map(params![job, limit], |r| Ok((r.get(0)?, r.get(1)?)))?;
                let mut rows: Summaries = rows.collect::<rusqlite::Result<_>>()?;
                rows.reverse();
                rows
            }
        };
        let next = match rows.len() > limit as usize {
            true => rows.pop().map(|(round, _)| round),
            false => None,
        };
        Ok((rows, next))
    }

    /// Upload bytes over every closed round of `job`.
    pub fn bytes_up_total(&self, job: &str) -> Result<u64> {
        let total: i64 = self.conn().query_row(
            "SELECT COALESCE(SUM(COALESCE(bytes_up, json_extract(summary, '$.bytes_up'))), 0) FROM rounds
             WHERE job = ?1 AND summary IS NOT NULL",
            [job],
            |r| r.get(0),
        )?;
        Ok(total.max(0) as u64)
    }

    /// Commits round `round`'s model as version `round`, closes the round and moves the job on,
    /// in one transaction.
    /// `state`: the aggregator's strategy state after the round and which aggregator left it;
    /// None when the round folded nothing (the state stays as the round before left it).
    pub fn close_round(
        &self,
        job: &str,
        round: u32,
        model: &[u8],
        summary: &str,
        state: Option<(&str, &[u8])>,
    ) -> Result<()> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        tx.execute(
            "INSERT OR REPLACE INTO models (job, version, bytes) VALUES (?1, ?2, ?3)",
            params![job, round, model],
        )?;
        if let Some((aggregator, bytes)) = state {
            tx.execute(
                "INSERT OR REPLACE INTO strategy_states (job, version, aggregator, bytes) VALUES (?1, ?2, ?3, ?4)",
                params![job, round, aggregator, bytes],
            )?;
        }
        tx.execute(
            "UPDATE rounds SET closed_ms = ?3, summary = ?4, bytes_up = json_extract(?4, '$.bytes_up')
             WHERE job = ?1 AND round = ?2",
            params![job, round, now_ms(), summary],
        )?;
        tx.execute("UPDATE jobs SET next_round = ?2 WHERE name = ?1", params![job, round + 1])?;
        if let Some(keep) = self.keep_versions {
            // A round starts from the newest model and aggregator state: nothing older is read.
            tx.execute("DELETE FROM models WHERE job = ?1 AND version + ?2 <= ?3", params![job, keep, round])?;
            tx.execute(
                "DELETE FROM strategy_states WHERE job = ?1
                 AND version < (SELECT MAX(version) FROM strategy_states WHERE job = ?1)",
                [job],
            )?;
        }
        tx.commit()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use rusqlite::Connection;

    use super::*;

    #[test]
    fn a_long_jobs_history_comes_in_pages_and_its_upload_total_spans_every_round() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("cloud.db");
        let summary = |round: u32| format!("{{\"round\":{round},\"bytes_up\":{}}}", round * 10);
        // Rounds 1-4 closed by a cloud from before the `bytes_up` column.
        let old = Connection::open(&path).expect("open");
        old.execute_batch(
            "CREATE TABLE rounds (job TEXT NOT NULL, round INTEGER NOT NULL, selected TEXT NOT NULL,
             opened_ms INTEGER NOT NULL, deadline_ms INTEGER NOT NULL, closed_ms INTEGER, summary TEXT,
             PRIMARY KEY (job, round));",
        )
        .expect("old schema");
        for round in 1..=4 {
            old.execute("INSERT INTO rounds VALUES ('j', ?1, '[]', 0, 0, 1, ?2)", params![round, summary(round)])
                .expect("old round");
        }
        drop(old);
        let store = CloudStore::open(&path).expect("migrated");
        store.insert_job("j", "{}", b"v0").expect("job");
        for round in 5..=7 {
            store.open_round("j", round, &["a".to_string()], 0, 1).expect("open");
            store.close_round("j", round, b"m", &summary(round), None).expect("close");
        }
        store.open_round("j", 8, &["a".to_string()], 0, 1).expect("open");
        let rounds = |page: &[(u32, String)]| page.iter().map(|(r, _)| *r).collect::<Vec<_>>();

        let (page, next) = store.summaries("j", None, 3).expect("newest");
        assert_eq!((rounds(&page), next), (vec![5, 6, 7], None), "the newest page, oldest first");
        let (page, next) = store.summaries("j", Some(1), 3).expect("first");
        assert_eq!((rounds(&page), next), (vec![1, 2, 3], Some(4)));
        let (page, next) = store.summaries("j", Some(4), 3).expect("second");
        assert_eq!((rounds(&page), next), (vec![4, 5, 6], Some(7)));
        let (page, next) = store.summaries("j", Some(7), 3).expect("last");
        assert_eq!((rounds(&page), next), (vec![7], None), "the open round 8 is on no page");
        assert_eq!(store.summaries("j", Some(9), 3).expect("past the end"), (vec![], None));
        assert_eq!(store.unclosed_round("j").expect("open").map(|r| r.round), Some(8));
        assert_eq!(
            store.bytes_up_total("j").expect("total"),
            280,
            "old rounds from their summaries, new from the column"
        );
        let column: Option<i64> =
            store.conn().query_row("SELECT bytes_up FROM rounds WHERE round = 6", [], |r| r.get(0)).expect("column");
        assert_eq!(column, Some(60));
    }

    #[test]
    fn with_a_retention_only_the_newest_model_versions_and_aggregator_state_stay() {
        let dir = tempfile::tempdir().expect("tmp");
        let store = CloudStore::open(&dir.path().join("cloud.db")).expect("open").keeping_model_versions(Some(2));
        store.insert_job("j", "{}", b"v0").expect("job");
        store.insert_job("other", "{}", b"w0").expect("job");
        for round in 1..=6u32 {
            store.open_round("j", round, &["a".to_string()], 0, 1).expect("open");
            // Round 5 folds nothing: it leaves no aggregator state.
            let state = (round != 5).then_some(("fedadam", &b"moments"[..]));
            store.close_round("j", round, format!("v{round}").as_bytes(), "{}", state).expect("close");
        }
        let versions: Vec<u32> = (0..=6).filter(|&v| store.model("j", v).expect("read").is_some()).collect();
        assert_eq!(versions, [5, 6]);
        assert_eq!(store.model("other", 0).expect("read").as_deref(), Some(&b"w0"[..]), "other jobs keep theirs");
        assert_eq!(store.strategy_state("j", 7, "fedadam").expect("state").as_deref(), Some(&b"moments"[..]));
        let states: i64 =
            store.conn().query_row("SELECT COUNT(*) FROM strategy_states", [], |r| r.get(0)).expect("count");
        assert_eq!(states, 1, "only the newest aggregator state");
    }
}
