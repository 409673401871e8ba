//! Seals: where the root key comes from (docs/key-ceremony.md).
//!
//! - `file` (development): 32 random bytes in a file only the vault's user can read.
//! - `shamir`: the root key exists only as N shares held by people; the vault starts sealed and
//!   opens once M shares are submitted ([`super::shamir`]).
//! - `pkcs11`: the root key is stored encrypted by a non-extractable key inside an HSM, which
//!   decrypts it at start ([`super::pkcs11`]); the vault unseals itself.
//! - a cloud KMS would be another [`RootKeyWrapper`], like `pkcs11` (planned, not implemented).
//!
//! For `shamir` and `pkcs11` the store holds a [`SealState`] (named secret [`STATE_NAME`]): the
//! seal kind, a generation id, and a verifier (a known value wrapped by the root key) that tells
//! a right root key from a wrong one before anything else is touched.

use std::io::{Read, Write};
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::secret::KEY_LEN;
use super::shamir::GENERATION_LEN;
use super::{KeyError, RootKey, wrap};
use crate::config::SealConfig;
use crate::store::MetadataStore;

/// Store name of the current [`SealState`].
pub const STATE_NAME: &str = "seal/state/v1";
/// Store name of a rekey waiting for confirmation ([`super::rekey::PendingRekey`]).
pub const PENDING_NAME: &str = "seal/pending/v1";
/// Environment variable read for the HSM PIN when `seal.pin` is not set.
pub const DEFAULT_PIN_ENV: &str = "WEIGHTVAULT_PKCS11_PIN";

const VERIFIER_PLAINTEXT: &[u8] = b"weightvault root key verifier v1";

/// Wraps and unwraps the root key with a key the vault never sees: the interface of the
/// auto-unseal seals (`pkcs11` today; a cloud KMS later). Implementations block (HSM or network
/// round trips); call them from a blocking context.
pub trait RootKeyWrapper: Send + Sync {
    /// A description for logs and status (never a secret).
    fn describe(&self) -> String;
    /// Encrypts the root key, binding `aad`.
    fn wrap_root(&self, root: &RootKey, aad: &[u8]) -> Result<Vec<u8>, KeyError>;
    /// Decrypts it; every failure to decrypt is [`KeyError::UnwrapFailed`].
    fn unwrap_root(&self, wrapped: &[u8], aad: &[u8]) -> Result<RootKey, KeyError>;
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SealKind {
    File,
    Shamir,
    Pkcs11,
}

impl SealKind {
    pub fn as_str(self) -> &'static str {
        match self {
            SealKind::File => "file",
            SealKind::Shamir => "shamir",
            SealKind::Pkcs11 => "pkcs11",
        }
    }

    pub fn parse(s: &str) -> Option<SealKind> {
        match s {
            "file" => Some(SealKind::File),
            "shamir" => Some(SealKind::Shamir),
            "pkcs11" => Some(SealKind::Pkcs11),
            _ => None,
        }
    }
}

/// What the store records about the seal of its root key. Not secret.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SealState {
    pub kind: SealKind,
    /// 16 hex digits, new at every init and rekey; shares carry it.
    pub generation: String,
    /// `shamir`: shares needed and shares issued.
    #[serde(default)]
    pub threshold: u8,
    #[serde(default)]
    pub shares: u8,
    /// The known value wrapped by the root key (hex, `keys::wrap` layout).
    pub verifier: String,
    /// `pkcs11`: the root key encrypted inside the HSM (hex).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wrapped_root: Option<String>,
    pub created_ms: u64,
}

impl SealState {
    /// A new state for `root`, with a fresh generation.
    pub fn new(
        kind: SealKind,
        root: &RootKey,
        threshold: u8,
        shares: u8,
        now: u64,
    ) -> Result<Self, KeyError> {
        let generation: [u8; GENERATION_LEN] = crate::grant::random().map_err(|_| KeyError::Rng)?;
        let generation = hex::encode(generation);
        let verifier = hex::encode(wrap::wrap(
            root.expose_secret(),
            VERIFIER_PLAINTEXT,
            &verifier_aad(&generation),
        )?);
        Ok(Self {
            kind,
            generation,
            threshold,
            shares,
            verifier,
            wrapped_root: None,
            created_ms: now,
        })
    }

    pub fn generation_bytes(&self) -> [u8; GENERATION_LEN] {
        let mut out = [0u8; GENERATION_LEN];
        let _ = hex::decode_to_slice(&self.generation, &mut out);
        out
    }

    /// Whether `root` is the root key this state was made for.
    pub fn opens(&self, root: &RootKey) -> bool {
        let Ok(v) = hex::decode(&self.verifier) else {
            return false;
        };
        wrap::unwrap(root.expose_secret(), &v, &verifier_aad(&self.generation))
            .map(|p| p[..] == *VERIFIER_PLAINTEXT)
            .unwrap_or(false)
    }

    /// Associated data of the HSM encryption of the root key: binds it to this generation.
    pub fn hsm_aad(&self) -> Vec<u8> {
        format!("weightvault/seal/pkcs11/v1/{}", self.generation).into_bytes()
    }

    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("seal state serializes")
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, KeyError> {
        serde_json::from_slice(bytes)
            .map_err(|e| KeyError::Seal(format!("stored seal state is unreadable: {e}")))
    }
}

fn verifier_aad(generation: &str) -> Vec<u8> {
    format!("weightvault/seal/verifier/v1/{generation}").into_bytes()
}

/// The stored seal state, if any.
pub async fn stored_state(store: &dyn MetadataStore) -> Result<Option<SealState>, KeyError> {
    match store.get_wrapped_secret(STATE_NAME).await? {
        Some(b) => Ok(Some(SealState::decode(&b)?)),
        None => Ok(None),
    }
}

/// Whether anything is protected by a root key yet (a KEK exists).
pub async fn ring_exists(store: &dyn MetadataStore) -> Result<bool, KeyError> {
    Ok(!store.keks().await?.is_empty())
}

/// The `serve` command's rule for the file seal: allowed with `--dev`, otherwise only when the
/// config says `seal.allow_file_outside_dev = true`.
pub fn check_file_seal_allowed(seal: &SealConfig, dev: bool) -> Result<(), String> {
    match seal {
        SealConfig::File {
            allow_file_outside_dev,
            ..
        } if !dev && !allow_file_outside_dev => Err(
            "seal.kind = \"file\" keeps the root key in a plain file and is for development: \
             use seal.kind = \"shamir\" or \"pkcs11\" (docs/key-ceremony.md), run `serve --dev`, \
             or set seal.allow_file_outside_dev = true to accept the risk"
                .into(),
        ),
        _ => Ok(()),
    }
}

/// The HSM wrapper of a `pkcs11` seal config (PIN from the config, else from the environment).
pub fn hsm_wrapper(seal: &SealConfig) -> Result<super::pkcs11::HsmSeal, KeyError> {
    let SealConfig::Pkcs11 {
        module,
        slot,
        token_label,
        key_label,
        pin,
        pin_env,
        ..
    } = seal
    else {
        return Err(KeyError::Seal("not a pkcs11 seal".into()));
    };
    let pin = match pin {
        Some(p) => p.clone(),
        None => {
            let var = pin_env.as_deref().unwrap_or(DEFAULT_PIN_ENV);
            super::secret::SecretText::new(std::env::var(var).map_err(|_| {
                KeyError::Seal(format!(
                    "pkcs11: no PIN: set seal.pin or the environment variable {var}"
                ))
            })?)
        }
    };
    super::pkcs11::HsmSeal::open(super::pkcs11::HsmParams {
        module: module.clone(),
        slot: *slot,
        token_label: token_label.clone(),
        key_label: key_label.clone(),
        pin,
    })
}

fn err(path: &Path, reason: impl Into<String>) -> KeyError {
    KeyError::RootKeyFile {
        path: path.display().to_string(),
        reason: reason.into(),
    }
}

/// Reads the root key from `path`, creating it (mode 0600) when `create` is set and it is missing.
pub fn load_file_root_key(path: &Path, create: bool) -> Result<RootKey, KeyError> {
    if !path.exists() {
        if !create {
            return Err(err(path, "missing"));
        }
        let key = RootKey::generate().map_err(|_| KeyError::Rng)?;
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            opts.mode(0o600);
        }
        let mut f = opts.open(path).map_err(|e| err(path, e.to_string()))?;
        f.write_all(key.expose_secret())
            .and_then(|()| f.sync_all())
            .map_err(|e| err(path, e.to_string()))?;
        return Ok(key);
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path)
            .map_err(|e| err(path, e.to_string()))?
            .permissions()
            .mode();
        if mode & 0o077 != 0 {
            return Err(err(
                path,
                format!(
                    "permissions {:o} allow other users; chmod 600 it",
                    mode & 0o777
                ),
            ));
        }
    }
    let mut f = std::fs::File::open(path).map_err(|e| err(path, e.to_string()))?;
    let mut bytes = zeroize::Zeroizing::new([0u8; KEY_LEN]);
    f.read_exact(&mut bytes[..])
        .map_err(|_| err(path, format!("must hold exactly {KEY_LEN} bytes")))?;
    let mut rest = [0u8; 1];
    if f.read(&mut rest).map_err(|e| err(path, e.to_string()))? != 0 {
        return Err(err(path, format!("must hold exactly {KEY_LEN} bytes")));
    }
    Ok(RootKey::from_bytes(&mut bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creates_then_loads_the_same_key() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("root.key");
        assert!(load_file_root_key(&p, false).is_err());
        let a = load_file_root_key(&p, true).unwrap();
        let b = load_file_root_key(&p, false).unwrap();
        assert_eq!(a.expose_secret(), b.expose_secret());
    }

    #[cfg(unix)]
    #[test]
    fn refuses_a_world_readable_key() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("root.key");
        load_file_root_key(&p, true).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(load_file_root_key(&p, false).is_err());
    }

    #[test]
    fn the_verifier_tells_the_right_root_key() {
        let root = RootKey::generate().unwrap();
        let state = SealState::new(SealKind::Shamir, &root, 2, 3, 1).unwrap();
        assert!(state.opens(&root));
        assert!(!state.opens(&RootKey::generate().unwrap()));
        let back = SealState::decode(&state.encode()).unwrap();
        assert_eq!(back, state);
        // Another generation's verifier does not pass for this one (AAD binds it).
        let mut moved = SealState::new(SealKind::Shamir, &root, 2, 3, 1).unwrap();
        moved.verifier = state.verifier.clone();
        assert!(!moved.opens(&root));
    }

    #[test]
    fn the_file_seal_needs_dev_or_an_explicit_allowance() {
        let file = |allow| SealConfig::File {
            path: "root.key".into(),
            create: false,
            allow_file_outside_dev: allow,
        };
        assert!(check_file_seal_allowed(&file(false), true).is_ok());
        let e = check_file_seal_allowed(&file(false), false).unwrap_err();
        assert!(e.contains("allow_file_outside_dev"), "{e}");
        assert!(check_file_seal_allowed(&file(true), false).is_ok());
    }
}
