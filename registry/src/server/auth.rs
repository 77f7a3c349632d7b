//! Who may do what on the embedded registry: users and their per-repository permissions, bearer
//! tokens from the token endpoint, and the 401/403 answers.
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::Response;
use base64::Engine as _;
use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::oci_error;
use crate::RegistryError;

pub(super) const TOKEN_LIFETIME: Duration = Duration::from_secs(3600);
/// Tokens held at once; the oldest go first past it (every `/token` call makes one).
const MAX_TOKENS: usize = 10_000;

/// `users.toml`:
///
/// ```toml
/// [users.ci]
/// password_bcrypt = "$2y$..."  # the hash `htpasswd -nbB ci PASSWORD` prints after "ci:"
/// pull = ["*"]             # repositories the user may pull: names, or prefixes ending in `*`
/// push = ["team-a/*"]      # ... push to (blob uploads, manifests, tags)
/// delete = []              # ... delete manifests, tags and blob links in
/// ```
///
/// A user with none of `pull`, `push`, `delete` may do everything (the registry's users before
/// permissions existed); naming any of them limits the user to what is listed. A user without
/// `password_bcrypt` takes the password of the same user in the `--htpasswd` file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UsersFile {
    #[serde(default)]
    pub users: BTreeMap<String, UserEntry>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserEntry {
    pub password_bcrypt: Option<String>,
    /// Refused with a message: unsalted hashes are no longer read.
    pub password_sha256: Option<String>,
    pub pull: Option<Vec<String>>,
    pub push: Option<Vec<String>>,
    pub delete: Option<Vec<String>>,
}

/// What a request does to a repository.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Pull,
    Push,
    Delete,
}

impl Action {
    fn scope(self) -> &'static str {
        match self {
            Action::Pull => "pull",
            Action::Push => "pull,push",
            Action::Delete => "delete",
        }
    }
}

fn valid_pattern(p: &str) -> bool {
    let name = p.strip_suffix('*').unwrap_or(p);
    !p.is_empty()
        && p.len() <= 255
        && (name.is_empty() || name.trim_end_matches('/').split('/').all(crate::reference::is_path_component))
}

fn matches(pattern: &str, repo: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => repo.starts_with(prefix),
        None => pattern == repo,
    }
}

impl UsersFile {
    pub fn read(path: &Path) -> Result<UsersFile, RegistryError> {
        let settings = |message: String| RegistryError::Settings { path: path.to_path_buf(), message };
        let text = std::fs::read_to_string(path).map_err(RegistryError::io(path))?;
        let file: UsersFile = toml::from_str(&text).map_err(|e| settings(e.message().to_string()))?;
        for (name, u) in &file.users {
            if u.password_sha256.is_some() {
                return Err(settings(format!(
                    "users.{name}.password_sha256: unsalted hashes are no longer accepted; give password_bcrypt, the \
                     hash `htpasswd -nbB {name} PASSWORD` prints after \"{name}:\""
                )));
            }
            if let Some(hash) = &u.password_bcrypt {
                check_bcrypt(hash).map_err(|m| settings(format!("users.{name}.password_bcrypt: {m}")))?;
            }
            for (key, list) in [("pull", &u.pull), ("push", &u.push), ("delete", &u.delete)] {
                if let Some(bad) = list.iter().flatten().find(|p| !valid_pattern(p)) {
                    return Err(settings(format!(
                        "users.{name}.{key}: `{bad}` is neither a repository name nor a prefix ending in `*`"
                    )));
                }
            }
        }
        Ok(file)
    }

    /// Adds the users of an htpasswd file (`name:hash` lines, bcrypt hashes as `htpasswd -B`
    /// writes them): each takes its entry's permissions if `users.toml` has one (without a
    /// password), else may do everything.
    pub fn add_htpasswd(&mut self, path: &Path) -> Result<(), RegistryError> {
        let settings = |message: String| RegistryError::Settings { path: path.to_path_buf(), message };
        let meta = std::fs::metadata(path).map_err(RegistryError::io(path))?;
        if meta.len() > MAX_HTPASSWD_BYTES {
            return Err(settings(format!("larger than {MAX_HTPASSWD_BYTES} bytes")));
        }
        let text = std::fs::read_to_string(path).map_err(RegistryError::io(path))?;
        for (n, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty() && !l.starts_with('#')) {
            let at = |m: String| settings(format!("line {}: {m}", n + 1));
            let (name, hash) = line.trim().split_once(':').ok_or_else(|| at("not `name:hash`".into()))?;
            if name.is_empty() || name.len() > 255 || name.contains(char::is_whitespace) {
                return Err(at(format!("`{name}` is not a user name")));
            }
            check_bcrypt(hash).map_err(|m| at(format!("user `{name}`: {m}")))?;
            let entry = self.users.entry(name.to_string()).or_insert_with(|| UserEntry {
                password_bcrypt: None,
                password_sha256: None,
                pull: None,
                push: None,
                delete: None,
            });
            if entry.password_bcrypt.is_some() {
                return Err(at(format!("user `{name}` already has a password_bcrypt in the users file")));
            }
            entry.password_bcrypt = Some(hash.to_string());
        }
        if let Some((name, _)) = self.users.iter().find(|(_, u)| u.password_bcrypt.is_none()) {
            return Err(settings(format!("user `{name}` of the users file has no password here either")));
        }
        Ok(())
    }
}

/// Largest htpasswd file read.
const MAX_HTPASSWD_BYTES: u64 = 4 << 20;
/// bcrypt costs accepted: below 4 is not bcrypt, above 14 one check would take seconds.
const BCRYPT_COSTS: std::ops::RangeInclusive<u32> = 4..=14;

/// Checks that `hash` is a bcrypt hash ($2a$, $2b$, $2x$ or $2y$) of an accepted cost.
fn check_bcrypt(hash: &str) -> Result<(), String> {
    let parts = hash.parse::<bcrypt::HashParts>().map_err(|_| {
        "not a bcrypt hash (`$2y$...`; other htpasswd formats such as MD5 and SHA-1 are not accepted)".to_string()
    })?;
    if !BCRYPT_COSTS.contains(&parts.get_cost()) {
        return Err(format!("cost {} is outside {BCRYPT_COSTS:?}", parts.get_cost()));
    }
    Ok(())
}

/// A user as the registry keeps it.
struct User {
    password_bcrypt: String,
    /// None: every repository (no list given).
    pull: Option<Vec<String>>,
    push: Option<Vec<String>>,
    delete: Option<Vec<String>>,
}

impl User {
    fn may(&self, action: Action, repo: &str) -> bool {
        let unrestricted = self.pull.is_none() && self.push.is_none() && self.delete.is_none();
        let list = match action {
            Action::Pull => &self.pull,
            Action::Push => &self.push,
            Action::Delete => &self.delete,
        };
        unrestricted || list.iter().flatten().any(|p| matches(p, repo))
    }
}

/// Who made a request.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Identity {
    User(String),
    Anonymous,
}

struct Token {
    identity: Identity,
    expires: Instant,
}

pub struct Auth {
    users: BTreeMap<String, User>,
    anonymous_pull: bool,
    tokens: Mutex<HashMap<String, Token>>,
    /// "http" or "https": the scheme of the token realm clients are sent to.
    scheme: &'static str,
    /// Per user, the SHA-256 of the password last verified against its bcrypt hash: a client
    /// that logs in again costs no bcrypt check (memory only, never written).
    verified: Mutex<HashMap<String, [u8; 32]>>,
    /// bcrypt checks running now: past [`MAX_BCRYPT_CHECKS`] a login is refused (401) rather
    /// than spend more cores on guesses.
    checking: std::sync::atomic::AtomicUsize,
}

/// bcrypt checks at once (one takes milliseconds at cost 5, a quarter second at 12).
const MAX_BCRYPT_CHECKS: usize = 2;

impl Auth {
    pub fn new(users: UsersFile, anonymous_pull: bool, scheme: &'static str) -> Auth {
        let users = users
            .users
            .into_iter()
            .map(|(n, u)| {
                let user = User {
                    password_bcrypt: u.password_bcrypt.unwrap_or_default(),
                    pull: u.pull,
                    push: u.push,
                    delete: u.delete,
                };
                (n, user)
            })
            .collect();
        Auth {
            users,
            anonymous_pull,
            tokens: Mutex::new(HashMap::new()),
            scheme,
            verified: Mutex::new(HashMap::new()),
            checking: std::sync::atomic::AtomicUsize::new(0),
        }
    }

    /// Whether anyone needs credentials.
    pub fn enabled(&self) -> bool {
        !self.users.is_empty()
    }

    fn check_password(&self, user: &str, password: &str) -> bool {
        use std::sync::atomic::Ordering;
        let Some(u) = self.users.get(user) else { return false };
        let sha: [u8; 32] = Sha256::digest(password.as_bytes()).into();
        if self.verified.lock().unwrap_or_else(|e| e.into_inner()).get(user) == Some(&sha) {
            return true;
        }
        if self.checking.fetch_add(1, Ordering::AcqRel) >= MAX_BCRYPT_CHECKS {
            self.checking.fetch_sub(1, Ordering::AcqRel);
            tracing::warn!(user, "login refused: {MAX_BCRYPT_CHECKS} password checks already running");
            return false;
        }
        let ok = bcrypt::verify(password, &u.password_bcrypt).unwrap_or(false);
        self.checking.fetch_sub(1, Ordering::AcqRel);
        if ok {
            self.verified.lock().unwrap_or_else(|e| e.into_inner()).insert(user.to_string(), sha);
        }
        ok
    }

    /// The user of a `Basic` header: Some(Ok(name)), Some(Err(())) for wrong credentials, None
    /// without such a header.
    pub fn basic_user(&self, headers: &HeaderMap) -> Option<Result<String, ()>> {
        let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
        let encoded = value.strip_prefix("Basic ")?;
        let checked = base64::engine::general_purpose::STANDARD
            .decode(encoded.trim())
            .ok()
            .and_then(|d| String::from_utf8(d).ok())
            .and_then(|text| {
                let (user, password) = text.split_once(':')?;
                self.check_password(user, password).then(|| user.to_string())
            });
        Some(checked.ok_or(()))
    }

    /// A token for `identity`, valid for [`TOKEN_LIFETIME`].
    pub fn issue_token(&self, identity: Identity) -> String {
        let token = super::new_id();
        let mut tokens = self.tokens.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        tokens.retain(|_, t| t.expires > now);
        if tokens.len() >= MAX_TOKENS {
            if let Some(oldest) = tokens.iter().min_by_key(|(_, t)| t.expires).map(|(k, _)| k.clone()) {
                tokens.remove(&oldest);
            }
        }
        tokens.insert(token.clone(), Token { identity, expires: now + TOKEN_LIFETIME });
        token
    }

    /// Who the request is, if its credentials are good (anonymous without any).
    fn identity(&self, headers: &HeaderMap) -> Option<Identity> {
        let bearer = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim);
        if let Some(t) = bearer {
            let tokens = self.tokens.lock().unwrap_or_else(|e| e.into_inner());
            return tokens.get(t).filter(|tok| tok.expires > Instant::now()).map(|tok| tok.identity.clone());
        }
        match self.basic_user(headers) {
            Some(Ok(user)) => Some(Identity::User(user)),
            Some(Err(())) => None,
            None => Some(Identity::Anonymous),
        }
    }

    fn permits(&self, identity: &Identity, action: Action, repo: &str) -> bool {
        match identity {
            Identity::User(u) => self.users.get(u).is_some_and(|user| user.may(action, repo)),
            Identity::Anonymous => action == Action::Pull && self.anonymous_pull,
        }
    }

    /// Whether `identity` may pull `repo` (what the catalog lists).
    pub fn may_pull(&self, identity: &Identity, repo: &str) -> bool {
        !self.enabled() || self.permits(identity, Action::Pull, repo)
    }

    /// Who may do `action` on `repo` (`None` for the catalog); else the 401 that starts the token
    /// flow, or 403 for a user who lacks the permission.
    pub fn authorize(&self, headers: &HeaderMap, action: Action, repo: Option<&str>) -> Result<Identity, Response> {
        if !self.enabled() {
            return Ok(Identity::Anonymous);
        }
        let scope = match repo {
            Some(r) => format!("repository:{r}:{}", action.scope()),
            None => "registry:catalog:*".to_string(),
        };
        let identity = self.identity(headers);
        let allowed = match (&identity, repo) {
            (Some(id), Some(r)) => self.permits(id, action, r),
            // The catalog lists what the caller may pull: any good credentials do.
            (Some(Identity::User(_)), None) => true,
            (Some(Identity::Anonymous), None) => self.anonymous_pull,
            (None, _) => false,
        };
        match identity {
            Some(id) if allowed => Ok(id),
            Some(Identity::User(user)) => Err(oci_error(
                StatusCode::FORBIDDEN,
                "DENIED",
                format!("user `{user}` may not {} {}", action.scope(), repo.unwrap_or("the catalog")),
            )),
            _ => Err(self.challenge(headers, &scope)),
        }
    }

    /// The 401 naming the token realm (with the scheme the registry serves and the host the
    /// client used).
    pub fn challenge(&self, headers: &HeaderMap, scope: &str) -> Response {
        let host = headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .filter(|h| h.bytes().all(|b| b.is_ascii_graphic()))
            .unwrap_or("localhost");
        let scheme = self.scheme;
        let challenge =
            format!("Bearer realm=\"{scheme}://{host}/token\",service=\"nereid-registry\",scope=\"{scope}\"");
        let mut resp = oci_error(StatusCode::UNAUTHORIZED, "UNAUTHORIZED", "authentication required");
        if let Ok(v) = HeaderValue::from_str(&challenge) {
            resp.headers_mut().insert(header::WWW_AUTHENTICATE, v);
        }
        resp
    }

    pub fn anonymous_pull(&self) -> bool {
        self.anonymous_pull
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth(toml: &str) -> Auth {
        Auth::new(toml::from_str(toml).expect("users"), false, "http")
    }

    fn basic(user: &str, password: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        let v = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
        h.insert(header::AUTHORIZATION, HeaderValue::from_str(&format!("Basic {v}")).expect("header"));
        h
    }

    #[test]
    fn permissions_are_per_repository_and_action() {
        let hash = bcrypt::hash("pw", 4).expect("bcrypt");
        let a = auth(&format!(
            "[users.admin]\npassword_bcrypt = \"{hash}\"\n\
             [users.team]\npassword_bcrypt = \"{hash}\"\npull = [\"*\"]\npush = [\"team/*\"]\n"
        ));
        let admin = basic("admin", "pw");
        let team = basic("team", "pw");
        assert!(a.authorize(&admin, Action::Delete, Some("other/x")).is_ok(), "no lists: everything");
        assert!(a.authorize(&team, Action::Pull, Some("other/x")).is_ok());
        assert!(a.authorize(&team, Action::Push, Some("team/x")).is_ok());
        assert_eq!(a.authorize(&team, Action::Push, Some("other/x")).map(drop).expect_err("refused").status(), 403);
        assert_eq!(a.authorize(&team, Action::Delete, Some("team/x")).map(drop).expect_err("refused").status(), 403);
        assert_eq!(
            a.authorize(&basic("team", "no"), Action::Pull, Some("x")).map(drop).expect_err("refused").status(),
            401
        );
        assert_eq!(
            a.authorize(&HeaderMap::new(), Action::Pull, Some("x")).map(drop).expect_err("refused").status(),
            401
        );
        // A token carries its user's permissions, not more.
        let token = a.issue_token(Identity::User("team".into()));
        let mut bearer = HeaderMap::new();
        bearer.insert(header::AUTHORIZATION, HeaderValue::from_str(&format!("Bearer {token}")).expect("header"));
        assert!(a.authorize(&bearer, Action::Push, Some("team/y")).is_ok());
        assert_eq!(a.authorize(&bearer, Action::Push, Some("admin/y")).map(drop).expect_err("refused").status(), 403);
    }

    #[test]
    fn passwords_are_bcrypt_from_the_users_file_or_an_htpasswd_file() {
        let dir = tempfile::tempdir().expect("tmp");
        let write = |name: &str, text: &str| {
            let p = dir.path().join(name);
            std::fs::write(&p, text).expect("write");
            p
        };
        let old = write("old.toml", &format!("[users.ops]\npassword_sha256 = \"{}\"\n", "0".repeat(64)));
        let e = UsersFile::read(&old).expect_err("unsalted").to_string();
        assert!(e.contains("password_bcrypt") && e.contains("htpasswd -nbB ops"), "{e}");
        let md5 = write("md5", "ops:$apr1$abc$defghijklmnopqrstuvwx\n");
        let e = UsersFile::default().add_htpasswd(&md5).expect_err("md5").to_string();
        assert!(e.contains("line 1") && e.contains("bcrypt"), "{e}");
        // Permissions from the users file, the password from htpasswd; another user from
        // htpasswd alone may do everything.
        let hash = bcrypt::hash("s3cret", 4).expect("bcrypt");
        let htpasswd = write("htpasswd", &format!("# fleet\nteam:{hash}\nadmin:{hash}\n"));
        let mut users = UsersFile::read(&write("u.toml", "[users.team]\npull = [\"team/*\"]\n")).expect("users");
        users.add_htpasswd(&htpasswd).expect("htpasswd");
        let a = Auth::new(users, false, "http");
        assert!(a.authorize(&basic("team", "s3cret"), Action::Pull, Some("team/x")).is_ok());
        assert!(a.authorize(&basic("team", "s3cret"), Action::Pull, Some("other/x")).is_err());
        assert!(a.authorize(&basic("admin", "s3cret"), Action::Delete, Some("other/x")).is_ok());
        assert!(a.authorize(&basic("admin", "guess"), Action::Pull, Some("x")).is_err());
        // A users-file user with no password anywhere is refused.
        let mut lonely = UsersFile::read(&write("l.toml", "[users.nobody]\n")).expect("users");
        let e = lonely.add_htpasswd(&htpasswd).expect_err("no password").to_string();
        assert!(e.contains("nobody"), "{e}");
    }

    #[test]
    fn patterns_are_names_or_prefixes() {
        assert!(valid_pattern("*") && valid_pattern("team/*") && valid_pattern("team/app"));
        assert!(!valid_pattern("") && !valid_pattern("Team/*") && !valid_pattern("a//b"));
        assert!(matches("team/*", "team/x/y") && !matches("team/*", "teamx") && matches("a/b", "a/b"));
    }
}
