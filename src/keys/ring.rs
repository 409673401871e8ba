//! The KEK ring and the vault signing key, unlocked by the root key. DEKs are generated here and
//! leave only wrapped by the active KEK; unwrapping needs the KEK version they name. Rotation
//! (docs/keys.md): [`KeyRing::add_kek`] makes a new active version, [`KeyRing::rewrap`] moves one
//! DEK under it, [`KeyRing::retire`] destroys a version that no longer wraps any DEK.

use std::collections::BTreeMap;
use std::sync::RwLock;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use aws_lc_rs::signature::{Ed25519KeyPair, KeyPair};
use zeroize::Zeroizing;

use super::secret::{Dek, KEY_LEN, Kek, RootKey};
use super::{KeyError, wrap};
use crate::store::{KekRecord, MetadataStore, StoreError, VersionRecord};
use crate::time::UnixMs;

const SIGNING_KEY_NAME: &str = "vault-signing-key/v1";
const LOG_KEY_NAME: &str = "log-signing-key/v1";
/// The named secrets the root key wraps besides the KEKs (a rekey re-wraps each of them).
pub(crate) const ROOT_WRAPPED_SECRETS: [&str; 2] = [SIGNING_KEY_NAME, LOG_KEY_NAME];

/// The AAD a root-wrapped named secret is bound to.
pub(crate) fn root_wrapped_secret_aad(name: &str) -> Vec<u8> {
    format!("weightvault/ed25519/{name}").into_bytes()
}

pub(crate) fn kek_aad(version: u32) -> Vec<u8> {
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

/// The unwrapped KEK versions; the active one is the highest.
struct Ring {
    keks: BTreeMap<u32, Kek>,
}

impl Ring {
    fn active(&self) -> u32 {
        *self.keks.keys().next_back().expect("at least one KEK")
    }
}

pub struct KeyRing {
    /// Kept while the vault runs, to wrap new KEK versions and to unwrap the ones another replica
    /// created. Everything it protects (the KEKs, the signing keys) is in memory unwrapped anyway.
    /// Replaced (under the write lock) when a rekey commits: see [`KeyRing::replace_root`].
    root: RwLock<RootKey>,
    ring: RwLock<Ring>,
    /// Shared by every "wrap a new DEK, commit its version" sequence, exclusive while a KEK is
    /// retired: no version can be committed under a KEK that is being destroyed.
    commit_gate: tokio::sync::RwLock<()>,
    rotating: AtomicBool,
    /// Moved by one when a rotation pass begins and by one when it ends: odd while one runs.
    /// Read before and after a status snapshot, it tells whether a pass ended in between.
    rotation_runs: AtomicU64,
    /// Passes spawned that have not yet tried to begin: between `keys rotate` releasing its
    /// guard and the background pass taking it, a rotation is still under way.
    rotations_queued: AtomicU64,
    signing: Ed25519KeyPair,
    log: Option<Ed25519KeyPair>,
}

/// Held while a rotation pass runs; only one runs at a time.
pub struct RotationRun<'a> {
    rotating: &'a AtomicBool,
    runs: &'a AtomicU64,
}

impl Drop for RotationRun<'_> {
    fn drop(&mut self) {
        // Counted before the flag is released, so the next pass cannot begin in between.
        self.runs.fetch_add(1, Ordering::SeqCst);
        self.rotating.store(false, Ordering::SeqCst);
    }
}

impl KeyRing {
    /// Unlocks the ring with the root key, creating the first KEK and the signing key if the
    /// store has none. A root key that does not unwrap the stored keys is an error, never a reset.
    /// The ring keeps its own copy of the root key (for rotation); the caller drops its copy.
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
        if keks.is_empty() {
            return Err(KeyError::UnwrapFailed);
        }

        let (signing, new_signing) = ed25519_key(root, store, SIGNING_KEY_NAME).await?;
        let (log, new_log) = ed25519_key(root, store, LOG_KEY_NAME).await?;
        created.signing_key = new_signing;
        created.log_key = new_log;
        let mut copy = *root.expose_secret();
        Ok((
            Self {
                root: RwLock::new(RootKey::from_bytes(&mut copy)),
                ring: RwLock::new(Ring { keks }),
                commit_gate: tokio::sync::RwLock::new(()),
                rotating: AtomicBool::new(false),
                rotation_runs: AtomicU64::new(0),
                rotations_queued: AtomicU64::new(0),
                signing,
                log: Some(log),
            },
            created,
        ))
    }

    fn root(&self) -> std::sync::RwLockReadGuard<'_, RootKey> {
        self.root.read().unwrap_or_else(|p| p.into_inner())
    }

    /// After a rekey committed (`keys::rekey`): KEKs created or loaded from now on use the new
    /// root key. The caller holds a [`RotationRun`] across the commit and this call, so no KEK
    /// is wrapped under the old root key after the store switched.
    pub(crate) fn replace_root(&self, new: RootKey) {
        *self.root.write().unwrap_or_else(|p| p.into_inner()) = new;
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Ring> {
        self.ring.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Ring> {
        self.ring.write().unwrap_or_else(|p| p.into_inner())
    }

    pub fn active_kek_version(&self) -> u32 {
        self.read().active()
    }

    /// Every KEK version in memory, ascending (the last is the active one).
    pub fn kek_versions(&self) -> Vec<u32> {
        self.read().keks.keys().copied().collect()
    }

    /// A fresh DEK for a new model version (not wrapped yet: see [`Self::wrap_dek`]).
    pub fn generate_dek(&self) -> Result<Dek, KeyError> {
        Dek::generate().map_err(|_| KeyError::Rng)
    }

    /// Wraps a DEK under the active KEK; returns the KEK version and the wrapped bytes. Call it
    /// while holding [`Self::commit_gate`] until the version is committed.
    pub fn wrap_dek(
        &self,
        dek: &Dek,
        model: &str,
        version_id: &[u8; 16],
    ) -> Result<(u32, Vec<u8>), KeyError> {
        let ring = self.read();
        let active = ring.active();
        let wrapped = wrap::wrap(
            ring.keks[&active].expose_secret(),
            dek.expose_secret(),
            &dek_aad(active, model, version_id),
        )?;
        Ok((active, wrapped))
    }

    /// A fresh DEK for a new model version, and its wrapping under the active KEK.
    pub fn new_dek(
        &self,
        model: &str,
        version_id: &[u8; 16],
    ) -> Result<(Dek, u32, Vec<u8>), KeyError> {
        let dek = self.generate_dek()?;
        let (active, wrapped) = self.wrap_dek(&dek, model, version_id)?;
        Ok((dek, active, wrapped))
    }

    /// Held (shared) from wrapping a new DEK until its version is committed.
    pub async fn commit_gate(&self) -> tokio::sync::RwLockReadGuard<'_, ()> {
        self.commit_gate.read().await
    }

    /// Unwraps the DEK of a model version.
    pub fn unwrap_dek(
        &self,
        kek_version: u32,
        wrapped: &[u8],
        model: &str,
        version_id: &[u8; 16],
    ) -> Result<Dek, KeyError> {
        let ring = self.read();
        let kek = ring
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

    /// Unwraps the DEK of a version record read earlier. If that fails, a rotation may have
    /// moved the DEK under a new KEK since (and retired the old one), possibly on another
    /// replica: load new KEK versions, read the record again and try once more.
    pub async fn unwrap_version_dek(
        &self,
        store: &dyn MetadataStore,
        v: &VersionRecord,
    ) -> Result<Dek, KeyError> {
        if let Ok(dek) = self.unwrap_dek(v.kek_version, &v.wrapped_dek, &v.model, &v.version_id) {
            return Ok(dek);
        }
        self.refresh(store).await?;
        let now = store
            .get_version(&v.model, Some(v.version))
            .await?
            .filter(|n| n.version_id == v.version_id)
            .ok_or(KeyError::UnwrapFailed)?;
        self.unwrap_dek(
            now.kek_version,
            &now.wrapped_dek,
            &now.model,
            &now.version_id,
        )
    }

    /// Loads KEK versions that are in the store but not in memory (another replica rotated).
    pub async fn refresh(&self, store: &dyn MetadataStore) -> Result<(), KeyError> {
        let known = self.kek_versions();
        for rec in store.keks().await? {
            if known.contains(&rec.version) {
                continue;
            }
            let mut raw = unwrap_fixed(
                self.root().expose_secret(),
                &rec.wrapped,
                &kek_aad(rec.version),
            )?;
            self.write()
                .keks
                .insert(rec.version, Kek::from_bytes(&mut raw));
        }
        Ok(())
    }

    /// Starts a rotation pass unless one is running.
    pub fn begin_rotation(&self) -> Option<RotationRun<'_>> {
        self.rotating
            .compare_exchange(false, true, Ordering::SeqCst, Ordering::SeqCst)
            .ok()?;
        self.rotation_runs.fetch_add(1, Ordering::SeqCst);
        Some(RotationRun {
            rotating: &self.rotating,
            runs: &self.rotation_runs,
        })
    }

    /// How many times a rotation pass began or ended: odd while one runs. A snapshot taken
    /// between two equal even readings, with no pass queued, saw no pass running.
    pub fn rotation_runs(&self) -> u64 {
        self.rotation_runs.load(Ordering::SeqCst)
    }

    /// A background pass was spawned; [`KeyRing::rotation_dequeued`] once it tried to begin.
    pub fn rotation_queued(&self) {
        self.rotations_queued.fetch_add(1, Ordering::SeqCst);
    }

    pub fn rotation_dequeued(&self) {
        self.rotations_queued.fetch_sub(1, Ordering::SeqCst);
    }

    /// Whether a spawned pass has not yet tried to begin.
    pub fn rotation_pending_start(&self) -> bool {
        self.rotations_queued.load(Ordering::SeqCst) > 0
    }

    /// The number the next KEK version gets (after the highest stored or known one).
    pub async fn next_kek_version(&self, store: &dyn MetadataStore) -> Result<u32, KeyError> {
        self.refresh(store).await?;
        let stored = store.keks().await?.iter().map(|k| k.version).max();
        stored
            .unwrap_or(0)
            .max(self.active_kek_version())
            .checked_add(1)
            .ok_or(KeyError::UnknownKek(u32::MAX))
    }

    /// Creates KEK `version` (from [`Self::next_kek_version`]), stores it wrapped by the root key
    /// and makes it active. New DEKs are wrapped by it from now on; existing ones are moved by
    /// [`Self::rewrap`]. `Conflict` (in [`KeyError::Store`]) if that version exists.
    pub async fn add_kek(
        &self,
        store: &dyn MetadataStore,
        version: u32,
        now: UnixMs,
    ) -> Result<(), KeyError> {
        let kek = Kek::generate().map_err(|_| KeyError::Rng)?;
        let rec = KekRecord {
            version,
            wrapped: wrap::wrap(
                self.root().expose_secret(),
                kek.expose_secret(),
                &kek_aad(version),
            )?,
            created_ms: now,
        };
        store.insert_kek(&rec).await?;
        self.write().keks.insert(version, kek);
        Ok(())
    }

    /// The DEK of `v` wrapped under the active KEK (AAD naming the new KEK version), or `None`
    /// when it already is. The DEK is unwrapped only inside this call.
    pub fn rewrap(&self, v: &VersionRecord) -> Result<Option<(u32, Vec<u8>)>, KeyError> {
        if v.kek_version == self.active_kek_version() {
            return Ok(None);
        }
        let dek = self.unwrap_dek(v.kek_version, &v.wrapped_dek, &v.model, &v.version_id)?;
        self.wrap_dek(&dek, &v.model, &v.version_id).map(Some)
    }

    /// Destroys KEK `version` (stored copy first, then the one in memory) if no model version's
    /// DEK is wrapped by it; the active KEK is never retired. Returns whether it was retired.
    pub async fn retire(&self, store: &dyn MetadataStore, version: u32) -> Result<bool, KeyError> {
        // No push can commit a DEK wrapped by this KEK while the gate is held.
        let _gate = self.commit_gate.write().await;
        if version >= self.active_kek_version() {
            return Ok(false);
        }
        if !store.retire_kek(version).await? {
            return Ok(false);
        }
        // Dropping the Kek zeroizes it.
        self.write().keks.remove(&version);
        Ok(true)
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
    let aad = String::from_utf8(root_wrapped_secret_aad(name)).expect("ASCII");
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

        // Rotation: a new active KEK, the DEK moved under it, the old KEK retired.
        let rec = VersionRecord {
            model: "m".into(),
            version: 1,
            version_id: [1; 16],
            kek_version: kv,
            wrapped_dek: wrapped.clone(),
            manifest: vec![],
            manifest_sig: vec![],
            total_bytes: 0,
            created_ms: 0,
        };
        store.begin_upload(&rec.version_id, "m", 0).await.unwrap();
        store.commit_version(&rec).await.unwrap();
        assert_eq!(again.next_kek_version(&store).await.unwrap(), 2);
        again.add_kek(&store, 2, 4).await.unwrap();
        assert!(matches!(
            again.add_kek(&store, 2, 4).await,
            Err(KeyError::Store(StoreError::Conflict(_)))
        ));
        assert_eq!(again.active_kek_version(), 2);
        // Still referenced by the version: not retired.
        assert!(!again.retire(&store, 1).await.unwrap());
        let (to, rewrapped) = again.rewrap(&rec).unwrap().expect("moves to v2");
        assert_eq!(to, 2);
        assert!(store.rewrap_dek(&[1; 16], 1, 2, &rewrapped).await.unwrap());
        // A second compare-and-swap from v1 finds nothing to replace.
        assert!(!store.rewrap_dek(&[1; 16], 1, 2, &rewrapped).await.unwrap());
        // The active KEK is never retired; the old one now is.
        assert!(!again.retire(&store, 2).await.unwrap());
        assert!(again.retire(&store, 1).await.unwrap());
        assert_eq!(again.kek_versions(), vec![2]);
        let back = again.unwrap_dek(2, &rewrapped, "m", &[1; 16]).unwrap();
        assert_eq!(back.expose_secret(), dek.expose_secret());
        // The old wrapping names KEK 1, which is gone from memory and from the store.
        assert!(matches!(
            again.unwrap_dek(1, &wrapped, "m", &[1; 16]),
            Err(KeyError::UnknownKek(1))
        ));
        let (reopened, _) = KeyRing::open(&root, &store, 5).await.unwrap();
        assert_eq!(reopened.kek_versions(), vec![2]);
        // The re-wrapped DEK stays bound to its version id.
        assert!(reopened.unwrap_dek(2, &rewrapped, "m", &[2; 16]).is_err());

        let wrong = RootKey::generate().unwrap();
        assert!(matches!(
            KeyRing::open(&wrong, &store, 3).await,
            Err(KeyError::UnwrapFailed)
        ));
    }
}
