//! Certificates for a fleet (`nereid cert`): a CA, and certificates it signs for the cloud, the
//! registry and each edge. A node's certificate names it (DNS subject alternative name and common
//! name, which is how the cloud knows an edge by its certificate) and serves both as a server's
//! and as a client's, so one pair per node is enough for mutual TLS.
use chrono::Datelike;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    SanType,
};

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("making a certificate: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("`{0}` is neither a DNS name nor an IP address")]
    Name(String),
}

/// A certificate and its private key, both PEM.
#[derive(Debug, Clone)]
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
}

/// Valid from yesterday (clocks of a fleet differ) for `days` days.
fn validity(days: i64) -> (chrono::NaiveDate, chrono::NaiveDate) {
    let today = chrono::Utc::now().date_naive();
    (today - chrono::Duration::days(1), today + chrono::Duration::days(days.max(1)))
}

fn set_validity(params: &mut CertificateParams, (from, until): (chrono::NaiveDate, chrono::NaiveDate)) {
    let ymd = |d: chrono::NaiveDate| rcgen::date_time_ymd(d.year(), d.month() as u8, d.day() as u8);
    params.not_before = ymd(from);
    params.not_after = ymd(until);
}

/// A new CA named `name`, valid for `days`.
pub fn authority(name: &str, days: i64) -> Result<Issued, PkiError> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    set_validity(&mut params, validity(days));
    let cert = params.self_signed(&key)?;
    Ok(Issued { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
}

/// A certificate for `name` (and the other DNS names or IP addresses in `also`), signed by the
/// CA `ca`, valid for `days`, for servers and clients alike.
pub fn issue(ca: &Issued, name: &str, also: &[String], days: i64) -> Result<Issued, PkiError> {
    issue_between(ca, name, also, validity(days))
}

/// As [`issue`], valid between two dates.
pub(crate) fn issue_between(
    ca: &Issued,
    name: &str,
    also: &[String],
    valid: (chrono::NaiveDate, chrono::NaiveDate),
) -> Result<Issued, PkiError> {
    let ca_key = KeyPair::from_pem(&ca.key_pem)?;
    let issuer = Issuer::from_ca_cert_pem(&ca.cert_pem, ca_key)?;
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name.push(DnType::CommonName, name);
    let mut sans = Vec::new();
    for n in std::iter::once(name).chain(also.iter().map(String::as_str)) {
        let san = match n.parse::<std::net::IpAddr>() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => SanType::DnsName(n.try_into().map_err(|_| PkiError::Name(n.to_string()))?),
        };
        if !sans.contains(&san) {
            sans.push(san);
        }
    }
    params.subject_alt_names = sans;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    set_validity(&mut params, valid);
    let cert = params.signed_by(&key, &issuer)?;
    Ok(Issued { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
}
