//! Component references: a reference names a component as `oci://host[:port]/repository[:tag]` or
//! `oci://host[:port]/repository@sha256:<64 hex>`, with the grammar of the OCI distribution spec
//! (repository path components `[a-z0-9]+([._-][a-z0-9]+)*` separated by `/`, tags
//! `[A-Za-z0-9_][A-Za-z0-9._-]{0,127}`). A reference without tag or digest means tag `latest`.
use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid component reference `{reference}`: {reason}")]
pub struct ReferenceError {
    pub reference: String,
    pub reason: String,
}

/// A parsed `oci://` reference.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Reference {
    /// `host[:port]`.
    pub registry: String,
    pub repository: String,
    pub tag: Option<String>,
    /// `sha256:<hex>`.
    pub digest: Option<String>,
}

pub(crate) fn is_path_component(c: &str) -> bool {
    let bytes = c.as_bytes();
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    !bytes.is_empty()
        && alnum(bytes[0])
        && alnum(bytes[bytes.len() - 1])
        && bytes.windows(2).all(|w| alnum(w[0]) || alnum(w[1]))
        && bytes.iter().all(|b| alnum(*b) || matches!(b, b'.' | b'_' | b'-'))
}

pub(crate) fn is_tag(t: &str) -> bool {
    let b = t.as_bytes();
    !b.is_empty()
        && b.len() <= 128
        && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
        && b.iter().all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'))
}

fn is_registry(r: &str) -> bool {
    let (host, port) = match r.rsplit_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (r, None),
    };
    let host_ok = !host.is_empty()
        && host.split('.').all(|l| !l.is_empty() && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'));
    host_ok && port.is_none_or(|p| p.parse::<u16>().is_ok())
}

impl Reference {
    pub fn parse(input: &str) -> Result<Reference, ReferenceError> {
        let fail = |reason: &str| ReferenceError { reference: input.to_string(), reason: reason.to_string() };
        let rest = input.strip_prefix("oci://").ok_or_else(|| fail("it must start with oci://"))?;
        let (registry, path) = rest.split_once('/').ok_or_else(|| fail("expected oci://host[:port]/repository"))?;
        if !is_registry(registry) {
            return Err(fail("the registry must be host or host:port"));
        }
        let (name_and_tag, digest) = match path.split_once('@') {
            Some((n, d)) => (n, Some(d)),
            None => (path, None),
        };
        if let Some(d) = digest {
            let hex = d.strip_prefix("sha256:").ok_or_else(|| fail("only sha256 digests are supported"))?;
            if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
                return Err(fail("a sha256 digest is 64 lowercase hex digits"));
            }
        }
        // A ':' after the last '/' starts the tag.
        let last_slash = name_and_tag.rfind('/').map_or(0, |i| i + 1);
        let (repository, tag) = match name_and_tag[last_slash..].find(':') {
            Some(i) => (&name_and_tag[..last_slash + i], Some(&name_and_tag[last_slash + i + 1..])),
            None => (name_and_tag, None),
        };
        if repository.is_empty() || !repository.split('/').all(is_path_component) {
            return Err(fail("the repository must be lowercase path components like `ns/agg`"));
        }
        if let Some(t) = tag {
            if !is_tag(t) {
                return Err(fail("a tag is up to 128 of [A-Za-z0-9._-], not starting with . or -"));
            }
        }
        let tag = match (tag, digest) {
            (None, None) => Some("latest".to_string()),
            (t, _) => t.map(str::to_string),
        };
        Ok(Reference {
            registry: registry.to_string(),
            repository: repository.to_string(),
            tag,
            digest: digest.map(str::to_string),
        })
    }
}

impl Reference {
    /// The same component pinned to manifest `digest` (the tag is dropped).
    pub fn pinned(&self, digest: &str) -> Reference {
        Reference { tag: None, digest: Some(digest.to_string()), ..self.clone() }
    }

    /// The tag or digest this reference names, as the registry API takes it.
    pub fn tag_or_digest(&self) -> &str {
        self.digest.as_deref().or(self.tag.as_deref()).unwrap_or("latest")
    }

    /// `host[:port]/repository` without the scheme, tag or digest.
    pub fn repository_path(&self) -> String {
        format!("{}/{}", self.registry, self.repository)
    }

    pub(crate) fn to_oci(&self) -> oci_client::Reference {
        match &self.digest {
            Some(d) => oci_client::Reference::with_digest(self.registry.clone(), self.repository.clone(), d.clone()),
            None => oci_client::Reference::with_tag(
                self.registry.clone(),
                self.repository.clone(),
                self.tag.clone().unwrap_or_else(|| "latest".into()),
            ),
        }
    }
}

/// Whether `input` is written as a registry reference (rather than a file path).
pub fn is_reference(input: &str) -> bool {
    input.starts_with("oci://")
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "oci://{}/{}", self.registry, self.repository)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

impl std::str::FromStr for Reference {
    type Err = ReferenceError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Reference::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEX: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn parses_tags_digests_and_ports() {
        let r = Reference::parse("oci://127.0.0.1:5000/ns/fedavg:0.1.0").expect("valid");
        assert_eq!(
            (r.registry.as_str(), r.repository.as_str(), r.tag.as_deref(), r.digest.as_deref()),
            ("127.0.0.1:5000", "ns/fedavg", Some("0.1.0"), None)
        );
        let d = Reference::parse(&format!("oci://ghcr.io/a/b@sha256:{HEX}")).expect("valid");
        assert_eq!((d.tag, d.digest), (None, Some(format!("sha256:{HEX}"))));
        let latest = Reference::parse("oci://localhost/agg").expect("valid");
        assert_eq!(latest.tag.as_deref(), Some("latest"));
        let both = format!("oci://localhost:80/agg:v1@sha256:{HEX}");
        assert_eq!(Reference::parse(&both).expect("valid").to_string(), both);
    }

    #[test]
    fn refuses_what_the_spec_refuses() {
        for bad in [
            "fedavg.wasm",
            "oci://localhost",
            "oci://localhost/Agg:1",
            "oci://localhost/agg:.hidden",
            "oci://localhost/agg@sha256:abc",
            "oci://localhost/agg@md5:0123",
            "oci://local host/agg",
            "oci://localhost:99999/agg",
            "oci://localhost/a//b",
            "oci://localhost/-a",
        ] {
            let e = Reference::parse(bad).expect_err(bad);
            assert!(e.to_string().starts_with(&format!("invalid component reference `{bad}`")), "{e}");
        }
    }
}
