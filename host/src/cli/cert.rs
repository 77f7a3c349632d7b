//! `nereid cert`: a CA and the certificates it signs for a fleet (the cloud, the registry, each
//! edge), for TLS and mutual TLS.
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Subcommand;
use nereid_net::pki::{self, Issued};

#[derive(Subcommand)]
pub enum CertCommand {
    /// Make a CA: `<out>/ca.pem` (give it to every host that must trust the fleet) and
    /// `<out>/ca.key` (keep it where certificates are issued).
    Ca {
        /// Directory to write into (created if missing); existing files are not overwritten.
        #[arg(long)]
        out: PathBuf,
        /// The CA's common name.
        #[arg(long, default_value = "nereid fleet CA")]
        name: String,
        /// Days the CA is valid.
        #[arg(long, default_value_t = 3650)]
        days: i64,
    },
    /// Issue a certificate for a host: `<out>/<name>.pem` and `<out>/<name>.key`. It names the
    /// host (DNS name and common name: an edge's node name, which the cloud reads when it knows
    /// nodes by certificate) and serves as both a server's and a client's certificate.
    Issue {
        /// The host's name: a node name for an edge, a DNS name for the cloud or the registry.
        name: String,
        /// The directory of `ca.pem` and `ca.key`.
        #[arg(long)]
        ca: PathBuf,
        /// Directory to write into [default: the CA's].
        #[arg(long)]
        out: Option<PathBuf>,
        /// More names the certificate is valid for: DNS names or IP addresses (repeatable).
        #[arg(long = "san", value_name = "NAME_OR_IP")]
        sans: Vec<String>,
        /// Days the certificate is valid.
        #[arg(long, default_value_t = 365)]
        days: i64,
    },
}

pub fn run(cmd: CertCommand) -> anyhow::Result<()> {
    match cmd {
        CertCommand::Ca { out, name, days } => {
            let ca = pki::authority(&name, days)?;
            write_pair(&out, "ca", &ca)?;
            println!("wrote {} and {}", out.join("ca.pem").display(), out.join("ca.key").display());
        }
        CertCommand::Issue { name, ca, out, sans, days } => {
            let read = |file: &str| {
                let path = ca.join(file);
                std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))
            };
            let authority = Issued { cert_pem: read("ca.pem")?, key_pem: read("ca.key")? };
            // The name becomes a file name: the node-name rule keeps it one path component.
            if name.contains('/') || name.starts_with('.') || name.is_empty() {
                anyhow::bail!("`{name}` cannot name a certificate file");
            }
            let issued = pki::issue(&authority, &name, &sans, days)?;
            let out = out.unwrap_or(ca);
            write_pair(&out, &name, &issued)?;
            println!(
                "wrote {} and {}",
                out.join(format!("{name}.pem")).display(),
                out.join(format!("{name}.key")).display()
            );
        }
    }
    Ok(())
}

/// Writes `<stem>.pem` and `<stem>.key` (readable by the owner only), refusing to overwrite.
pub(crate) fn write_pair(dir: &Path, stem: &str, issued: &Issued) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    for (file, text, mode) in
        [(format!("{stem}.pem"), &issued.cert_pem, 0o644), (format!("{stem}.key"), &issued.key_pem, 0o600)]
    {
        let path = dir.join(file);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&path)
            .with_context(|| format!("creating {} (an existing file is not overwritten)", path.display()))?;
        f.write_all(text.as_bytes()).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}
