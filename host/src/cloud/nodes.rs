//! Who the nodes are and which are online, in memory so that authenticating a poll takes no
//! SQLite lock: [`Tokens`] mirrors the store's token hashes, [`Presence`] keeps when each node
//! last made a request and whether it is waiting in a long poll now.
use std::collections::HashMap;
use std::sync::{Mutex, RwLock};

use crate::store::{now_ms, CloudStore, Result};

/// Token hash -> node, filled from the store. A hash the map lacks is looked up in the store
/// (a token `nereid token create` added while the cloud runs) and kept if found; hashes that
/// are not found are not kept, so a caller guessing tokens cannot grow the map. The whole map is
/// read again every [`TOKEN_REFRESH`], which is how long a token replaced behind the running
/// cloud's back stays valid.
#[derive(Default)]
pub(super) struct Tokens(RwLock<HashMap<String, String>>);

pub(super) const TOKEN_REFRESH: std::time::Duration = std::time::Duration::from_secs(5);

impl Tokens {
    pub fn load(store: &CloudStore) -> Result<Tokens> {
        let tokens = Tokens::default();
        tokens.refresh(store)?;
        Ok(tokens)
    }

    /// Reads every token hash from the store again.
    pub fn refresh(&self, store: &CloudStore) -> Result<()> {
        let map: HashMap<String, String> = store.node_tokens()?.into_iter().collect();
        *crate::write(&self.0) = map;
        Ok(())
    }

    pub fn node(&self, store: &CloudStore, token_sha256: &str) -> Result<Option<String>> {
        if let Some(node) = crate::read(&self.0).get(token_sha256) {
            return Ok(Some(node.clone()));
        }
        let found = store.node_for_token(token_sha256)?;
        if let Some(node) = &found {
            let mut map = crate::write(&self.0);
            // A node has one token: the one it had before is no longer valid.
            map.retain(|_, n| n != node);
            map.insert(token_sha256.to_string(), node.clone());
        }
        Ok(found)
    }
}

#[derive(Clone, Copy)]
struct Seen {
    at_ms: i64,
    /// Long polls of this node in progress: it counts as online while one waits.
    waiting: u32,
}

/// When each node last made a request. Soft state: refreshed by every request, so writing it
/// to disk (an fsync per request) would buy nothing.
#[derive(Default)]
pub(super) struct Presence(Mutex<HashMap<String, Seen>>);

/// A node waiting in a long poll; dropping it (also when the request is abandoned) ends the wait.
pub(super) struct Waiting<'a> {
    presence: &'a Presence,
    node: String,
}

impl Presence {
    pub fn seen(&self, node: &str) {
        self.touch(node, 0);
    }

    pub fn waiting(&self, node: &str) -> Waiting<'_> {
        self.touch(node, 1);
        Waiting { presence: self, node: node.to_string() }
    }

    /// Seen now, with `waits` more long polls in progress.
    fn touch(&self, node: &str, waits: u32) {
        let now = now_ms();
        let mut map = crate::lock(&self.0);
        match map.get_mut(node) {
            Some(seen) => {
                seen.at_ms = now;
                seen.waiting += waits;
            }
            None => {
                map.insert(node.to_string(), Seen { at_ms: now, waiting: waits });
            }
        }
    }

    /// Nodes that made a request since `since_ms` or are waiting now, sorted.
    pub fn online_since(&self, since_ms: i64) -> Vec<String> {
        let mut online: Vec<String> = crate::lock(&self.0)
            .iter()
            .filter(|(_, s)| s.waiting > 0 || s.at_ms >= since_ms)
            .map(|(n, _)| n.clone())
            .collect();
        online.sort();
        online
    }

    /// When each node was last seen (now, for one waiting in a long poll).
    pub fn last_seen(&self) -> HashMap<String, i64> {
        let now = now_ms();
        crate::lock(&self.0).iter().map(|(n, s)| (n.clone(), if s.waiting > 0 { now } else { s.at_ms })).collect()
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if let Some(seen) = crate::lock(&self.presence.0).get_mut(&self.node) {
            seen.waiting = seen.waiting.saturating_sub(1);
            seen.at_ms = now_ms();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_waiting_in_a_long_poll_stays_online_and_tokens_added_later_are_found() {
        let presence = Presence::default();
        presence.seen("a");
        let later = now_ms() + 1_000;
        assert!(presence.online_since(later).is_empty());
        {
            let _w1 = presence.waiting("b");
            let _w2 = presence.waiting("b");
            assert_eq!(presence.online_since(later), ["b"]);
            assert!(presence.last_seen()["b"] >= now_ms() - 1);
        }
        assert!(presence.online_since(later).is_empty(), "online again only by its last request");
        assert_eq!(presence.online_since(0), ["a", "b"]);

        let dir = tempfile::tempdir().expect("tempdir");
        let store = CloudStore::open(&dir.path().join("cloud.db")).expect("store");
        store.set_node_token("n1", "h1").expect("token");
        let tokens = Tokens::load(&store).expect("load");
        assert_eq!(tokens.node(&store, "h1").expect("lookup").as_deref(), Some("n1"));
        // Created while the cloud runs: found in the store, and the node's old token is dropped.
        store.set_node_token("n1", "h2").expect("token");
        store.set_node_token("n2", "h3").expect("token");
        assert_eq!(tokens.node(&store, "h3").expect("lookup").as_deref(), Some("n2"));
        assert_eq!(tokens.node(&store, "h2").expect("lookup").as_deref(), Some("n1"));
        assert_eq!(
            tokens.node(&store, "h1").expect("lookup"),
            None,
            "a replaced token is refused once its replacement is used"
        );
        store.set_node_token("n2", "h4").expect("token");
        assert_eq!(tokens.node(&store, "h3").expect("lookup").as_deref(), Some("n2"), "until the next refresh");
        tokens.refresh(&store).expect("refresh");
        assert_eq!(tokens.node(&store, "h3").expect("lookup"), None, "a replaced token is refused after a refresh");
        assert_eq!(tokens.node(&store, "nope").expect("lookup"), None);
    }
}
