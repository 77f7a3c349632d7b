//! `cargo xtask deps`: the host's modules must not import each other in a circle. Each file of
//! `host/src` is read for the modules it names (`crate::a::b`, `super::x`); the graph is taken
//! at two levels, and each must be acyclic:
//! - the top-level modules (`config`, `protocol`, `cloud`, `edge`, ...: a directory counts as
//!   one module, its files together);
//! - within each directory, its sibling modules (a directory's own `mod.rs` is left out: it is
//!   the module the siblings make up, declaring them and re-exporting from them).
//!   The binary's `cli` is the top of the graph and checked the same way.
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The module path of a file under `src` (`edge/services/mod.rs` -> `edge::services`).
fn module_of(src: &Path, file: &Path) -> Vec<String> {
    let rel = file.strip_prefix(src).unwrap_or(file);
    let mut parts: Vec<String> = rel.iter().map(|p| p.to_string_lossy().trim_end_matches(".rs").to_string()).collect();
    if parts.last().is_some_and(|p| p == "mod" || p == "lib" || p == "main") {
        parts.pop();
    }
    parts
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) -> Result<(), String> {
    let entries = std::fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            rust_files(&p, out)?;
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
    Ok(())
}

/// The modules `text` (the file of module `this`) names, as absolute module paths (the code of
/// `#[cfg(test)]` modules included: a test's imports are imports too; comment lines left out: a
/// doc link is no import).
fn references(this: &[String], is_mod_rs: bool, text: &str) -> BTreeSet<Vec<String>> {
    let mut out = BTreeSet::new();
    let ident = |c: char| c.is_ascii_alphanumeric() || c == '_';
    let bytes: Vec<char> = text.chars().collect();
    let mut i = 0;
    while i < bytes.len() {
        let rest: String = bytes[i..bytes.len().min(i + 8)].iter().collect();
        let at_word = i == 0 || !ident(bytes[i - 1]);
        let (prefix, base): (usize, Vec<String>) = if at_word && rest.starts_with("crate::") {
            (7, Vec::new())
        } else if at_word && rest.starts_with("super::") {
            // In `a/b.rs` (module a::b), `super` is `a`; in `a/b/mod.rs` (module a::b) too.
            let _ = is_mod_rs;
            let mut parent = this.to_vec();
            parent.pop();
            (7, parent)
        } else {
            i += 1;
            continue;
        };
        let mut j = i + prefix;
        let mut path = base;
        loop {
            let start = j;
            while j < bytes.len() && ident(bytes[j]) {
                j += 1;
            }
            if j == start {
                break;
            }
            let seg: String = bytes[start..j].iter().collect();
            if seg == "super" {
                path.pop();
            } else {
                path.push(seg);
            }
            if bytes.get(j) == Some(&':')
                && bytes.get(j + 1) == Some(&':')
                && bytes.get(j + 2).is_some_and(|c| ident(*c))
            {
                j += 2;
            } else {
                break;
            }
        }
        out.insert(path);
        i = j.max(i + 1);
    }
    out
}

/// A cycle in `graph`, if there is one.
fn cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        n: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        state: &mut BTreeMap<String, u8>,
        stack: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        state.insert(n.to_string(), 1);
        stack.push(n.to_string());
        for m in graph.get(n).into_iter().flatten() {
            match state.get(m).copied().unwrap_or(0) {
                1 => {
                    let from = stack.iter().position(|s| s == m).unwrap_or(0);
                    let mut c = stack[from..].to_vec();
                    c.push(m.clone());
                    return Some(c);
                }
                0 => {
                    if let Some(c) = visit(m, graph, state, stack) {
                        return Some(c);
                    }
                }
                _ => {}
            }
        }
        stack.pop();
        state.insert(n.to_string(), 2);
        None
    }
    let mut state = BTreeMap::new();
    for n in graph.keys() {
        if state.get(n).copied().unwrap_or(0) == 0 {
            if let Some(c) = visit(n, graph, &mut state, &mut Vec::new()) {
                return Some(c);
            }
        }
    }
    None
}

/// Checks `src` (the host's `src`); returns the top-level graph as text, or the first circle.
pub fn check(src: &Path) -> Result<String, String> {
    let mut files = Vec::new();
    rust_files(src, &mut files)?;
    files.sort();
    // (module of the file, whether it is a mod.rs/lib.rs/main.rs, the modules it names)
    let mut modules: Vec<(Vec<String>, bool, BTreeSet<Vec<String>>)> = Vec::new();
    let known: BTreeSet<Vec<String>> = files.iter().map(|f| module_of(src, f)).collect();
    for f in &files {
        let text = std::fs::read_to_string(f).map_err(|e| format!("{}: {e}", f.display()))?;
        let text: String = text.lines().filter(|l| !l.trim_start().starts_with("//")).collect::<Vec<_>>().join("\n");
        let this = module_of(src, f);
        let root_file = f.file_name().is_some_and(|n| n == "mod.rs" || n == "lib.rs" || n == "main.rs");
        // A path names the longest known module it starts with.
        let refs = references(&this, root_file, &text)
            .into_iter()
            .filter_map(|p| (0..=p.len()).rev().map(|k| p[..k].to_vec()).find(|m| !m.is_empty() && known.contains(m)))
            .collect();
        modules.push((this, root_file, refs));
    }
    let mut levels: BTreeMap<String, BTreeMap<String, BTreeSet<String>>> = BTreeMap::new();
    for (this, root_file, refs) in &modules {
        // Top level.
        if let Some(top) = this.first() {
            let edges = levels.entry(String::new()).or_default().entry(top.clone()).or_default();
            edges.extend(refs.iter().filter_map(|r| r.first()).filter(|t| *t != top).cloned());
        }
        // Siblings in each directory along the file's path.
        for depth in 1..this.len() {
            let dir = this[..depth].join("::");
            let me = &this[depth];
            if *root_file && depth == this.len() - 1 && this.len() == depth + 1 {
                // A child directory's mod.rs speaks for that child: counted below as `me`.
            }
            let edges = levels.entry(dir.clone()).or_default().entry(me.clone()).or_default();
            for r in refs {
                if r.len() > depth && r[..depth] == this[..depth] && r[depth] != *me {
                    edges.insert(r[depth].clone());
                }
            }
        }
        let _ = root_file;
    }
    let mut report = String::new();
    for (level, graph) in &levels {
        let name = if level.is_empty() { "host/src".to_string() } else { level.replace("::", "/") };
        if let Some(c) = cycle(graph) {
            return Err(format!("import circle among the modules of {name}: {}", c.join(" -> ")));
        }
        if level.is_empty() {
            for (m, to) in graph {
                report.push_str(&format!("{m} -> {}\n", to.iter().cloned().collect::<Vec<_>>().join(", ")));
            }
        }
    }
    Ok(format!("no import circle among the modules of host/src ({} levels checked)\n{report}", levels.len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree(files: &[(&str, &str)]) -> tempfile_dir::Dir {
        let dir = tempfile_dir::Dir::new();
        for (path, text) in files {
            let p = dir.0.join(path);
            std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
            std::fs::write(p, text).expect("write");
        }
        dir
    }

    /// A directory removed when dropped (xtask has no dependencies).
    mod tempfile_dir {
        pub struct Dir(pub std::path::PathBuf);
        impl Dir {
            pub fn new() -> Dir {
                let d = std::env::temp_dir().join(format!(
                    "xtask-deps-{}-{:?}",
                    std::process::id(),
                    std::thread::current().id()
                ));
                let _ = std::fs::remove_dir_all(&d);
                Dir(d)
            }
        }
        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }

    #[test]
    fn circles_are_found_at_both_levels_and_doc_links_are_no_imports() {
        let ok = tree(&[
            ("lib.rs", "pub mod a;\npub mod b;"),
            ("a.rs", "use crate::b::X;"),
            ("b.rs", "//! see [`crate::a`]\npub struct X;"),
        ]);
        assert!(check(&ok.0).is_ok());
        let top = tree(&[
            ("lib.rs", ""),
            ("a.rs", "use crate::b::X;"),
            ("b/mod.rs", "mod c;"),
            ("b/c.rs", "fn f() { crate::a::g() }"),
        ]);
        let e = check(&top.0).expect_err("a -> b -> a");
        assert!(e.contains("a -> b -> a") || e.contains("b -> a -> b"), "{e}");
        let inner = tree(&[
            ("lib.rs", ""),
            ("e/mod.rs", "mod x;\nmod y;"),
            ("e/x.rs", "use super::y::Y;"),
            ("e/y.rs", "fn f(_: super::x::X) {}"),
        ]);
        let e = check(&inner.0).expect_err("x -> y -> x");
        assert!(e.contains("modules of e"), "{e}");
    }
}
