//! The content-addressed local store of pulled components, so a node that has a component keeps
//! working when its registry is unreachable.
//!
//! Layout under the cache root:
//! - `blobs/sha256/<hex>`: component bytes (and configs), written once verified, never changed;
//! - `manifests/<registry>/<repository>/<hex>.json`: the manifests pulled, by digest; the file's
//!   modification time is when the component was last used;
//! - `tags/<registry>/<repository>/<tag>`: the manifest digest a tag last resolved to;
//! - `tmp/`: downloads in progress.
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use oci_client::manifest::OciImageManifest;
use serde::Serialize;

use crate::{sha256_digest, sha256_hex, Reference, RegistryError};

#[derive(Debug, Clone)]
pub struct ComponentCache {
    root: PathBuf,
}

/// A component in the cache.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct CacheEntry {
    /// `host[:port]/repository`.
    pub repository: String,
    pub manifest_digest: String,
    pub layer_digest: String,
    pub size: u64,
    /// Tags that last resolved to this manifest.
    pub tags: Vec<String>,
    /// Seconds since the Unix epoch.
    pub last_used: u64,
}

/// What `gc` removed (or would remove, in a dry run).
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct GcReport {
    pub manifests: Vec<String>,
    pub blobs: Vec<String>,
    pub freed_bytes: u64,
}

fn walk_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            walk_files(&p, out);
        } else {
            out.push(p);
        }
    }
}

fn parse_manifest(bytes: &[u8]) -> Option<OciImageManifest> {
    serde_json::from_slice(bytes).ok()
}

impl ComponentCache {
    pub fn new(root: impl Into<PathBuf>) -> ComponentCache {
        ComponentCache { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where blob `digest` lives (whether or not it is there).
    pub fn blob_path(&self, digest: &str) -> Option<PathBuf> {
        sha256_hex(digest).map(|hex| self.root.join("blobs").join("sha256").join(hex))
    }

    fn manifest_dir(&self, reference: &Reference) -> PathBuf {
        self.root.join("manifests").join(&reference.registry).join(&reference.repository)
    }

    fn manifest_path(&self, reference: &Reference, digest: &str) -> Option<PathBuf> {
        sha256_hex(digest).map(|hex| self.manifest_dir(reference).join(format!("{hex}.json")))
    }

    fn tag_path(&self, reference: &Reference, tag: &str) -> PathBuf {
        self.root.join("tags").join(&reference.registry).join(&reference.repository).join(tag)
    }

    /// A fresh file for a download in progress.
    pub fn temp_file(&self) -> Result<tempfile::NamedTempFile, RegistryError> {
        let dir = self.root.join("tmp");
        std::fs::create_dir_all(&dir).map_err(RegistryError::io(&dir))?;
        tempfile::NamedTempFile::new_in(&dir).map_err(RegistryError::io(&dir))
    }

    /// Moves a verified download into the store as blob `digest`.
    pub fn commit_blob(&self, file: tempfile::NamedTempFile, digest: &str) -> Result<PathBuf, RegistryError> {
        let path = self.blob_path(digest).ok_or_else(|| RegistryError::Settings {
            path: self.root.clone(),
            message: format!("unsupported digest {digest}"),
        })?;
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(RegistryError::io(parent))?;
        }
        file.as_file().sync_all().map_err(RegistryError::io(file.path()))?;
        file.persist(&path).map_err(|e| RegistryError::Io { path: path.clone(), source: e.error })?;
        Ok(path)
    }

    fn write_atomic(&self, path: &Path, bytes: &[u8]) -> Result<(), RegistryError> {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(RegistryError::io(parent))?;
        }
        let mut tmp = self.temp_file()?;
        std::io::Write::write_all(&mut tmp, bytes).map_err(RegistryError::io(path))?;
        tmp.persist(path).map_err(|e| RegistryError::Io { path: path.to_path_buf(), source: e.error })?;
        Ok(())
    }

    /// Records manifest `bytes` (already verified to have `digest`) of `reference`'s repository,
    /// and the tag `reference` names, if any.
    pub fn put_manifest(&self, reference: &Reference, digest: &str, bytes: &[u8]) -> Result<(), RegistryError> {
        let path = self.manifest_path(reference, digest).ok_or_else(|| RegistryError::Protocol {
            reference: reference.to_string(),
            message: format!("unsupported manifest digest {digest}"),
        })?;
        self.write_atomic(&path, bytes)?;
        self.put_tag(reference, digest)
    }

    /// Records that `reference`'s tag (if it names one) resolved to `digest`.
    pub fn put_tag(&self, reference: &Reference, digest: &str) -> Result<(), RegistryError> {
        match (&reference.tag, &reference.digest) {
            (Some(tag), None) if self.tag(reference).as_deref() != Some(digest) => {
                self.write_atomic(&self.tag_path(reference, tag), digest.as_bytes())
            }
            _ => Ok(()),
        }
    }

    /// The manifest digest `reference`'s tag last resolved to.
    pub fn tag(&self, reference: &Reference) -> Option<String> {
        let tag = reference.tag.as_deref()?;
        std::fs::read_to_string(self.tag_path(reference, tag)).ok().map(|s| s.trim().to_string())
    }

    /// The cached component of manifest `digest` in `reference`'s repository: its manifest and
    /// the path of its verified layer. The layer is hashed again, so a file damaged on disk is
    /// never handed out (it is removed instead).
    pub fn component(&self, reference: &Reference, digest: &str) -> Option<(OciImageManifest, PathBuf)> {
        let manifest_path = self.manifest_path(reference, digest)?;
        let bytes = std::fs::read(&manifest_path).ok()?;
        if sha256_digest(&bytes) != digest {
            let _ = std::fs::remove_file(&manifest_path);
            return None;
        }
        let manifest = parse_manifest(&bytes)?;
        let layer = manifest.layers.first()?;
        let path = self.blob_path(&layer.digest)?;
        let blob = std::fs::read(&path).ok()?;
        if sha256_digest(&blob) != layer.digest {
            tracing::warn!(blob = %path.display(), "cached blob does not match its digest; removed");
            let _ = std::fs::remove_file(&path);
            return None;
        }
        let _ =
            std::fs::File::options().write(true).open(&manifest_path).and_then(|f| f.set_modified(SystemTime::now()));
        Some((manifest, path))
    }

    /// Every cached component.
    pub fn list(&self) -> Vec<CacheEntry> {
        let mut files = Vec::new();
        walk_files(&self.root.join("manifests"), &mut files);
        let mut tags = Vec::new();
        walk_files(&self.root.join("tags"), &mut tags);
        let tag_of: Vec<(PathBuf, String, String)> = tags
            .iter()
            .filter_map(|p| {
                let digest = std::fs::read_to_string(p).ok()?;
                let rel = p.strip_prefix(self.root.join("tags")).ok()?;
                Some((rel.parent()?.to_path_buf(), rel.file_name()?.to_string_lossy().into_owned(), digest))
            })
            .collect();
        let mut entries: Vec<CacheEntry> = files
            .iter()
            .filter_map(|p| {
                let rel = p.strip_prefix(self.root.join("manifests")).ok()?;
                let repo_dir = rel.parent()?.to_path_buf();
                let hex = rel.file_name()?.to_str()?.strip_suffix(".json")?;
                let manifest_digest = format!("sha256:{hex}");
                let manifest = parse_manifest(&std::fs::read(p).ok()?)?;
                let layer = manifest.layers.first()?;
                let last_used = std::fs::metadata(p)
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
                    .map_or(0, |d| d.as_secs());
                let mut tags: Vec<String> = tag_of
                    .iter()
                    .filter(|(dir, _, d)| *dir == repo_dir && d.trim() == manifest_digest)
                    .map(|(_, t, _)| t.clone())
                    .collect();
                tags.sort();
                Some(CacheEntry {
                    repository: repo_dir.to_string_lossy().into_owned(),
                    manifest_digest,
                    layer_digest: layer.digest.clone(),
                    size: layer.size.max(0) as u64,
                    tags,
                    last_used,
                })
            })
            .collect();
        entries.sort_by(|a, b| (&a.repository, &a.manifest_digest).cmp(&(&b.repository, &b.manifest_digest)));
        entries
    }

    /// Removes components not used for `unused_for` (all of them with a zero duration; none
    /// without one), the tags that point at them, downloads left over, and every blob no
    /// remaining manifest refers to.
    pub fn gc(&self, unused_for: Option<Duration>, dry_run: bool) -> Result<GcReport, RegistryError> {
        let mut report = GcReport::default();
        let now = SystemTime::now();
        let mut manifests = Vec::new();
        walk_files(&self.root.join("manifests"), &mut manifests);
        let mut kept_blobs = std::collections::HashSet::new();
        let mut removed_manifests = std::collections::HashSet::new();
        for path in manifests {
            let stale = unused_for.is_some_and(|d| {
                std::fs::metadata(&path)
                    .and_then(|m| m.modified())
                    .is_ok_and(|t| now.duration_since(t).unwrap_or_default() >= d)
            });
            let manifest = std::fs::read(&path).ok().and_then(|b| parse_manifest(&b));
            let digest = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".json"))
                .map(|h| format!("sha256:{h}"))
                .unwrap_or_default();
            match manifest {
                Some(m) if !stale => {
                    kept_blobs.insert(m.config.digest.clone());
                    kept_blobs.extend(m.layers.iter().map(|l| l.digest.clone()));
                }
                _ => {
                    report.manifests.push(digest.clone());
                    removed_manifests.insert(digest);
                    if !dry_run {
                        std::fs::remove_file(&path).map_err(RegistryError::io(&path))?;
                    }
                }
            }
        }
        let mut tags = Vec::new();
        walk_files(&self.root.join("tags"), &mut tags);
        for t in tags {
            let points_at = std::fs::read_to_string(&t).unwrap_or_default();
            if removed_manifests.contains(points_at.trim()) && !dry_run {
                std::fs::remove_file(&t).map_err(RegistryError::io(&t))?;
            }
        }
        let mut blobs = Vec::new();
        walk_files(&self.root.join("blobs"), &mut blobs);
        walk_files(&self.root.join("tmp"), &mut blobs);
        for b in blobs {
            let digest = b.file_name().map(|n| format!("sha256:{}", n.to_string_lossy())).unwrap_or_default();
            let in_tmp = b.starts_with(self.root.join("tmp"));
            // A download younger than an hour may still be in progress in another process.
            let young = || {
                std::fs::metadata(&b)
                    .and_then(|m| m.modified())
                    .is_ok_and(|t| now.duration_since(t).unwrap_or_default() < Duration::from_secs(3600))
            };
            if (!in_tmp && kept_blobs.contains(&digest)) || (in_tmp && young()) {
                continue;
            }
            report.freed_bytes += std::fs::metadata(&b).map_or(0, |m| m.len());
            report.blobs.push(if in_tmp { b.display().to_string() } else { digest });
            if !dry_run {
                std::fs::remove_file(&b).map_err(RegistryError::io(&b))?;
            }
        }
        Ok(report)
    }
}
