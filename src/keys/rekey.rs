//! Rekey and seal migration: a new root key, everything the old one wrapped (the KEK ring, the
//! manifest and log signing keys) wrapped again under it, and a new seal state, in one atomic
//! store change (`MetadataStore::change_root_material`). At every instant exactly one root key
//! opens the ring: the old one before the change commits, the new one after.
//!
//! When the new root key exists only as shares, the change happens in two steps so that a lost
//! response cannot lose the key: [`stage`] stores the re-wrapped material as a pending rekey
//! (the old root key still rules), and [`commit`] applies it only once a threshold of the new
//! shares has come back and opens the new verifier. A pending rekey that is never committed is
//! harmless and is replaced by the next one.

use serde::{Deserialize, Serialize};

use super::ring::{ROOT_WRAPPED_SECRETS, kek_aad, root_wrapped_secret_aad};
use super::seal::{PENDING_NAME, STATE_NAME, SealState};
use super::{KeyError, RootKey, wrap};
use crate::store::{KekRecord, MetadataStore, RootChange, StoreError};

/// Everything the root key wraps, wrapped under a new root key.
pub struct Rewrapped {
    pub keks: Vec<KekRecord>,
    pub secrets: Vec<(String, Vec<u8>)>,
    /// What each root-wrapped secret name held when it was read (`None`: absent). The change
    /// that applies the new root key expects exactly this, so a secret created meanwhile under
    /// the old root key (another replica's first unlock) makes it conflict instead of being left
    /// behind under a root key that no longer exists.
    pub base_secrets: Vec<(String, Option<Vec<u8>>)>,
}

/// Unwraps every root-wrapped item with `old` and wraps it under `new`. Fails with
/// [`KeyError::UnwrapFailed`] (changing nothing) if `old` does not open one of them.
pub async fn rewrap_all(
    old: &RootKey,
    new: &RootKey,
    store: &dyn MetadataStore,
) -> Result<Rewrapped, KeyError> {
    let mut keks = Vec::new();
    for rec in store.keks().await? {
        let aad = kek_aad(rec.version);
        let raw = wrap::unwrap(old.expose_secret(), &rec.wrapped, &aad)?;
        keks.push(KekRecord {
            version: rec.version,
            wrapped: wrap::wrap(new.expose_secret(), &raw, &aad)?,
            created_ms: rec.created_ms,
        });
    }
    let mut secrets = Vec::new();
    let mut base_secrets = Vec::new();
    for name in ROOT_WRAPPED_SECRETS {
        let stored = store.get_wrapped_secret(name).await?;
        base_secrets.push((name.to_string(), stored.clone()));
        if let Some(w) = stored {
            let aad = root_wrapped_secret_aad(name);
            let raw = wrap::unwrap(old.expose_secret(), &w, &aad)?;
            secrets.push((
                name.to_string(),
                wrap::wrap(new.expose_secret(), &raw, &aad)?,
            ));
        }
    }
    Ok(Rewrapped {
        keks,
        secrets,
        base_secrets,
    })
}

/// Applies a new root key at once: re-wrapped material and the new seal state (or no state, for
/// a file seal), if the stored state is still `expect_state`.
pub async fn apply_now(
    store: &dyn MetadataStore,
    rewrapped: Rewrapped,
    new_state: Option<&SealState>,
    expect_state: Option<Vec<u8>>,
) -> Result<(), KeyError> {
    let mut put = rewrapped.secrets;
    let mut delete = vec![PENDING_NAME.to_string()];
    match new_state {
        Some(s) => put.push((STATE_NAME.to_string(), s.encode())),
        None => delete.push(STATE_NAME.to_string()),
    }
    let mut expect = vec![(STATE_NAME.to_string(), expect_state)];
    expect.extend(rewrapped.base_secrets);
    let change = RootChange {
        keks: Some(rewrapped.keks),
        expect,
        put,
        delete,
    };
    store.change_root_material(&change).await.map_err(conflict)
}

fn conflict(e: StoreError) -> KeyError {
    match e {
        StoreError::Conflict(what) => KeyError::Seal(format!(
            "{what}: another rekey, KEK rotation or seal change ran at the same time; nothing was changed, try again"
        )),
        other => other.into(),
    }
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct PendingKek {
    version: u32,
    wrapped: String,
    created_ms: u64,
}

/// A staged rekey: the new seal state and the material re-wrapped under the new root key, valid
/// only while the stored state is still `base_state`.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PendingRekey {
    pub state: SealState,
    /// The stored seal state it replaces (hex of its bytes), `None` for a file seal.
    base_state: Option<String>,
    keks: Vec<PendingKek>,
    secrets: Vec<(String, String)>,
    /// [`Rewrapped::base_secrets`] (hex), checked again at the commit.
    #[serde(default)]
    base_secrets: Vec<(String, Option<String>)>,
    pub staged_ms: u64,
}

/// Step one of a share-based rekey: stores the pending rekey (replacing an earlier one). The
/// old root key still opens everything afterwards.
pub async fn stage(
    store: &dyn MetadataStore,
    rewrapped: Rewrapped,
    state: SealState,
    base_state: Option<Vec<u8>>,
    now: u64,
) -> Result<(), KeyError> {
    let pending = PendingRekey {
        state,
        base_state: base_state.as_deref().map(hex::encode),
        keks: rewrapped
            .keks
            .into_iter()
            .map(|k| PendingKek {
                version: k.version,
                wrapped: hex::encode(k.wrapped),
                created_ms: k.created_ms,
            })
            .collect(),
        secrets: rewrapped
            .secrets
            .into_iter()
            .map(|(n, w)| (n, hex::encode(w)))
            .collect(),
        base_secrets: rewrapped
            .base_secrets
            .iter()
            .map(|(n, w)| (n.clone(), w.as_deref().map(hex::encode)))
            .collect(),
        staged_ms: now,
    };
    let bytes = serde_json::to_vec(&pending).expect("pending rekey serializes");
    let mut expect = vec![(STATE_NAME.to_string(), base_state)];
    expect.extend(rewrapped.base_secrets);
    let change = RootChange {
        keks: None,
        expect,
        put: vec![(PENDING_NAME.to_string(), bytes)],
        delete: vec![],
    };
    store.change_root_material(&change).await.map_err(conflict)
}

/// The staged rekey, if any.
pub async fn pending(store: &dyn MetadataStore) -> Result<Option<PendingRekey>, KeyError> {
    match store.get_wrapped_secret(PENDING_NAME).await? {
        Some(b) => serde_json::from_slice(&b)
            .map(Some)
            .map_err(|e| KeyError::Seal(format!("stored pending rekey is unreadable: {e}"))),
        None => Ok(None),
    }
}

/// Step two: applies the staged rekey if `new_root` opens its verifier (the shares came back)
/// and nothing changed since it was staged. Returns the new state. A wrong key is
/// [`KeyError::UnwrapFailed`] and changes nothing.
pub async fn commit(store: &dyn MetadataStore, new_root: &RootKey) -> Result<SealState, KeyError> {
    let raw = store
        .get_wrapped_secret(PENDING_NAME)
        .await?
        .ok_or_else(|| KeyError::Seal("no rekey is pending".into()))?;
    let p: PendingRekey = serde_json::from_slice(&raw)
        .map_err(|e| KeyError::Seal(format!("stored pending rekey is unreadable: {e}")))?;
    if !p.state.opens(new_root) {
        return Err(KeyError::UnwrapFailed);
    }
    let bad = |_| KeyError::Seal("stored pending rekey is unreadable".into());
    let base_state = p
        .base_state
        .as_deref()
        .map(hex::decode)
        .transpose()
        .map_err(bad)?;
    let mut keks = Vec::new();
    for k in &p.keks {
        keks.push(KekRecord {
            version: k.version,
            wrapped: hex::decode(&k.wrapped).map_err(bad)?,
            created_ms: k.created_ms,
        });
    }
    let mut put = vec![(STATE_NAME.to_string(), p.state.encode())];
    for (n, w) in &p.secrets {
        put.push((n.clone(), hex::decode(w).map_err(bad)?));
    }
    let mut expect = vec![
        (STATE_NAME.to_string(), base_state),
        (PENDING_NAME.to_string(), Some(raw)),
    ];
    for (n, w) in &p.base_secrets {
        let w = w.as_deref().map(hex::decode).transpose().map_err(bad)?;
        expect.push((n.clone(), w));
    }
    let change = RootChange {
        keks: Some(keks),
        expect,
        put,
        delete: vec![PENDING_NAME.to_string()],
    };
    store
        .change_root_material(&change)
        .await
        .map_err(conflict)?;
    Ok(p.state)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::KeyRing;
    use crate::keys::seal::{SealKind, stored_state};
    use crate::store::sqlite::SqliteStore;

    #[tokio::test]
    async fn a_staged_rekey_changes_nothing_until_committed_with_the_new_key() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("m.db")).await.unwrap();
        let old = RootKey::generate().unwrap();
        let (ring, _) = KeyRing::open(&old, &store, 1).await.unwrap();
        let (dek, kv, wrapped) = ring.new_dek("m", &[1; 16]).unwrap();
        drop(ring);

        let new = RootKey::generate().unwrap();
        let state = SealState::new(SealKind::Shamir, &new, 2, 3, 2).unwrap();
        let rw = rewrap_all(&old, &new, &store).await.unwrap();
        stage(&store, rw, state.clone(), None, 2).await.unwrap();
        // Staged only: the old key still opens the ring, the new one does not.
        assert!(KeyRing::open(&old, &store, 3).await.is_ok());
        assert!(KeyRing::open(&new, &store, 3).await.is_err());
        assert!(stored_state(&store).await.unwrap().is_none());

        // A wrong key does not commit.
        let wrong = RootKey::generate().unwrap();
        assert!(matches!(
            commit(&store, &wrong).await,
            Err(KeyError::UnwrapFailed)
        ));
        assert!(KeyRing::open(&old, &store, 3).await.is_ok());

        assert_eq!(commit(&store, &new).await.unwrap(), state);
        assert!(matches!(
            KeyRing::open(&old, &store, 4).await,
            Err(KeyError::UnwrapFailed)
        ));
        let (again, _) = KeyRing::open(&new, &store, 4).await.unwrap();
        let back = again.unwrap_dek(kv, &wrapped, "m", &[1; 16]).unwrap();
        assert_eq!(back.expose_secret(), dek.expose_secret());
        assert_eq!(stored_state(&store).await.unwrap(), Some(state));
        assert!(pending(&store).await.unwrap().is_none());
        // Committing twice is refused.
        assert!(commit(&store, &new).await.is_err());
    }

    #[tokio::test]
    async fn a_kek_added_after_staging_makes_the_commit_conflict() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("m.db")).await.unwrap();
        let old = RootKey::generate().unwrap();
        let (ring, _) = KeyRing::open(&old, &store, 1).await.unwrap();
        let new = RootKey::generate().unwrap();
        let state = SealState::new(SealKind::Shamir, &new, 2, 3, 2).unwrap();
        let rw = rewrap_all(&old, &new, &store).await.unwrap();
        stage(&store, rw, state, None, 2).await.unwrap();
        let v = ring.next_kek_version(&store).await.unwrap();
        ring.add_kek(&store, v, 3).await.unwrap();
        assert!(matches!(commit(&store, &new).await, Err(KeyError::Seal(_))));
        // Still entirely under the old key, the new KEK included.
        assert!(KeyRing::open(&old, &store, 4).await.is_ok());
    }

    #[tokio::test]
    async fn a_root_wrapped_secret_created_meanwhile_makes_the_change_conflict() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("m.db")).await.unwrap();
        let old = RootKey::generate().unwrap();
        KeyRing::open(&old, &store, 1).await.unwrap();
        let name = ROOT_WRAPPED_SECRETS[0];
        let stored = store.get_wrapped_secret(name).await.unwrap().unwrap();
        // As if this secret had not been created yet when the rekey read the store ...
        store
            .change_root_material(&RootChange {
                delete: vec![name.to_string()],
                ..RootChange::default()
            })
            .await
            .unwrap();
        let new = RootKey::generate().unwrap();
        let rw = rewrap_all(&old, &new, &store).await.unwrap();
        let staged_rw = rewrap_all(&old, &new, &store).await.unwrap();
        let state = SealState::new(SealKind::Shamir, &new, 2, 3, 2).unwrap();
        stage(&store, staged_rw, state, None, 2).await.unwrap();
        // ... and another replica created it under the old root key in between.
        assert!(
            store
                .put_wrapped_secret_if_absent(name, &stored)
                .await
                .unwrap()
        );
        let state = SealState::new(SealKind::Pkcs11, &new, 0, 0, 3).unwrap();
        assert!(matches!(
            apply_now(&store, rw, Some(&state), None).await,
            Err(KeyError::Seal(_))
        ));
        assert!(matches!(commit(&store, &new).await, Err(KeyError::Seal(_))));
        // Nothing moved: the old root key still opens everything, the secret included.
        assert!(stored_state(&store).await.unwrap().is_none());
        assert!(KeyRing::open(&old, &store, 4).await.is_ok());
        assert_eq!(store.get_wrapped_secret(name).await.unwrap(), Some(stored));
    }

    #[tokio::test]
    async fn rewrapping_with_a_wrong_old_key_fails() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("m.db")).await.unwrap();
        let old = RootKey::generate().unwrap();
        KeyRing::open(&old, &store, 1).await.unwrap();
        let other = RootKey::generate().unwrap();
        assert!(matches!(
            rewrap_all(&other, &other, &store).await,
            Err(KeyError::UnwrapFailed)
        ));
    }
}
