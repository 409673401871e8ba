//! What the configured seal and the stored seal state say at start: the root key now (`file`,
//! `pkcs11`, including the first start and a migration from `file`), or wait for shares
//! (`shamir`), or wait for `operator init`. A configured seal that does not match what the store
//! was sealed with stops the start with a message saying what to change.

use super::rekey;
use super::seal::{
    self, RootKeyWrapper, SealKind, SealState, hsm_wrapper, load_file_root_key, ring_exists,
    stored_state,
};
use super::{KeyError, RootKey};
use crate::config::SealConfig;
use crate::store::{MetadataStore, RootChange};

/// Something the seal did at start, for the audit log once it is open.
pub enum SealEvent {
    Init(String),
    Migrate(String),
    KeyCreate(String),
}

pub enum Boot {
    /// The root key is here: unlock now.
    Root {
        root: RootKey,
        /// The seal state in force (`None` for a file seal).
        state: Option<SealState>,
        events: Vec<SealEvent>,
    },
    /// `shamir`: sealed until a threshold of shares arrives.
    Sealed(SealState),
    /// `shamir` with nothing stored yet: waiting for `operator init`.
    Uninitialized,
}

fn mismatch(configured: &str, stored: SealKind) -> KeyError {
    KeyError::Seal(format!(
        "the store's root key is sealed with {} but the config says seal.kind = \"{configured}\"; \
         set [seal] kind = \"{}\" (docs/key-ceremony.md)",
        stored.as_str(),
        stored.as_str()
    ))
}

/// Runs an HSM call off the async runtime (PKCS#11 calls block).
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, KeyError> + Send + 'static,
) -> Result<T, KeyError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| KeyError::Seal(format!("seal task failed: {e}")))?
}

/// Decides how this start gets its root key.
pub async fn boot(cfg: &SealConfig, store: &dyn MetadataStore, now: u64) -> Result<Boot, KeyError> {
    let stored = stored_state(store).await?;
    match cfg {
        SealConfig::File { path, create, .. } => {
            if let Some(s) = stored {
                return Err(mismatch("file", s.kind));
            }
            Ok(Boot::Root {
                root: load_file_root_key(path, *create)?,
                state: None,
                events: vec![],
            })
        }
        SealConfig::Shamir {} => match stored {
            Some(s) if s.kind == SealKind::Shamir => Ok(Boot::Sealed(s)),
            Some(s) => Err(mismatch("shamir", s.kind)),
            None if ring_exists(store).await? => Err(KeyError::Seal(
                "the key ring exists under a file root key: migrate it with \
                 `weightvault operator rekey --to shamir` while the file seal is still configured \
                 (docs/key-ceremony.md)"
                    .into(),
            )),
            None => Ok(Boot::Uninitialized),
        },
        SealConfig::Pkcs11 {
            migrate_from_file, ..
        } => {
            let hsm = std::sync::Arc::new(hsm_wrapper(cfg)?);
            match stored {
                Some(s) if s.kind == SealKind::Pkcs11 => {
                    if migrate_from_file.is_some() {
                        tracing::warn!(
                            "seal.migrate_from_file is set but the migration is done: remove it and destroy the old key file"
                        );
                    }
                    let wrapped = s
                        .wrapped_root
                        .as_deref()
                        .and_then(|h| hex::decode(h).ok())
                        .ok_or_else(|| {
                            KeyError::Seal(
                                "stored pkcs11 seal state has no wrapped root key".into(),
                            )
                        })?;
                    let aad = s.hsm_aad();
                    let h = hsm.clone();
                    let root = blocking(move || h.unwrap_root(&wrapped, &aad)).await?;
                    if !s.opens(&root) {
                        return Err(KeyError::UnwrapFailed);
                    }
                    Ok(Boot::Root {
                        root,
                        state: Some(s),
                        events: vec![],
                    })
                }
                Some(s) => Err(mismatch("pkcs11", s.kind)),
                None => {
                    // Decide first, touch the HSM after: a start that is refused creates no key.
                    let old_path = if ring_exists(store).await? {
                        let Some(old_path) = migrate_from_file else {
                            return Err(KeyError::Seal(
                                "the key ring exists under a file root key: to move it to the HSM set \
                                 seal.migrate_from_file to the old key file (docs/key-ceremony.md)"
                                    .into(),
                            ));
                        };
                        Some(old_path)
                    } else {
                        None
                    };
                    let new = RootKey::generate().map_err(|_| KeyError::Rng)?;
                    let mut state = SealState::new(SealKind::Pkcs11, &new, 0, 0, now)?;
                    // The old key is read (permissions checked) and proven to open the whole
                    // ring before anything is created in the HSM.
                    let rewrapped = match old_path {
                        Some(p) => {
                            let old = load_file_root_key(p, false)?;
                            Some(rekey::rewrap_all(&old, &new, store).await?)
                        }
                        None => None,
                    };
                    let mut events = Vec::new();
                    let h = hsm.clone();
                    if blocking(move || h.ensure_key()).await? {
                        events.push(SealEvent::KeyCreate(format!(
                            "HSM wrapping key created: {}",
                            hsm.describe()
                        )));
                    }
                    let wrapped = wrap_in_hsm(&hsm, &new, &state).await?;
                    state.wrapped_root = Some(hex::encode(wrapped));
                    if let Some(rewrapped) = rewrapped {
                        rekey::apply_now(store, rewrapped, Some(&state), None).await?;
                        events.push(SealEvent::Migrate(format!(
                            "root key moved from the file seal to pkcs11 ({}); new root generation {}; the old key file no longer opens the ring",
                            hsm.describe(),
                            state.generation
                        )));
                    } else {
                        store
                            .change_root_material(&RootChange {
                                expect: vec![(seal::STATE_NAME.into(), None)],
                                put: vec![(seal::STATE_NAME.into(), state.encode())],
                                ..RootChange::default()
                            })
                            .await?;
                        events.push(SealEvent::Init(format!(
                            "pkcs11 seal initialized ({}); root generation {}",
                            hsm.describe(),
                            state.generation
                        )));
                    }
                    Ok(Boot::Root {
                        root: new,
                        state: Some(state),
                        events,
                    })
                }
            }
        }
        SealConfig::CloudKms { .. } => Err(KeyError::Seal(
            "seal.kind = \"cloud_kms\" is not implemented in this version".into(),
        )),
    }
}

/// Encrypts `root` in the HSM, bound to `state`'s generation, and proves the result opens: the
/// HSM decrypts it again and it must give back `root`. The caller stores the ciphertext in the
/// same transaction that puts the new root key in force, so a ciphertext that could not be
/// opened (a token that changed the IV, a wrong key, a driver bug) would leave neither the old
/// nor the new root key able to open the ring; it is refused here instead, before anything is
/// stored.
pub async fn wrap_in_hsm<W: RootKeyWrapper + 'static>(
    hsm: &std::sync::Arc<W>,
    root: &RootKey,
    state: &SealState,
) -> Result<Vec<u8>, KeyError> {
    let aad = state.hsm_aad();
    let h = hsm.clone();
    let mut copy = *root.expose_secret();
    let key = RootKey::from_bytes(&mut copy);
    let (wrapped, back) = blocking(move || {
        let wrapped = h.wrap_root(&key, &aad)?;
        let back = h.unwrap_root(&wrapped, &aad);
        Ok((wrapped, back))
    })
    .await?;
    let same = back.is_ok_and(|k| {
        aws_lc_rs::constant_time::verify_slices_are_equal(k.expose_secret(), root.expose_secret())
            .is_ok()
    });
    if !same {
        return Err(KeyError::Seal(format!(
            "{}: the HSM's encryption of the new root key does not decrypt back to it; nothing was changed",
            hsm.describe()
        )));
    }
    Ok(wrapped)
}

/// The current root key of an auto-unseal or file seal, read again (for a rekey).
pub async fn current_root(
    cfg: &SealConfig,
    state: Option<&SealState>,
) -> Result<RootKey, KeyError> {
    match (cfg, state) {
        (SealConfig::File { path, .. }, None) => load_file_root_key(path, false),
        (SealConfig::Pkcs11 { .. }, Some(s)) if s.kind == SealKind::Pkcs11 => {
            let hsm = std::sync::Arc::new(hsm_wrapper(cfg)?);
            let wrapped = s
                .wrapped_root
                .as_deref()
                .and_then(|h| hex::decode(h).ok())
                .ok_or(KeyError::UnwrapFailed)?;
            let aad = s.hsm_aad();
            let root = blocking(move || hsm.unwrap_root(&wrapped, &aad)).await?;
            if s.opens(&root) {
                Ok(root)
            } else {
                Err(KeyError::UnwrapFailed)
            }
        }
        _ => Err(KeyError::Seal(
            "the root key of this seal comes from shares".into(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::wrap;

    /// A wrapper standing in for a token that encrypts under an IV other than the one it
    /// reports (or otherwise returns a ciphertext that does not open).
    struct Lying {
        key: [u8; 32],
        lie: bool,
    }

    impl RootKeyWrapper for Lying {
        fn describe(&self) -> String {
            "test wrapper".into()
        }
        fn wrap_root(&self, root: &RootKey, aad: &[u8]) -> Result<Vec<u8>, KeyError> {
            let mut w = wrap::wrap(&self.key, root.expose_secret(), aad)?;
            if self.lie {
                w[1] ^= 1;
            }
            Ok(w)
        }
        fn unwrap_root(&self, wrapped: &[u8], aad: &[u8]) -> Result<RootKey, KeyError> {
            let raw = wrap::unwrap(&self.key, wrapped, aad)?;
            let mut k = [0u8; 32];
            k.copy_from_slice(&raw);
            Ok(RootKey::from_bytes(&mut k))
        }
    }

    #[tokio::test]
    async fn a_wrapped_root_key_that_does_not_open_is_refused_before_it_is_stored() {
        let root = RootKey::generate().unwrap();
        let state = SealState::new(SealKind::Pkcs11, &root, 0, 0, 1).unwrap();
        let honest = std::sync::Arc::new(Lying {
            key: [5; 32],
            lie: false,
        });
        let w = wrap_in_hsm(&honest, &root, &state).await.unwrap();
        let back = honest.unwrap_root(&w, &state.hsm_aad()).unwrap();
        assert_eq!(back.expose_secret(), root.expose_secret());

        let lying = std::sync::Arc::new(Lying {
            key: [5; 32],
            lie: true,
        });
        let e = wrap_in_hsm(&lying, &root, &state).await.err().unwrap();
        assert!(e.to_string().contains("does not decrypt back"), "{e}");
    }
}
