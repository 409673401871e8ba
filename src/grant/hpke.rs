//! HPKE (RFC 9180) sealing of a DEK to a node's ephemeral key: base mode, DHKEM(X25519,
//! HKDF-SHA256), HKDF-SHA256, AES-256-GCM, through rustls' aws-lc-rs implementation. The `info`
//! binds the grant id, model, version and expiry, so a sealed DEK is useless under another grant.

use rustls::crypto::aws_lc_rs::hpke::DH_KEM_X25519_HKDF_SHA256_AES_256;
use rustls::crypto::hpke::{EncapsulatedSecret, Hpke, HpkePrivateKey, HpkePublicKey};
use zeroize::Zeroizing;

use super::GrantError;
use crate::keys::Dek;
use crate::keys::secret::KEY_LEN;

const INFO_LABEL: &[u8] = b"weightvault/grant/v1";

/// The HPKE `info` of a grant (docs/protocol.md): label, then length-prefixed grant id and model,
/// then the version and `not_after_ms` as u64 big-endian.
pub fn grant_info(grant_id: &str, model: &str, version: u64, not_after_ms: u64) -> Vec<u8> {
    let mut info = INFO_LABEL.to_vec();
    for field in [grant_id.as_bytes(), model.as_bytes()] {
        info.extend_from_slice(&(field.len() as u32).to_be_bytes());
        info.extend_from_slice(field);
    }
    info.extend_from_slice(&version.to_be_bytes());
    info.extend_from_slice(&not_after_ms.to_be_bytes());
    info
}

/// A DEK sealed to a node: the encapsulated key (`enc`, RFC 9180 §4.1) and the ciphertext.
pub struct SealedDek {
    pub enc: Vec<u8>,
    pub ciphertext: Vec<u8>,
}

fn suite() -> &'static dyn Hpke {
    DH_KEM_X25519_HKDF_SHA256_AES_256
}

/// Seals the DEK to the node's raw X25519 public key.
pub fn seal_dek(
    dek: &Dek,
    node_public_key: &[u8; 32],
    info: &[u8],
) -> Result<SealedDek, GrantError> {
    // RFC 9180 §6.1 single-shot SealBase(pkR, info, aad = "", pt = DEK).
    let (enc, ciphertext) = suite()
        .seal(
            info,
            b"",
            dek.expose_secret(),
            &HpkePublicKey(node_public_key.to_vec()),
        )
        .map_err(|_| GrantError::Seal)?;
    Ok(SealedDek {
        enc: enc.0,
        ciphertext,
    })
}

/// A node's ephemeral key pair; the private half never leaves this type.
pub struct NodeKeyPair {
    public: [u8; 32],
    private: HpkePrivateKey,
}

impl NodeKeyPair {
    pub fn generate() -> Result<Self, GrantError> {
        let (public, private) = suite().generate_key_pair().map_err(|_| GrantError::Rng)?;
        let public: [u8; 32] = public.0.try_into().map_err(|_| GrantError::Rng)?;
        Ok(Self { public, private })
    }

    pub fn public_key(&self) -> &[u8; 32] {
        &self.public
    }

    /// Opens a sealed DEK (RFC 9180 §6.1 OpenBase); every failure is the same error.
    pub fn open_dek(&self, enc: &[u8], ciphertext: &[u8], info: &[u8]) -> Result<Dek, OpenFailed> {
        let pt = Zeroizing::new(
            suite()
                .open(
                    &EncapsulatedSecret(enc.to_vec()),
                    info,
                    b"",
                    ciphertext,
                    &self.private,
                )
                .map_err(|_| OpenFailed)?,
        );
        let mut raw: Zeroizing<[u8; KEY_LEN]> =
            Zeroizing::new(pt.as_slice().try_into().map_err(|_| OpenFailed)?);
        Ok(Dek::from_bytes(&mut raw))
    }
}

/// The sealed DEK did not open.
#[derive(Debug, thiserror::Error)]
#[error("sealed key did not open")]
pub struct OpenFailed;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_open_round_trip_and_info_binding() {
        let node = NodeKeyPair::generate().unwrap();
        let dek = Dek::generate().unwrap();
        let info = grant_info("g-1", "m", 2, 99);
        let sealed = seal_dek(&dek, node.public_key(), &info).unwrap();
        let back = node
            .open_dek(&sealed.enc, &sealed.ciphertext, &info)
            .unwrap();
        assert_eq!(back.expose_secret(), dek.expose_secret());
        let other_info = grant_info("g-2", "m", 2, 99);
        assert!(
            node.open_dek(&sealed.enc, &sealed.ciphertext, &other_info)
                .is_err()
        );
        let other = NodeKeyPair::generate().unwrap();
        assert!(
            other
                .open_dek(&sealed.enc, &sealed.ciphertext, &info)
                .is_err()
        );
    }
}
