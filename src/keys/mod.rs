//! The key hierarchy (docs/keys.md): root key (sealed) → versioned KEK ring → one DEK per model
//! version (stored only wrapped) → per-file subkeys (HKDF, in `envelope`). The vault's Ed25519
//! signing key (manifests) and the audit log's checkpoint key are wrapped by the root key too.

pub mod boot;
pub mod locked;
pub mod pkcs11;
pub mod rekey;
pub mod ring;
pub mod seal;
pub mod secret;
pub mod shamir;
pub mod wrap;

pub use ring::KeyRing;
pub use secret::{Dek, Kek, RootKey};

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// Unwrapping failed: wrong key, wrong context or tampered bytes (deliberately one error).
    #[error("key unwrap failed")]
    UnwrapFailed,
    #[error("no KEK with version {0}")]
    UnknownKek(u32),
    #[error("root key file {path}: {reason}")]
    RootKeyFile { path: String, reason: String },
    #[error("random number generator failed")]
    Rng,
    /// A seal problem (HSM unreachable, stored seal state unreadable, seal mismatch); the text
    /// never contains key material or a PIN.
    #[error("seal: {0}")]
    Seal(String),
    #[error("key storage: {0}")]
    Store(#[from] crate::store::StoreError),
}
