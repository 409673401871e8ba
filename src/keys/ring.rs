//! The KEK ring and the vault signing key, unlocked by the root key. DEKs are generated here and
//! leave only wrapped by the active KEK; unwrapping needs the KEK version they name.

use std::collections::BTreeMap;

use aws_lc_rs::signature::{Ed25519KeyPair, KeyPair};
use zeroize::Zeroizing;

use super::secret::{Dek, KEY_LEN, Kek, RootKey};
use super::{KeyError, wrap};
use crate::store::{KekRecord, MetadataStore, StoreError};
use crate::time::UnixMs;

const SIGNING_KEY_NAME: &str = "vault-signing-key/v1";
const LOG_KEY_NAME: &str = "log-signing-key/v1";

fn kek_aad(version: u32) -> Vec<u8> {
    let mut aad = b"weightvault/kek/v1".to_vec();
    aad.extend_from_slice(&version.to_be_bytes());
    aad
}

/// Binds a wrapped DEK to its KEK version, model and version id.
fn dek_aad(kek_version: u32, model: &str, version_id: &[u8; 16]) -> Vec<u8> {
    let mut aad = b"weightvault/dek/v1".to_vec();
    aad.extend_from_slice(&kek_version.to_be_bytes());
    aad.extend_from_slice(&(model.len() as u64).to_be_bytes());
    aad.extend_from_slice(model.as_bytes());
    aad.extend_from_slice(version_id);
    aad
}

/// What `open` created on first use, for the audit log.
#[derive(Debug, Default)]
pub struct Created {
    pub kek_version: Option<u32>,
    pub signing_key: bool,
    pub log_key: bool,
}

pub struct KeyRing {
    keks: BTreeMap<u32, Kek>,
    active: u32,
    signing: Ed25519KeyPair,
    log: Option<Ed25519KeyPair>,
}

impl KeyRing {
    /// Unlocks the ring with the root key, creating the first KEK and the signing key if the
    /// store has none. A root key that does not unwrap the stored keys is an error, never a reset.
    pub async fn open(
        root: &RootKey,
        store: &dyn MetadataStore,
        now: UnixMs,
    ) -> Result<(Self, Created), KeyError> {
        let mut created = Created::default();
        let mut records = store.keks().await?;
        if records.is_empty() {
            let kek = Kek::generate().map_err(|_| KeyError::Rng)?;
            let rec = KekRecord {
                version: 1,
                wrapped: wrap::wrap(root.expose_secret(), kek.expose_secret(), &kek_aad(1))?,
                created_ms: now,
            };
            match store.insert_kek(&rec).await {
                Ok(()) => created.kek_version = Some(1),
                // Another replica created it first; use theirs.
                Err(StoreError::Conflict(_)) => {}
                Err(e) => return Err(e.into()),
            }
            records = store.keks().await?;
        }
        let mut keks = BTreeMap::new();
        for rec in &records {
            let mut raw = unwrap_fixed(root.expose_secret(), &rec.wrapped, &kek_aad(rec.version))?;
            keks.insert(rec.version, Kek::from_bytes(&mut raw));
        }
        let active = *keks.keys().next_back().expect("at least one KEK");

        let (signing, new_signing) = ed25519_key(root, store, SIGNING_KEY_NAME).await?;
        let (log, new_log) = ed25519_key(root, store, LOG_KEY_NAME).await?;
        created.signing_key = new_signing;
        created.log_key = new_log;
        Ok((
            Self {
                keks,
                active,
                signing,
                log: Some(log),
            },
            created,
        ))
    }

    pub fn active_kek_version(&self) -> u32 {
        self.active
    }

    /// A fresh DEK for a new model version, and its wrapping under the active KEK.
    pub fn new_dek(
        &self,
        model: &str,
        version_id: &[u8; 16],
    ) -> Result<(Dek, u32, Vec<u8>), KeyError> {
        let dek = Dek::generate().map_err(|_| KeyError::Rng)?;
        let kek = &self.keks[&self.active];
        let wrapped = wrap::wrap(
            kek.expose_secret(),
            dek.expose_secret(),
            &dek_aad(self.active, model, version_id),
        )?;
        Ok((dek, self.active, wrapped))
    }

    /// Unwraps the DEK of a model version.
    pub fn unwrap_dek(
        &self,
        kek_version: u32,
        wrapped: &[u8],
        model: &str,
        version_id: &[u8; 16],
    ) -> Result<Dek, KeyError> {
        let kek = self
            .keks
            .get(&kek_version)
            .ok_or(KeyError::UnknownKek(kek_version))?;
        let mut raw = unwrap_fixed(
            kek.expose_secret(),
            wrapped,
            &dek_aad(kek_version, model, version_id),
        )?;
        Ok(Dek::from_bytes(&mut raw))
    }

    /// The vault's Ed25519 signing key (manifests).
    pub fn signing_key(&self) -> &Ed25519KeyPair {
        &self.signing
    }

    /// Hands the audit log's Ed25519 key to the sequencer (once).
    pub fn take_log_key(&mut self) -> Option<Ed25519KeyPair> {
        self.log.take()
    }

    pub fn signing_public_key(&self) -> [u8; 32] {
        let mut out = [0u8; 32];
        out.copy_from_slice(self.signing.public_key().as_ref());
        out
    }
}

/// Loads the named Ed25519 key wrapped by the root key, creating it on first use. Returns
/// whether it was created now. The name is bound into the wrapping.
async fn ed25519_key(
    root: &RootKey,
    store: &dyn MetadataStore,
    name: &str,
) -> Result<(Ed25519KeyPair, bool), KeyError> {
    let aad = format!("weightvault/ed25519/{name}");
    let mut created = false;
    let wrapped = match store.get_wrapped_secret(name).await? {
        Some(w) => w,
        None => {
            let rng = aws_lc_rs::rand::SystemRandom::new();
            let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng).map_err(|_| KeyError::Rng)?;
            let w = wrap::wrap(root.expose_secret(), pkcs8.as_ref(), aad.as_bytes())?;
            created = store.put_wrapped_secret_if_absent(name, &w).await?;
            store
                .get_wrapped_secret(name)
                .await?
                .ok_or(KeyError::UnwrapFailed)?
        }
    };
    let pkcs8 = wrap::unwrap(root.expose_secret(), &wrapped, aad.as_bytes())?;
    let key = Ed25519KeyPair::from_pkcs8(&pkcs8).map_err(|_| KeyError::UnwrapFailed)?;
    Ok((key, created))
}

fn unwrap_fixed(
    key: &[u8; KEY_LEN],
    wrapped: &[u8],
    aad: &[u8],
) -> Result<Zeroizing<[u8; KEY_LEN]>, KeyError> {
    let raw = wrap::unwrap(key, wrapped, aad)?;
    let mut out = Zeroizing::new([0u8; KEY_LEN]);
    if raw.len() != KEY_LEN {
        return Err(KeyError::UnwrapFailed);
    }
    out.copy_from_slice(&raw);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::sqlite::SqliteStore;

    #[tokio::test]
    async fn ring_persists_and_refuses_another_root_key() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("m.db")).await.unwrap();
        let root = RootKey::generate().unwrap();
        let (ring, created) = KeyRing::open(&root, &store, 1).await.unwrap();
        assert_eq!(created.kek_version, Some(1));
        assert!(created.signing_key);
        let (dek, kv, wrapped) = ring.new_dek("m", &[1; 16]).unwrap();

        let (again, created) = KeyRing::open(&root, &store, 2).await.unwrap();
        assert!(created.kek_version.is_none() && !created.signing_key);
        assert_eq!(again.signing_public_key(), ring.signing_public_key());
        let back = again.unwrap_dek(kv, &wrapped, "m", &[1; 16]).unwrap();
        assert_eq!(back.expose_secret(), dek.expose_secret());
        assert!(again.unwrap_dek(kv, &wrapped, "other", &[1; 16]).is_err());
        assert!(again.unwrap_dek(kv, &wrapped, "m", &[2; 16]).is_err());

        let wrong = RootKey::generate().unwrap();
        assert!(matches!(
            KeyRing::open(&wrong, &store, 3).await,
            Err(KeyError::UnwrapFailed)
        ));
    }
}
