//! Secrets in configuration (tokens): given inline, in a file (`*_file`, e.g. a mounted
//! Kubernetes Secret), or in an environment variable (`*_env`). Held as [`Secret`], which never
//! prints its value (Debug shows `<secret>`) and is never serialized back.
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize, Serializer};

use super::FieldError;

/// Largest secret file read.
const MAX_SECRET_FILE: u64 = 64 << 10;

/// A token or password: its value is only reachable through [`Secret::expose`].
#[derive(Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_empty() { "<none>" } else { "<secret>" })
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("<secret>")
    }
}

/// Fills `value` from `file` (relative to `base`) or the variable `env` when one of them is
/// given; at most one of the three may be. `key` names the inline key (`token`): errors name
/// `<key>_file` or `<key>_env` as the one at fault.
pub fn resolve(
    key: &str,
    value: &mut Secret,
    file: Option<&PathBuf>,
    env: Option<&String>,
    base: &Path,
) -> Result<(), FieldError> {
    let given = usize::from(!value.is_empty()) + usize::from(file.is_some()) + usize::from(env.is_some());
    if given > 1 {
        return Err(FieldError {
            key: key.to_string(),
            message: format!("give one of `{key}`, `{key}_file` and `{key}_env`"),
        });
    }
    if let Some(file) = file {
        let path = base.join(file);
        let fail = |message: String| FieldError { key: format!("{key}_file"), message };
        let meta = std::fs::metadata(&path).map_err(|e| fail(format!("{}: {e}", path.display())))?;
        if !meta.is_file() || meta.len() > MAX_SECRET_FILE {
            return Err(fail(format!("{} is not a regular file of at most {MAX_SECRET_FILE} bytes", path.display())));
        }
        let text = std::fs::read_to_string(&path).map_err(|e| fail(format!("{}: {e}", path.display())))?;
        // A file written by `echo` ends with a newline that is not part of the secret.
        let text = text.trim_end_matches(['\n', '\r']);
        if text.is_empty() {
            return Err(fail(format!("{} is empty", path.display())));
        }
        *value = Secret::new(text);
    }
    if let Some(var) = env {
        let v = std::env::var(var).ok().filter(|v| !v.is_empty()).ok_or_else(|| FieldError {
            key: format!("{key}_env"),
            message: format!("the environment variable `{var}` is not set"),
        })?;
        *value = Secret::new(v);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_secret_comes_from_one_place_and_never_prints() {
        let dir = tempfile::tempdir().expect("tmp");
        std::fs::write(dir.path().join("token"), "from-a-file\n").expect("write");
        let mut s = Secret::default();
        resolve("token", &mut s, Some(&PathBuf::from("token")), None, dir.path()).expect("file");
        assert_eq!(s.expose(), "from-a-file");
        assert_eq!(format!("{s:?}"), "<secret>");
        assert_eq!(serde_json::to_string(&s).expect("json"), "\"<secret>\"");

        let mut both = Secret::new("inline");
        let e = resolve("token", &mut both, Some(&PathBuf::from("token")), None, dir.path()).expect_err("two");
        assert_eq!(e.key, "token");
        // A variable only this test sets.
        std::env::set_var("NEREID_TEST_SECRET_FROM_ENV", "from-the-environment");
        let mut s = Secret::default();
        resolve("token", &mut s, None, Some(&"NEREID_TEST_SECRET_FROM_ENV".to_string()), dir.path()).expect("env");
        assert_eq!(s.expose(), "from-the-environment");
        let mut s = Secret::default();
        let e = resolve("token", &mut s, None, Some(&"NEREID_TEST_UNSET_VARIABLE".to_string()), dir.path())
            .expect_err("unset");
        assert_eq!(e.key, "token_env");
        let e = resolve("token", &mut s, Some(&PathBuf::from("missing")), None, dir.path()).expect_err("missing");
        assert_eq!(e.key, "token_file");
        assert!(e.message.contains("missing"), "{}", e.message);
    }
}
