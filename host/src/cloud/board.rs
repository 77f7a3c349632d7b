//! What the poll path needs, in memory: each running job's spec and open round (who was
//! selected, who has answered). SQLite stays the durable record: the job loop mirrors each job
//! here after every change it commits, and an accepted upload or failure report marks its node
//! at once. A poll, a round-state check or an upload's admission then costs the same with 10
//! nodes and 10,000 and takes no SQLite lock; long polls wait on [`Board::changes`].
use std::collections::HashSet;
use std::sync::{Arc, RwLock};

use crate::config::job::JobSpec;
use crate::store::RoundRow;

/// A running job as the poll path sees it.
struct RunningJob {
    name: String,
    /// Jobs are offered in the order they were created (as the store lists them).
    created_ms: i64,
    spec: Arc<JobSpec>,
    round: Option<OpenRound>,
}

struct OpenRound {
    round: u32,
    deadline_ms: i64,
    selected: HashSet<String>,
    /// Nodes whose update or failure report is in.
    answered: HashSet<String>,
}

/// Where a node stands in a job's round, as far as the board knows.
pub(super) enum Standing {
    /// The round is open, the node was selected and has not answered yet.
    Awaited(Arc<JobSpec>),
    /// Anything else (answered, not selected, another round, a job that is not running): the
    /// caller looks in the store for the details.
    Other,
}

/// A task the board found for a node.
pub(super) struct Offer {
    pub spec: Arc<JobSpec>,
    pub round: u32,
    pub deadline_ms: i64,
}

pub(super) struct Board {
    jobs: RwLock<Vec<RunningJob>>,
    /// Jobs that ended: a sync the job loop began before the end does not bring one back (a
    /// job's name is never used again).
    ended: RwLock<HashSet<String>>,
    /// Rounds whose fold has begun. An update or failure is recorded only while holding this
    /// lock for reading and only if its round is not here; a round enters it under the write
    /// lock, so the fold sees every update that was acknowledged (see [`Board::record`]).
    closing: RwLock<Vec<(String, u32)>>,
    /// Bumped at every change that can give a node a task or end its wait.
    version: tokio::sync::watch::Sender<u64>,
}

impl Default for Board {
    fn default() -> Self {
        Board {
            jobs: RwLock::new(Vec::new()),
            ended: RwLock::new(HashSet::new()),
            closing: RwLock::new(Vec::new()),
            version: tokio::sync::watch::Sender::new(0),
        }
    }
}

impl Board {
    /// Mirrors a running job as the store has it now: its spec and, when a round is open, who was
    /// selected and who answered.
    pub fn sync(
        &self,
        name: &str,
        created_ms: i64,
        spec: Arc<JobSpec>,
        open: Option<&RoundRow>,
        answered: impl IntoIterator<Item = String>,
    ) {
        let mut jobs = crate::write(&self.jobs);
        if crate::read(&self.ended).contains(name) {
            return;
        }
        let at = match jobs.iter().position(|j| j.name == name) {
            Some(i) => i,
            None => {
                let at = jobs.partition_point(|j| (j.created_ms, j.name.as_str()) < (created_ms, name));
                jobs.insert(at, RunningJob { name: name.to_string(), created_ms, spec: spec.clone(), round: None });
                at
            }
        };
        let job = &mut jobs[at];
        // The job loop syncs on every pass: waiters are woken only when something changed (a
        // new job with no round yet offers nothing, so it changes nothing either).
        let mut changed = *job.spec != *spec;
        job.spec = spec;
        job.round = match (open, job.round.take()) {
            (None, kept) => {
                changed |= kept.is_some();
                None
            }
            // The same round: the selection is fixed, only the answers grow.
            (Some(row), Some(mut kept)) if kept.round == row.round => {
                let before = kept.answered.len();
                kept.answered.extend(answered);
                changed |= kept.answered.len() != before;
                Some(kept)
            }
            (Some(row), _) => {
                changed = true;
                Some(OpenRound {
                    round: row.round,
                    deadline_ms: row.deadline_ms,
                    selected: row.selected.iter().cloned().collect(),
                    answered: answered.into_iter().collect(),
                })
            }
        };
        drop(jobs);
        if changed {
            self.changed();
        }
    }

    /// A job that stopped running.
    pub fn remove(&self, name: &str) {
        let mut jobs = crate::write(&self.jobs);
        crate::write(&self.ended).insert(name.to_string());
        jobs.retain(|j| j.name != name);
        drop(jobs);
        crate::write(&self.closing).retain(|(j, _)| j != name);
        self.changed();
    }

    /// Runs `record` (committing an update or a failure of `round`) unless that round's fold has
    /// begun; `None` if it has.
    pub fn record<R>(&self, name: &str, round: u32, record: impl FnOnce() -> R) -> Option<R> {
        let closing = crate::read(&self.closing);
        if closing.iter().any(|(j, r)| j == name && *r == round) {
            return None;
        }
        let done = record();
        drop(closing);
        Some(done)
    }

    /// The fold of `round` begins: from now on nothing more is recorded for it.
    pub fn begin_close(&self, name: &str, round: u32) {
        crate::write(&self.closing).push((name.to_string(), round));
    }

    /// A round that closed (before the job loop opens the next one).
    pub fn close(&self, name: &str, round: u32) {
        crate::write(&self.closing).retain(|(j, r)| !(j == name && *r == round));
        if let Some(job) = crate::write(&self.jobs).iter_mut().find(|j| j.name == name) {
            if job.round.as_ref().is_some_and(|r| r.round == round) {
                job.round = None;
            }
        }
        self.changed();
    }

    /// A node's update or failure report was committed.
    pub fn answered(&self, name: &str, round: u32, node: &str) {
        let mut jobs = crate::write(&self.jobs);
        let open = jobs.iter_mut().find(|j| j.name == name).and_then(|j| j.round.as_mut()).filter(|r| r.round == round);
        if let Some(open) = open {
            open.answered.insert(node.to_string());
        }
        drop(jobs);
        self.changed();
    }

    /// The first running job (in creation order) whose open round awaits `node`. A node that
    /// reported it cannot make its update is not asked again: it takes the next job's task.
    pub fn offer(&self, node: &str) -> Option<Offer> {
        let jobs = crate::read(&self.jobs);
        jobs.iter().find_map(|j| {
            let r = j.round.as_ref()?;
            (r.selected.contains(node) && !r.answered.contains(node)).then(|| Offer {
                spec: j.spec.clone(),
                round: r.round,
                deadline_ms: r.deadline_ms,
            })
        })
    }

    pub fn standing(&self, name: &str, round: u32, node: &str) -> Standing {
        let jobs = crate::read(&self.jobs);
        let Some(job) = jobs.iter().find(|j| j.name == name) else { return Standing::Other };
        match &job.round {
            Some(r) if r.round == round && r.selected.contains(node) && !r.answered.contains(node) => {
                Standing::Awaited(job.spec.clone())
            }
            _ => Standing::Other,
        }
    }

    /// Whether round `round` of job `name` is open.
    pub fn is_open(&self, name: &str, round: u32) -> bool {
        crate::read(&self.jobs).iter().any(|j| j.name == name && j.round.as_ref().is_some_and(|r| r.round == round))
    }

    /// Whether `node` was selected for the open round `round` of job `name` (answered or not).
    pub fn selected(&self, name: &str, round: u32, node: &str) -> bool {
        crate::read(&self.jobs)
            .iter()
            .any(|j| j.name == name && j.round.as_ref().is_some_and(|r| r.round == round && r.selected.contains(node)))
    }

    /// A receiver that sees every change from now on.
    pub fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.version.subscribe()
    }

    fn changed(&self) {
        self.version.send_modify(|v| *v = v.wrapping_add(1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str) -> Arc<JobSpec> {
        use crate::config::job::{PluginRef, RoundsSection, StopSection, TrainingSection};
        Arc::new(JobSpec {
            name: name.into(),
            seed: 1,
            rounds: RoundsSection::default(),
            stop: StopSection { rounds: 2, target_accuracy: None, wall_secs: None },
            model: crate::train::ModelSpec::Mlp { inputs: 4, hidden: vec![], classes: 2 },
            training: TrainingSection::default(),
            aggregator: PluginRef {
                digest: format!("sha256:{}", "0".repeat(64)),
                source: None,
                pinned: None,
                follow_tag: false,
                config: Default::default(),
                limits: crate::runtime::Limits::default(),
            },
            aggregator_then: Vec::new(),
            client_objective: None,
            compressor: None,
            privacy: None,
            client_selection: None,
        })
    }

    fn row(round: u32, selected: &[&str]) -> RoundRow {
        RoundRow {
            round,
            selected: selected.iter().map(|s| s.to_string()).collect(),
            opened_ms: 0,
            deadline_ms: 99,
            closed_ms: None,
            summary: None,
            population: None,
        }
    }

    #[test]
    fn a_node_is_offered_the_oldest_job_that_awaits_it_until_it_answers() {
        let board = Board::default();
        let mut changes = board.changes();
        board.sync("late", 20, spec("late"), Some(&row(1, &["a", "b"])), []);
        board.sync("early", 10, spec("early"), Some(&row(3, &["a"])), []);
        assert!(changes.has_changed().expect("open"));
        changes.borrow_and_update();
        let offer = board.offer("a").expect("a task");
        assert_eq!((offer.spec.name.as_str(), offer.round, offer.deadline_ms), ("early", 3, 99));
        assert_eq!(board.offer("b").map(|o| o.round), Some(1));
        assert!(board.offer("c").is_none());

        board.answered("early", 3, "a");
        assert!(changes.has_changed().expect("open"));
        assert_eq!(board.offer("a").map(|o| o.spec.name.clone()).as_deref(), Some("late"));
        assert!(matches!(board.standing("early", 3, "a"), Standing::Other));
        assert!(board.selected("early", 3, "a") && board.is_open("early", 3));
        // The loop's next sync of the same round keeps the answer it had not read yet, and
        // wakes no one: nothing changed.
        changes.borrow_and_update();
        board.sync("early", 10, spec("early"), Some(&row(3, &["a"])), ["a".to_string()]);
        assert!(!changes.has_changed().expect("open"));
        assert!(matches!(board.standing("late", 1, "a"), Standing::Awaited(_)));
        assert_eq!(board.offer("a").map(|o| o.spec.name.clone()).as_deref(), Some("late"));

        board.close("late", 1);
        assert!(board.offer("a").is_none() && board.offer("b").is_none() && !board.is_open("late", 1));
        // The next round starts with no answers.
        board.sync("late", 20, spec("late"), Some(&row(2, &["b"])), []);
        assert_eq!(board.offer("b").map(|o| o.round), Some(2));
        board.remove("late");
        assert!(board.offer("b").is_none());
        // A pass of the job loop that read the job before it ended does not bring it back.
        board.sync("late", 20, spec("late"), Some(&row(2, &["b"])), []);
        assert!(board.offer("b").is_none());
        // An answer for a round that is not open changes nothing.
        board.answered("early", 2, "z");
        assert!(!board.selected("early", 2, "z"));

        // Once a round's fold began, nothing more is recorded for it; other rounds go on.
        assert_eq!(board.record("early", 3, || 7), Some(7));
        board.begin_close("early", 3);
        assert_eq!(board.record("early", 3, || 7), None);
        assert_eq!(board.record("early", 4, || 8), Some(8));
        board.close("early", 3);
        assert_eq!(board.record("early", 3, || 7), Some(7));
    }
}
