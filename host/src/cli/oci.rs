//! `nereid push`, `nereid pull`, `nereid cache ls|gc` and `nereid registry serve|tags`.
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Subcommand};

use nereid::components::Components;
use nereid_registry::server::{ServerOptions, UsersFile};
use nereid_registry::{ComponentCache, HostSettings, Reference, RegistryClient};

#[derive(Args)]
pub struct RegistryArgs {
    /// Speak plain HTTP to this registry host[:port] (repeatable; localhost always is).
    #[arg(long, value_name = "HOST[:PORT]")]
    insecure: Vec<String>,
}

impl RegistryArgs {
    fn client(&self, cache_dir: Option<&Path>) -> anyhow::Result<RegistryClient> {
        let given =
            self.insecure.iter().map(|h| (h.clone(), HostSettings { insecure: true, ..Default::default() })).collect();
        let settings = nereid::config::registries::settings(&given)?;
        Ok(RegistryClient::new(settings, ComponentCache::new(Components::cache_root(cache_dir))))
    }
}

#[derive(Args)]
pub struct PushArgs {
    /// The component (.wasm).
    component: PathBuf,
    /// Where to push it: oci://host[:port]/repository:tag
    reference: String,
    #[command(flatten)]
    registry: RegistryArgs,
    /// Print JSON (with the manifest digest).
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct PullArgs {
    /// oci://host[:port]/repository:tag or oci://host[:port]/repository@sha256:<hex>
    reference: String,
    /// Where to write the component.
    #[arg(long, short)]
    output: PathBuf,
    #[command(flatten)]
    registry: RegistryArgs,
    /// Print JSON (with the digests).
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
pub enum CacheCommand {
    /// The components in the local registry cache.
    Ls {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Remove components not used for a while, downloads left over, and unreferenced blobs.
    Gc {
        /// Also remove components unused for this long (e.g. 30d, 12h, 10m, 0s = all).
        #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
        unused_for: Option<Duration>,
        /// Only list what would be removed.
        #[arg(long)]
        dry_run: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
pub enum RegistryCommand {
    /// Serve an OCI registry (distribution spec: pull, push, tags list) from a directory.
    Serve {
        /// Directory of the registry's blobs and repositories (created if missing).
        #[arg(long)]
        root: PathBuf,
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:5000")]
        addr: String,
        /// Users and what they may do: TOML `[users.NAME] password_bcrypt = "$2y$..."` (the hash
        /// `htpasswd -nbB NAME PASSWORD` prints), with optional `pull`, `push`, `delete` lists of
        /// repositories (names, or prefixes ending in `*`; a user with no list may do
        /// everything). Without users, anyone may push and pull.
        #[arg(long, value_name = "FILE")]
        users: Option<PathBuf>,
        /// An htpasswd file of bcrypt hashes (`htpasswd -B`, as distribution reads): users who may
        /// do everything, or who take their lists from --users when it names them without a
        /// password.
        #[arg(long, value_name = "FILE")]
        htpasswd: Option<PathBuf>,
        /// With --users: let anyone pull (pushing still needs a user).
        #[arg(long)]
        anonymous_pull: bool,
        /// Largest blob an upload may make, in MiB.
        #[arg(long, default_value_t = 1024, value_name = "MIB")]
        max_blob_mib: u64,
        /// Seconds an upload session is kept without a request.
        #[arg(long, default_value_t = 600)]
        upload_ttl_secs: u64,
        #[command(flatten)]
        http: super::HttpLimitArgs,
        /// Serve HTTPS with this PEM certificate chain (with --tls-key).
        #[arg(long, value_name = "PEM", requires = "tls_key")]
        tls_cert: Option<PathBuf>,
        /// The PEM private key of --tls-cert.
        #[arg(long, value_name = "PEM", requires = "tls_cert")]
        tls_key: Option<PathBuf>,
        /// Serve plain HTTP on an address that is not loopback (refused otherwise).
        #[arg(long)]
        allow_plaintext: bool,
    },
    /// A repository's tags.
    Tags {
        /// oci://host[:port]/repository
        reference: String,
        #[command(flatten)]
        registry: RegistryArgs,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

/// `30d`, `12h`, `10m`, `45s` or a number of seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let (number, unit) = match text.char_indices().find(|(_, c)| c.is_ascii_alphabetic()) {
        Some((i, _)) => text.split_at(i),
        None => (text, "s"),
    };
    let n: f64 = number.trim().parse().map_err(|_| format!("`{text}` is not a duration like 30d, 12h, 10m or 0s"))?;
    let scale = match unit {
        "s" => 1.0,
        "m" => 60.0,
        "h" => 3600.0,
        "d" => 86400.0,
        _ => return Err(format!("`{unit}` is not a unit: use s, m, h or d")),
    };
    if !(n.is_finite() && n >= 0.0) {
        return Err(format!("`{text}` is negative"));
    }
    Ok(Duration::from_secs_f64(n * scale))
}

fn tokio() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread().enable_all().build()?)
}

/// A byte progress bar on a terminal (hidden otherwise).
pub fn transfer_bar(prefix: String) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{prefix} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.set_prefix(prefix);
    bar
}

pub fn push(args: PushArgs, cache_dir: Option<&Path>) -> anyhow::Result<()> {
    let reference = Reference::parse(&args.reference)?;
    let bytes = nereid::files::read_limited(&args.component, nereid::files::MAX_COMPONENT_BYTES)
        .with_context(|| format!("reading {}", args.component.display()))?;
    let client = args.registry.client(cache_dir)?;
    let bar = transfer_bar(format!("push {}", reference.repository));
    let progress = |done: u64, total: u64| {
        bar.set_length(total);
        bar.set_position(done);
    };
    let pushed = tokio()?.block_on(client.push(bytes, &reference, Some(&progress)))?;
    bar.finish_and_clear();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&pushed)?);
    } else {
        println!(
            "pushed {} ({} bytes{})",
            reference,
            pushed.size,
            if pushed.layer_existed { ", layer already there" } else { "" }
        );
        println!("digest {}", pushed.manifest_digest);
    }
    Ok(())
}

pub fn pull(args: PullArgs, cache_dir: Option<&Path>) -> anyhow::Result<()> {
    let reference = Reference::parse(&args.reference)?;
    let client = args.registry.client(cache_dir)?;
    let bar = transfer_bar(format!("pull {}", reference.repository));
    let progress = |done: u64, total: u64| {
        bar.set_length(total);
        bar.set_position(done);
    };
    let pulled = tokio()?.block_on(client.pull(&reference, Some(&progress)))?;
    bar.finish_and_clear();
    std::fs::copy(&pulled.path, &args.output).with_context(|| format!("writing {}", args.output.display()))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&pulled)?);
    } else {
        println!(
            "pulled {} ({} bytes{})",
            pulled.reference,
            pulled.size,
            if pulled.from_cache { ", from the cache" } else { "" }
        );
        println!("wrote  {}", args.output.display());
    }
    Ok(())
}

pub fn cache(cmd: CacheCommand, cache_dir: Option<&Path>) -> anyhow::Result<()> {
    let cache = ComponentCache::new(Components::cache_root(cache_dir));
    match cmd {
        CacheCommand::Ls { json } => {
            let entries = cache.list();
            if json {
                println!("{}", serde_json::to_string_pretty(&entries)?);
                return Ok(());
            }
            println!("{:<40} {:<16} {:>10}  {:<19}  manifest", "repository", "tags", "bytes", "last used");
            for e in entries {
                let when = chrono::DateTime::from_timestamp(e.last_used as i64, 0)
                    .map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
                    .unwrap_or_default();
                let tags = if e.tags.is_empty() { "-".to_string() } else { e.tags.join(",") };
                println!("{:<40} {:<16} {:>10}  {:<19}  {}", e.repository, tags, e.size, when, e.manifest_digest);
            }
        }
        CacheCommand::Gc { unused_for, dry_run, json } => {
            let report = cache.gc(unused_for, dry_run)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                let verb = if dry_run { "would remove" } else { "removed" };
                println!(
                    "{verb} {} components and {} blobs ({} bytes)",
                    report.manifests.len(),
                    report.blobs.len(),
                    report.freed_bytes
                );
            }
        }
    }
    Ok(())
}

pub fn registry(cmd: RegistryCommand, cache_dir: Option<&Path>) -> anyhow::Result<()> {
    match cmd {
        RegistryCommand::Serve {
            root,
            addr,
            users,
            htpasswd,
            anonymous_pull,
            max_blob_mib,
            upload_ttl_secs,
            http,
            tls_cert,
            tls_key,
            allow_plaintext,
        } => {
            let tls = match (tls_cert, tls_key) {
                (Some(cert), Some(key)) => {
                    Some(nereid_net::tls::ServerTls { cert, key, client_ca: None, client_auth: Default::default() })
                }
                _ => {
                    nereid_net::tls::check_plaintext("the registry", &addr, allow_plaintext, "--allow-plaintext")?;
                    None
                }
            };
            let mut users = users.as_deref().map(UsersFile::read).transpose()?.unwrap_or_default();
            if let Some(file) = &htpasswd {
                users.add_htpasswd(file)?;
            } else if let Some((name, _)) = users.users.iter().find(|(_, u)| u.password_bcrypt.is_none()) {
                anyhow::bail!("user `{name}` of --users has no password_bcrypt (and no --htpasswd gives one)");
            }
            anyhow::ensure!(max_blob_mib >= 1, "--max-blob-mib must be at least 1");
            anyhow::ensure!(upload_ttl_secs >= 1, "--upload-ttl-secs must be at least 1");
            let options = ServerOptions {
                users,
                anonymous_pull,
                max_blob_bytes: max_blob_mib.saturating_mul(1 << 20),
                upload_ttl: std::time::Duration::from_secs(upload_ttl_secs),
                limits: http.limits()?,
                tls,
                ..ServerOptions::open(root.clone())
            };
            let rt = tokio()?;
            rt.block_on(async {
                let listener = tokio::net::TcpListener::bind(&addr).await.with_context(|| format!("binding {addr}"))?;
                tracing::info!(root = %root.display(), "registry listening on {}", listener.local_addr()?);
                nereid_registry::server::serve_until(listener, options, nereid_net::terminated()).await?;
                Ok(())
            })
        }
        RegistryCommand::Tags { reference, registry, json } => {
            let reference = Reference::parse(&reference)?;
            let tags = tokio()?.block_on(registry.client(cache_dir)?.tags(&reference))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&tags)?);
            } else {
                for t in tags {
                    println!("{t}");
                }
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30d"), Ok(Duration::from_secs(30 * 86400)));
        assert_eq!(parse_duration("1.5h"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        assert!(parse_duration("3w").is_err() && parse_duration("-1s").is_err() && parse_duration("x").is_err());
    }
}
