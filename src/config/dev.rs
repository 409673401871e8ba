//! `serve --dev`: everything a vault needs on a laptop, generated once into a data directory: a
//! root key file, a TLS CA with a server certificate and one admin and one auditor client
//! certificate, a `sim` TEE signing key, and the config that ties them together.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

use super::{
    AttestConfig, AuditConfig, Config, ConfigError, GrantsConfig, RolesConfig, SealConfig,
    SimConfig, StorageConfig, TlsConfig, cert_fingerprint,
};
use crate::attest::sim::SimSigner;

pub const CONFIG_FILE: &str = "weightvault.toml";
pub const DEFAULT_DEV_LISTEN: &str = "127.0.0.1:7443";

/// Files of a dev data directory, relative to it.
pub mod files {
    pub const CA_CERT: &str = "tls/ca.pem";
    pub const CA_KEY: &str = "tls/ca-key.pem";
    pub const SERVER_CERT: &str = "tls/server.pem";
    pub const SERVER_KEY: &str = "tls/server-key.pem";
    pub const ADMIN_CERT: &str = "tls/admin.pem";
    pub const ADMIN_KEY: &str = "tls/admin-key.pem";
    pub const AUDITOR_CERT: &str = "tls/auditor.pem";
    pub const AUDITOR_KEY: &str = "tls/auditor-key.pem";
    pub const ROOT_KEY: &str = "root.key";
    pub const SIM_KEY: &str = "sim-tee.key";
}

/// The default dev data directory: `$XDG_DATA_HOME/weightvault/dev` or
/// `~/.local/share/weightvault/dev`, else `./weightvault-dev`.
pub fn default_data_dir() -> PathBuf {
    if let Some(x) = std::env::var_os("XDG_DATA_HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(x).join("weightvault/dev");
    }
    if let Some(h) = std::env::var_os("HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(h).join(".local/share/weightvault/dev");
    }
    PathBuf::from("weightvault-dev")
}

fn dev_err(dir: &Path, message: impl Into<String>) -> ConfigError {
    ConfigError::Dev {
        dir: dir.display().to_string(),
        message: message.into(),
    }
}

fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

/// Returns the dev config of `dir`, creating the directory and all its material on first use.
/// Returns whether it was created now.
pub fn ensure(dir: &Path) -> Result<(PathBuf, bool), ConfigError> {
    let config_path = dir.join(CONFIG_FILE);
    if config_path.exists() {
        return Ok((config_path, false));
    }
    std::fs::create_dir_all(dir.join("tls")).map_err(|e| dev_err(dir, e.to_string()))?;
    let tmp_config = dir.join(format!("{CONFIG_FILE}.partial"));
    generate(dir, &tmp_config).map_err(|e| dev_err(dir, e))?;
    // The config appears last and atomically: a crash midway leaves no config, and the next start
    // regenerates everything (files from the failed attempt are replaced).
    std::fs::rename(&tmp_config, &config_path).map_err(|e| dev_err(dir, e.to_string()))?;
    Ok((config_path, true))
}

fn generate(dir: &Path, config_out: &Path) -> Result<(), String> {
    for f in [
        files::CA_CERT,
        files::CA_KEY,
        files::SERVER_CERT,
        files::SERVER_KEY,
        files::ADMIN_CERT,
        files::ADMIN_KEY,
        files::AUDITOR_CERT,
        files::AUDITOR_KEY,
        files::SIM_KEY,
    ] {
        let _ = std::fs::remove_file(dir.join(f));
    }
    let e = |e: rcgen::Error| e.to_string();
    let io = |e: std::io::Error| e.to_string();

    let ca_key = KeyPair::generate().map_err(e)?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).map_err(e)?;
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "weightvault dev CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_cert = ca_params.self_signed(&ca_key).map_err(e)?;
    let issuer = Issuer::new(ca_params, &ca_key);

    let leaf = |cn: &str,
                sans: Vec<SanType>,
                eku: ExtendedKeyUsagePurpose|
     -> Result<(String, String, Vec<u8>), String> {
        let key = KeyPair::generate().map_err(e)?;
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(e)?;
        params.distinguished_name.push(DnType::CommonName, cn);
        params.subject_alt_names = sans;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![eku];
        let cert = params.signed_by(&key, &issuer).map_err(e)?;
        Ok((cert.pem(), key.serialize_pem(), cert.der().to_vec()))
    };
    let server = leaf(
        "weightvault dev server",
        vec![
            SanType::DnsName("localhost".try_into().map_err(e)?),
            SanType::IpAddress("127.0.0.1".parse().expect("ip")),
            SanType::IpAddress("::1".parse().expect("ip")),
        ],
        ExtendedKeyUsagePurpose::ServerAuth,
    )?;
    let admin = leaf(
        "weightvault dev admin",
        vec![],
        ExtendedKeyUsagePurpose::ClientAuth,
    )?;
    let auditor = leaf(
        "weightvault dev auditor",
        vec![],
        ExtendedKeyUsagePurpose::ClientAuth,
    )?;

    let w = |rel: &str, data: &[u8], private: bool| -> Result<(), String> {
        let p = dir.join(rel);
        if private {
            write_private(&p, data).map_err(io)
        } else {
            std::fs::write(&p, data).map_err(io)
        }
    };
    w(files::CA_CERT, ca_cert.pem().as_bytes(), false)?;
    w(files::CA_KEY, ca_key.serialize_pem().as_bytes(), true)?;
    w(files::SERVER_CERT, server.0.as_bytes(), false)?;
    w(files::SERVER_KEY, server.1.as_bytes(), true)?;
    w(files::ADMIN_CERT, admin.0.as_bytes(), false)?;
    w(files::ADMIN_KEY, admin.1.as_bytes(), true)?;
    w(files::AUDITOR_CERT, auditor.0.as_bytes(), false)?;
    w(files::AUDITOR_KEY, auditor.1.as_bytes(), true)?;

    let sim_pkcs8 = zeroize::Zeroizing::new(SimSigner::generate_pkcs8());
    w(files::SIM_KEY, &sim_pkcs8, true)?;
    let sim_pub = SimSigner::from_pkcs8(&sim_pkcs8)
        .map_err(|e| e.to_string())?
        .public_key();

    let cfg = Config {
        listen: DEFAULT_DEV_LISTEN.parse().expect("addr"),
        data_dir: PathBuf::from("."),
        tls: TlsConfig {
            cert: files::SERVER_CERT.into(),
            key: files::SERVER_KEY.into(),
            client_ca: files::CA_CERT.into(),
        },
        roles: RolesConfig {
            admins: vec![cert_fingerprint(&admin.2)],
            auditors: vec![cert_fingerprint(&auditor.2)],
            revoked: Vec::new(),
        },
        seal: SealConfig::File {
            path: files::ROOT_KEY.into(),
            create: true,
            allow_file_outside_dev: false,
        },
        attest: AttestConfig {
            sim: SimConfig {
                enabled: true,
                trusted_keys: vec![hex::encode(sim_pub)],
                ..SimConfig::default()
            },
            ..AttestConfig::default()
        },
        grants: GrantsConfig::default(),
        storage: StorageConfig::default(),
        audit: AuditConfig::default(),
        budgets: Default::default(),
        limits: Default::default(),
        approvals: Default::default(),
        ops: Default::default(),
    };
    let text = format!(
        "# Generated by `weightvault serve --dev`. Development only: the root key is a plain file\n\
         # and the simulated TEE is enabled. Paths are relative to this file.\n{}",
        toml::to_string_pretty(&cfg).map_err(|e| e.to_string())?
    );
    std::fs::write(config_out, text).map_err(io)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dev_setup_creates_a_valid_config_once() {
        let dir = tempfile::tempdir().unwrap();
        let (path, created) = ensure(dir.path()).unwrap();
        assert!(created);
        let cfg = Config::load(&path).unwrap();
        assert!(cfg.attest.sim.enabled);
        assert_eq!(cfg.roles.admins.len(), 1);
        let (again, created) = ensure(dir.path()).unwrap();
        assert_eq!(again, path);
        assert!(!created);
    }

    #[test]
    fn unknown_keys_and_bad_values_are_all_reported() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(
            &p,
            "listen = \"127.0.0.1:1\"\ndata_dir = \".\"\nbogus = 1\n[tls]\ncert=\"a\"\nkey=\"b\"\nclient_ca=\"c\"\n[seal]\nkind=\"file\"\npath=\"r\"\n",
        )
        .unwrap();
        let err = Config::load(&p).unwrap_err().to_string();
        assert!(err.contains("bogus"), "{err}");
        std::fs::write(
            &p,
            "listen = \"127.0.0.1:1\"\ndata_dir = \".\"\n[tls]\ncert=\"a\"\nkey=\"b\"\nclient_ca=\"c\"\n[seal]\nkind=\"file\"\npath=\"r\"\n[grants]\nttl_secs=0\n",
        )
        .unwrap();
        let err = Config::load(&p).unwrap_err().to_string();
        assert!(
            err.contains("tls.cert") && err.contains("tls.key") && err.contains("ttl_secs"),
            "{err}"
        );
    }
}
