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

/// Certificate fingerprint → role.
pub struct Roles(HashMap<String, Role>);

impl Roles {
    pub fn from_config(cfg: &RolesConfig) -> Self {
        let mut map = HashMap::new();
        for fp in &cfg.auditors {
            map.insert(fp.to_ascii_lowercase(), Role::Auditor);
        }
        // A certificate listed twice gets the admin role.
        for fp in &cfg.admins {
            map.insert(fp.to_ascii_lowercase(), Role::Admin);
        }
        Self(map)
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
        match self.0.get(&fp) {
            Some(r) if *r == role => Ok(Actor::new(
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
