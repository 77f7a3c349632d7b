//! Blob upload sessions of the embedded registry.
//!
//! A session belongs to the repository and the identity that opened it: another repository's
//! path or another user cannot touch it. One request at a time writes to it (a second gets
//! `BLOB_UPLOAD_INVALID`), it grows to at most the blob size limit, and it expires after
//! `ttl` without a request. Finishing hashes the session's bytes while copying them into a new
//! file, which becomes the blob unless the blob is there already: the session's own file is
//! never the stored blob, so nothing written on a session can reach a stored blob.
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::StatusCode;
use axum::response::Response;
use futures_util::StreamExt;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use super::auth::Identity;
use super::{internal, oci_error};

/// Sessions one identity may hold open at once, and all identities together.
const MAX_SESSIONS_PER_IDENTITY: usize = 64;
const MAX_SESSIONS: usize = 4096;

struct Session {
    repo: String,
    identity: Identity,
    touched: Instant,
    size: u64,
    /// A request is writing to (or finishing) the session.
    busy: bool,
}

pub struct Uploads {
    dir: PathBuf,
    ttl: Duration,
    max_blob: u64,
    sessions: Mutex<HashMap<String, Session>>,
}

/// A session taken by one request; dropping it (even when the request is abandoned) frees it.
pub struct Taken<'a> {
    uploads: &'a Uploads,
    id: String,
    pub path: PathBuf,
    pub size: u64,
}

impl Drop for Taken<'_> {
    fn drop(&mut self) {
        let mut sessions = self.uploads.lock();
        if let Some(s) = sessions.get_mut(&self.id) {
            s.busy = false;
            s.touched = Instant::now();
        }
    }
}

fn unknown(id: &str) -> Response {
    oci_error(StatusCode::NOT_FOUND, "BLOB_UPLOAD_UNKNOWN", format!("no upload {id}"))
}

fn valid_id(id: &str) -> bool {
    id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit())
}

impl Uploads {
    /// Sessions under `dir`; files left there by an earlier run belong to no session and go.
    pub fn new(dir: PathBuf, ttl: Duration, max_blob: u64) -> std::io::Result<Uploads> {
        std::fs::create_dir_all(&dir)?;
        for e in std::fs::read_dir(&dir)?.flatten() {
            let _ = std::fs::remove_file(e.path());
        }
        Ok(Uploads { dir, ttl, max_blob, sessions: Mutex::new(HashMap::new()) })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Session>> {
        self.sessions.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A fresh file in the uploads directory for writing a blob or manifest before it is renamed
    /// into place.
    pub fn temp_path(&self) -> PathBuf {
        self.dir.join(format!("{}.tmp", super::new_id()))
    }

    /// Removes sessions nobody touched for `ttl` (and their files).
    fn expire(&self, sessions: &mut HashMap<String, Session>) {
        let now = Instant::now();
        sessions.retain(|id, s| {
            let keep = s.busy || now.duration_since(s.touched) < self.ttl;
            if !keep {
                tracing::debug!(upload = %id, repo = %s.repo, "upload session expired");
                let _ = std::fs::remove_file(self.dir.join(id));
            }
            keep
        });
    }

    /// Opens a session on `repo` for `identity`; returns its id.
    pub fn open(&self, repo: &str, identity: &Identity) -> Result<String, Response> {
        let mut sessions = self.lock();
        self.expire(&mut sessions);
        let mine = sessions.values().filter(|s| s.identity == *identity).count();
        if mine >= MAX_SESSIONS_PER_IDENTITY || sessions.len() >= MAX_SESSIONS {
            return Err(oci_error(
                StatusCode::TOO_MANY_REQUESTS,
                "TOOMANYREQUESTS",
                format!("too many open uploads (at most {MAX_SESSIONS_PER_IDENTITY} per user): finish or cancel some"),
            ));
        }
        let id = super::new_id();
        std::fs::File::create(self.dir.join(&id)).map_err(internal)?;
        let session = Session {
            repo: repo.to_string(),
            identity: identity.clone(),
            touched: Instant::now(),
            size: 0,
            busy: false,
        };
        sessions.insert(id.clone(), session);
        Ok(id)
    }

    /// Takes session `id` for one request of `identity` on `repo`.
    pub fn take(&self, id: &str, repo: &str, identity: &Identity) -> Result<Taken<'_>, Response> {
        if !valid_id(id) {
            return Err(unknown(id));
        }
        let mut sessions = self.lock();
        self.expire(&mut sessions);
        let s =
            sessions.get_mut(id).filter(|s| s.repo == repo && s.identity == *identity).ok_or_else(|| unknown(id))?;
        if s.busy {
            return Err(oci_error(
                StatusCode::CONFLICT,
                "BLOB_UPLOAD_INVALID",
                format!("upload {id} is being written by another request"),
            ));
        }
        s.busy = true;
        s.touched = Instant::now();
        Ok(Taken { uploads: self, id: id.to_string(), path: self.dir.join(id), size: s.size })
    }

    /// Ends session `taken` (finished or cancelled): its file goes.
    pub fn close(&self, taken: Taken<'_>) {
        self.lock().remove(&taken.id);
        let _ = std::fs::remove_file(&taken.path);
    }

    /// Appends a request body to the taken session; returns its new size. Past the blob size
    /// limit the session is closed.
    pub async fn append(&self, taken: &mut Taken<'_>, body: Body) -> Result<u64, Response> {
        let mut file = tokio::fs::OpenOptions::new().append(true).open(&taken.path).await.map_err(internal)?;
        let mut stream = body.into_data_stream();
        let mut size = taken.size;
        let result = async {
            while let Some(chunk) = stream.next().await {
                let chunk = chunk.map_err(|e| {
                    oci_error(StatusCode::BAD_REQUEST, "BLOB_UPLOAD_INVALID", format!("the body broke off: {e}"))
                })?;
                size += chunk.len() as u64;
                if size > self.max_blob {
                    return Err(oci_error(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        "SIZE_INVALID",
                        format!("a blob is at most {} bytes on this registry", self.max_blob),
                    ));
                }
                file.write_all(&chunk).await.map_err(internal)?;
            }
            file.flush().await.map_err(internal)
        }
        .await;
        // What reached the file counts, whatever happened after.
        let written = file.metadata().await.map(|m| m.len()).unwrap_or(size);
        taken.size = written;
        if let Some(s) = self.lock().get_mut(&taken.id) {
            s.size = written;
        }
        result.map(|()| written)
    }

    /// Copies the taken session's bytes into a new file while hashing them; returns that file and
    /// the digest. The session itself is left as it was.
    pub async fn seal(&self, taken: &Taken<'_>) -> Result<(PathBuf, String), Response> {
        let (from, to) = (taken.path.clone(), self.temp_path());
        let to2 = to.clone();
        let digest = tokio::task::spawn_blocking(move || copy_hashing(&from, &to2)).await.map_err(internal)?;
        match digest {
            Ok(d) => Ok((to, d)),
            Err(e) => {
                let _ = std::fs::remove_file(&to);
                Err(internal(e))
            }
        }
    }
}

fn copy_hashing(from: &Path, to: &Path) -> std::io::Result<String> {
    use std::io::{Read, Write};
    let mut src = std::fs::File::open(from)?;
    let mut dst = std::fs::File::create(to)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = src.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        dst.write_all(&buf[..n])?;
    }
    dst.sync_all()?;
    Ok(format!("sha256:{}", hex::encode(hasher.finalize())))
}
