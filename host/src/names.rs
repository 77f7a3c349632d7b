//! The one rule for every name that becomes a file name, a URL segment or a metrics label: jobs,
//! nodes, services and models. Checked where a name enters (a config file, the CLI, the API).
use std::fmt;

/// Longest name: short enough for any file system with room to spare, and for a label.
pub const MAX_NAME: usize = 64;

/// What a name is the name of, for messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Job,
    Node,
    Service,
    Model,
    Plugin,
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Kind::Job => "job",
            Kind::Node => "node",
            Kind::Service => "service",
            Kind::Model => "model",
            Kind::Plugin => "plugin",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind} name {shown}: {why}")]
pub struct NameError {
    pub kind: Kind,
    /// The name as it may be shown (quoted, cut short).
    shown: String,
    why: &'static str,
}

/// Checks `name`: 1 to [`MAX_NAME`] ASCII letters, digits, `-` and `_`, starting with a letter
/// or digit.
pub fn check(kind: Kind, name: &str) -> Result<(), NameError> {
    let why = if name.is_empty() {
        Some("is empty")
    } else if name.len() > MAX_NAME {
        Some("is longer than 64 characters")
    } else if !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') {
        Some("may hold only letters, digits, '-' and '_'")
    } else if !name.as_bytes()[0].is_ascii_alphanumeric() {
        Some("must start with a letter or a digit")
    } else {
        None
    };
    match why {
        None => Ok(()),
        Some(why) => {
            // Quoted with escapes and cut short: a hostile name must not forge log lines.
            let cut: String = name.chars().take(MAX_NAME).collect();
            let shown = if cut.len() < name.len() { format!("{cut:?}...") } else { format!("{cut:?}") };
            Err(NameError { kind, shown, why })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_that_could_escape_a_path_a_url_or_a_label_are_refused() {
        for good in ["digits", "edge-1", "a_b", "0", &"x".repeat(64)] {
            assert_eq!(check(Kind::Job, good), Ok(()), "{good}");
        }
        for bad in ["", "../../tmp/x", "a/b", "a.b", "-flag", "_x", "a\"b", "a\nb", "é", &"x".repeat(65)] {
            let e = check(Kind::Job, bad).expect_err(bad);
            assert!(!e.to_string().contains('\n'), "{e}");
        }
        assert_eq!(
            check(Kind::Node, "a b").expect_err("space").to_string(),
            "node name \"a b\": may hold only letters, digits, '-' and '_'"
        );
    }
}
