//! Who is calling. Admins and auditors present a client certificate issued by the configured CA
//! (verified by TLS) whose SHA-256 fingerprint the config maps to a role. Nodes carry no
//! certificate; they authenticate by attestation.

use std::collections::HashMap;

use tonic::Request;

use super::error::ApiError;
use crate::audit::{Actor, entry::ActorKind};
use crate::config::{RolesConfig, cert_fingerprint};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Admin,
    Auditor,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Auditor => "auditor",
        }
    }
}

/// Which certificates carry which role: by fingerprint or by SAN URI; revoked fingerprints
/// are refused first.
pub struct Roles {
    by_fingerprint: HashMap<String, Role>,
    by_uri: HashMap<String, Role>,
    revoked: std::collections::HashSet<String>,
}

/// The subject alternative name URIs of a DER certificate (empty if it does not parse; TLS
/// already verified the chain).
fn san_uris(der: &[u8]) -> Vec<String> {
    use x509_parser::extensions::GeneralName;
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
        return Vec::new();
    };
    match cert.subject_alternative_name() {
        Ok(Some(san)) => san
            .value
            .general_names
            .iter()
            .filter_map(|n| match n {
                GeneralName::URI(u) => Some((*u).to_string()),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    }
}

impl Roles {
    pub fn from_config(cfg: &RolesConfig) -> Self {
        let mut by_fingerprint = HashMap::new();
        let mut by_uri = HashMap::new();
        // Auditors first: an entry listed under both roles ends up admin.
        for (list, role) in [(&cfg.auditors, Role::Auditor), (&cfg.admins, Role::Admin)] {
            for e in list {
                if e.contains("://") {
                    by_uri.insert(e.clone(), role);
                } else {
                    by_fingerprint.insert(e.to_ascii_lowercase(), role);
                }
            }
        }
        Self {
            by_fingerprint,
            by_uri,
            revoked: cfg.revoked.iter().map(|f| f.to_ascii_lowercase()).collect(),
        }
    }

    /// The role of a client certificate, if any.
    fn role_of(&self, der: &[u8], fp: &str) -> Option<Role> {
        if self.revoked.contains(fp) {
            return None;
        }
        if let Some(r) = self.by_fingerprint.get(fp) {
            return Some(*r);
        }
        let uris = san_uris(der);
        // Admin wins when several URIs match.
        let mut found = None;
        for u in &uris {
            match self.by_uri.get(u) {
                Some(Role::Admin) => return Some(Role::Admin),
                Some(Role::Auditor) => found = Some(Role::Auditor),
                None => {}
            }
        }
        found
    }

    /// Requires the caller's certificate to carry `role`; returns the caller as an audit actor.
    pub fn require<T>(&self, req: &Request<T>, role: Role) -> Result<Actor, ApiError> {
        let certs = req.peer_certs();
        let Some(leaf) = certs.as_ref().and_then(|c| c.first()) else {
            return Err(ApiError::Unauthenticated(format!(
                "a client certificate with role {} is required",
                role.as_str()
            )));
        };
        let fp = cert_fingerprint(leaf.as_ref());
        if self.revoked.contains(&fp) {
            return Err(ApiError::PermissionDenied(format!(
                "certificate {} is revoked",
                &fp[..16]
            )));
        }
        match self.role_of(leaf.as_ref(), &fp) {
            Some(r) if r == role => Ok(Actor::new(
                match role {
                    Role::Admin => ActorKind::Admin,
                    Role::Auditor => ActorKind::Auditor,
                },
                fp,
            )),
            _ => Err(ApiError::PermissionDenied(format!(
                "certificate {} does not have role {}",
                &fp[..16],
                role.as_str()
            ))),
        }
    }
}
