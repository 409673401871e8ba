//! The `pkcs11` seal: the root key is encrypted by a non-extractable AES-256 key that never
//! leaves an HSM (any PKCS#11 v2.40+ module; SoftHSM for trying it). The vault keeps only the
//! ciphertext (in its store) and asks the HSM to decrypt it at start, so it unseals itself.
//!
//! Mechanism: CKM_AES_GCM inside the token (PKCS#11 v2.40 §2.10.4 / NIST SP 800-38D) with a
//! random 96-bit IV, a 128-bit tag and associated data naming the vault's seal generation.
//! Stored layout: `0x01 || iv (12) || ciphertext (32) || tag (16)`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use aws_lc_rs::rand::{SecureRandom, SystemRandom};
use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;
use zeroize::Zeroizing;

use super::KeyError;
use super::seal::RootKeyWrapper;
use super::secret::{KEY_LEN, RootKey, SecretText};

const LAYOUT_VERSION: u8 = 1;
const IV_LEN: usize = 12;
const TAG_BITS: u64 = 128;
const TAG_LEN: usize = 16;

/// Where the wrapping key lives.
pub struct HsmParams {
    pub module: PathBuf,
    /// The slot id, or (when `None`) the slot whose token has `token_label`.
    pub slot: Option<u64>,
    pub token_label: Option<String>,
    pub key_label: String,
    pub pin: SecretText,
}

fn seal_err(msg: impl Into<String>) -> KeyError {
    KeyError::Seal(msg.into())
}

/// One initialized context per module for the whole process: C_Initialize may run once, and
/// finalizing while another user holds a session would break it. With it comes the module's
/// operation lock (see [`HsmSeal::one_at_a_time`]).
fn context(module: &Path) -> Result<(Pkcs11, Arc<Mutex<()>>), KeyError> {
    type Contexts = HashMap<PathBuf, (Pkcs11, Arc<Mutex<()>>)>;
    static CONTEXTS: OnceLock<Mutex<Contexts>> = OnceLock::new();
    let mut map = CONTEXTS
        .get_or_init(|| Mutex::new(HashMap::new()))
        .lock()
        .map_err(|_| seal_err("pkcs11 context lock poisoned"))?;
    // A module reached through a symlink or another spelling of its path is the same library
    // (one dlopen handle, one C_Initialize), so it gets the same context and lock.
    let key = std::fs::canonicalize(module).unwrap_or_else(|_| module.to_path_buf());
    if let Some((ctx, ops)) = map.get(&key) {
        return Ok((ctx.clone(), ops.clone()));
    }
    if !module.is_file() {
        return Err(seal_err(format!(
            "pkcs11 module {}: no such file (install the HSM's PKCS#11 library, e.g. softhsm2, or fix seal.module)",
            module.display()
        )));
    }
    let ctx = Pkcs11::new(module).map_err(|e| {
        seal_err(format!(
            "pkcs11 module {}: cannot load: {e}",
            module.display()
        ))
    })?;
    match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
        Err(e) => {
            return Err(seal_err(format!(
                "pkcs11 module {}: C_Initialize: {e}",
                module.display()
            )));
        }
    }
    let ops = Arc::new(Mutex::new(()));
    map.insert(key, (ctx.clone(), ops.clone()));
    Ok((ctx, ops))
}

/// A root-key wrapper backed by an AES-256 key inside a PKCS#11 token.
pub struct HsmSeal {
    ctx: Pkcs11,
    ops: Arc<Mutex<()>>,
    slot: Slot,
    key_label: String,
    pin: SecretText,
    describe: String,
}

impl HsmSeal {
    /// Loads the module and finds the token. Does not log in yet.
    pub fn open(p: HsmParams) -> Result<Self, KeyError> {
        let (ctx, ops) = context(&p.module)?;
        // The lock guards no data: a panic while it was held leaves nothing half-changed.
        let one = ops
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let slots = ctx
            .get_slots_with_token()
            .map_err(|e| seal_err(format!("pkcs11: listing slots: {e}")))?;
        let slot = match (p.slot, &p.token_label) {
            (Some(id), _) => slots.into_iter().find(|s| s.id() == id).ok_or_else(|| {
                seal_err(format!(
                    "pkcs11 module {}: no token in slot {id}",
                    p.module.display()
                ))
            })?,
            (None, Some(label)) => slots
                .into_iter()
                .find(|s| {
                    ctx.get_token_info(*s)
                        .map(|t| t.label().trim_end() == label)
                        .unwrap_or(false)
                })
                .ok_or_else(|| {
                    seal_err(format!(
                        "pkcs11 module {}: no token labelled {label:?} (initialize one, e.g. softhsm2-util --init-token)",
                        p.module.display()
                    ))
                })?,
            (None, None) => return Err(seal_err("pkcs11: set seal.slot or seal.token_label")),
        };
        drop(one);
        let describe = format!(
            "pkcs11 {} slot {} key {:?}",
            p.module.display(),
            slot.id(),
            p.key_label
        );
        Ok(Self {
            ctx,
            ops,
            slot,
            key_label: p.key_label,
            pin: p.pin,
            describe,
        })
    }

    /// Held for the whole of each operation (session, login, key lookup, the mechanism),
    /// so the process runs one HSM operation per module at a time. PKCS#11 v2.40 §5.1 lets
    /// an application with CKF_OS_LOCKING_OK call in from many threads, but modules get it
    /// wrong: SoftHSM's file object store fails concurrent key creation with
    /// CKR_GENERAL_ERROR (seen here; `operations_from_many_threads_at_once_all_succeed`).
    /// The seal calls the HSM a few times per start, rekey or migration, so nothing waits
    /// for long.
    fn one_at_a_time(&self) -> Result<MutexGuard<'_, ()>, KeyError> {
        // The lock guards no data: a panic while it was held leaves nothing half-changed.
        Ok(self
            .ops
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner))
    }

    fn session(&self) -> Result<Session, KeyError> {
        let session = self
            .ctx
            .open_rw_session(self.slot)
            .map_err(|e| seal_err(format!("pkcs11: opening a session: {e}")))?;
        let pin = AuthPin::from(self.pin.expose_secret().to_owned());
        match session.login(UserType::User, Some(&pin)) {
            Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => Ok(session),
            // The PIN itself never appears in a message.
            Err(e) => Err(seal_err(format!(
                "pkcs11: login to slot {}: {e}",
                self.slot.id()
            ))),
        }
    }

    fn find_key(&self, session: &Session) -> Result<Option<ObjectHandle>, KeyError> {
        let found = session
            .find_objects(&[
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::KeyType(KeyType::AES),
                Attribute::Label(self.key_label.as_bytes().to_vec()),
            ])
            .map_err(|e| seal_err(format!("pkcs11: finding key {:?}: {e}", self.key_label)))?;
        match found.as_slice() {
            [] => Ok(None),
            [one] => {
                self.check_key(session, *one)?;
                Ok(Some(*one))
            }
            _ => Err(seal_err(format!(
                "pkcs11: {} keys are labelled {:?}; the label must name one key",
                found.len(),
                self.key_label
            ))),
        }
    }

    /// Fails closed on a key that could leave the token (PKCS#11 v2.40 §4.9: CKA_SENSITIVE
    /// true, CKA_EXTRACTABLE false), that would vanish with the session (CKA_TOKEN false), or
    /// that is not AES-256. An attribute the token does not report counts as the unsafe value.
    fn check_key(&self, session: &Session, key: ObjectHandle) -> Result<(), KeyError> {
        let attrs = session
            .get_attributes(
                key,
                &[
                    AttributeType::Extractable,
                    AttributeType::Sensitive,
                    AttributeType::Token,
                    AttributeType::ValueLen,
                    AttributeType::NeverExtractable,
                    AttributeType::AlwaysSensitive,
                ],
            )
            .map_err(|e| seal_err(format!("pkcs11: reading key attributes: {e}")))?;
        let has = |want: &Attribute| attrs.iter().any(|a| a == want);
        let problem = if !has(&Attribute::Extractable(false)) {
            Some("is extractable")
        } else if !has(&Attribute::Sensitive(true)) {
            Some("is not sensitive")
        } else if !has(&Attribute::Token(true)) {
            Some("is a session object, not stored in the token")
        } else if !has(&Attribute::ValueLen((KEY_LEN as u64).into())) {
            Some("is not an AES-256 key")
        } else {
            None
        };
        if let Some(problem) = problem {
            return Err(seal_err(format!(
                "pkcs11: key {:?} {problem}; the seal needs a non-extractable, sensitive AES-256 token key",
                self.key_label
            )));
        }
        // A key that was once extractable or readable may have copies outside the HSM; the
        // operator may have imported it on purpose (HSM backup), so this only warns.
        if !has(&Attribute::NeverExtractable(true)) || !has(&Attribute::AlwaysSensitive(true)) {
            tracing::warn!(
                key = %self.key_label,
                "pkcs11: the seal's HSM key was extractable or not sensitive at some time (CKA_NEVER_EXTRACTABLE / CKA_ALWAYS_SENSITIVE false): copies of it may exist outside the HSM"
            );
        }
        Ok(())
    }

    /// Creates the wrapping key in the token (AES-256, sensitive, never extractable) when no key
    /// has the label. Returns whether it was created.
    pub fn ensure_key(&self) -> Result<bool, KeyError> {
        let _one = self.one_at_a_time()?;
        let session = self.session()?;
        if self.find_key(&session)?.is_some() {
            return Ok(false);
        }
        session
            .generate_key(
                &Mechanism::AesKeyGen,
                &[
                    Attribute::Class(ObjectClass::SECRET_KEY),
                    Attribute::KeyType(KeyType::AES),
                    Attribute::ValueLen((KEY_LEN as u64).into()),
                    Attribute::Token(true),
                    Attribute::Private(true),
                    Attribute::Sensitive(true),
                    Attribute::Extractable(false),
                    Attribute::Encrypt(true),
                    Attribute::Decrypt(true),
                    Attribute::Label(self.key_label.as_bytes().to_vec()),
                ],
            )
            .map_err(|e| seal_err(format!("pkcs11: generating key {:?}: {e}", self.key_label)))?;
        Ok(true)
    }

    fn key(&self, session: &Session) -> Result<ObjectHandle, KeyError> {
        self.find_key(session)?.ok_or_else(|| {
            seal_err(format!(
                "pkcs11: no AES key labelled {:?} in slot {}",
                self.key_label,
                self.slot.id()
            ))
        })
    }
}

impl RootKeyWrapper for HsmSeal {
    fn describe(&self) -> String {
        self.describe.clone()
    }

    fn wrap_root(&self, root: &RootKey, aad: &[u8]) -> Result<Vec<u8>, KeyError> {
        let _one = self.one_at_a_time()?;
        let session = self.session()?;
        let key = self.key(&session)?;
        // NIST SP 800-38D §8.2.2: a fresh random 96-bit IV for every encryption under the HSM
        // key. §8.3 caps random-IV invocations at 2^32 per key; this key encrypts once per init,
        // rekey or migration, so a repeat is out of reach. Nothing about the IV is stored apart
        // from the ciphertext it belongs to, so no counter can roll back after a restore.
        let mut iv = [0u8; IV_LEN];
        SystemRandom::new()
            .fill(&mut iv)
            .map_err(|_| KeyError::Rng)?;
        let params = GcmParams::new(&mut iv, aad, TAG_BITS.into())
            .map_err(|e| seal_err(format!("pkcs11: GCM parameters: {e}")))?;
        let mechanism = Mechanism::AesGcm(params);
        let ct = session
            .encrypt(&mechanism, key, root.expose_secret())
            .map_err(|e| seal_err(format!("pkcs11: encrypting the root key: {e}")))?;
        let Mechanism::AesGcm(mut params) = mechanism else {
            return Err(seal_err("pkcs11: GCM parameters lost"));
        };
        // A token that generates the IV itself (SP 800-38D §8.2, PKCS#11 v3.0 FIPS-mode tokens)
        // writes it back into the parameter buffer; store the IV from there, never the one asked
        // for, or the ciphertext could never be opened again.
        let used: [u8; IV_LEN] = params
            .iv()
            .try_into()
            .map_err(|_| seal_err("pkcs11: the token changed the GCM IV length"))?;
        if ct.len() != KEY_LEN + TAG_LEN {
            return Err(seal_err(format!(
                "pkcs11: the token returned {} bytes for a {KEY_LEN}-byte key under AES-GCM with a {TAG_LEN}-byte tag",
                ct.len()
            )));
        }
        let mut out = Vec::with_capacity(1 + IV_LEN + ct.len());
        out.push(LAYOUT_VERSION);
        out.extend_from_slice(&used);
        out.extend_from_slice(&ct);
        Ok(out)
    }

    fn unwrap_root(&self, wrapped: &[u8], aad: &[u8]) -> Result<RootKey, KeyError> {
        if wrapped.len() != 1 + IV_LEN + KEY_LEN + TAG_LEN || wrapped[0] != LAYOUT_VERSION {
            return Err(KeyError::UnwrapFailed);
        }
        let _one = self.one_at_a_time()?;
        let session = self.session()?;
        let key = self.key(&session)?;
        let mut iv: [u8; IV_LEN] = wrapped[1..1 + IV_LEN].try_into().expect("length checked");
        let params = GcmParams::new(&mut iv, aad, TAG_BITS.into())
            .map_err(|e| seal_err(format!("pkcs11: GCM parameters: {e}")))?;
        // Every decryption failure is the one opaque unwrap error.
        let plain = Zeroizing::new(
            session
                .decrypt(&Mechanism::AesGcm(params), key, &wrapped[1 + IV_LEN..])
                .map_err(|_| KeyError::UnwrapFailed)?,
        );
        let mut raw = Zeroizing::new([0u8; KEY_LEN]);
        if plain.len() != KEY_LEN {
            return Err(KeyError::UnwrapFailed);
        }
        raw.copy_from_slice(&plain);
        Ok(RootKey::from_bytes(&mut raw))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SoftHSM from the environment (.ci/services/softhsm.sh), or `None` with a skip note.
    fn softhsm() -> Option<HsmParams> {
        let (Ok(module), Ok(_)) = (
            std::env::var("WEIGHTVAULT_TEST_PKCS11_MODULE"),
            std::env::var("SOFTHSM2_CONF"),
        ) else {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "SOFTHSM2_CONF / WEIGHTVAULT_TEST_PKCS11_MODULE unset under CI=true"
            );
            eprintln!("skipped: SOFTHSM2_CONF and WEIGHTVAULT_TEST_PKCS11_MODULE are not set");
            return None;
        };
        let label = format!(
            "wv-unit-{}",
            hex::encode(crate::grant::random::<6>().unwrap())
        );
        Some(HsmParams {
            module: module.into(),
            slot: None,
            token_label: Some(
                std::env::var("WEIGHTVAULT_TEST_PKCS11_TOKEN").unwrap_or("weightvault".into()),
            ),
            key_label: label,
            pin: SecretText::new(
                std::env::var("WEIGHTVAULT_TEST_PKCS11_PIN").unwrap_or("1234".into()),
            ),
        })
    }

    /// Creates an AES key under `label` with the given attributes, outside the seal's code.
    fn make_key(hsm: &HsmSeal, label: &str, len: u64, extractable: bool, token: bool) -> Session {
        let _one = hsm.one_at_a_time().unwrap();
        let session = hsm.session().unwrap();
        session
            .generate_key(
                &Mechanism::AesKeyGen,
                &[
                    Attribute::Class(ObjectClass::SECRET_KEY),
                    Attribute::KeyType(KeyType::AES),
                    Attribute::ValueLen(len.into()),
                    Attribute::Token(token),
                    Attribute::Sensitive(true),
                    Attribute::Extractable(extractable),
                    Attribute::Encrypt(true),
                    Attribute::Decrypt(true),
                    Attribute::Label(label.as_bytes().to_vec()),
                ],
            )
            .unwrap();
        session
    }

    #[test]
    fn wrap_round_trip_binds_the_aad_and_the_stored_iv() {
        let Some(p) = softhsm() else { return };
        let hsm = HsmSeal::open(p).unwrap();
        assert!(hsm.ensure_key().unwrap());
        assert!(!hsm.ensure_key().unwrap());
        let root = RootKey::generate().unwrap();
        let a = hsm.wrap_root(&root, b"aad-1").unwrap();
        let b = hsm.wrap_root(&root, b"aad-1").unwrap();
        assert_eq!(a.len(), 1 + IV_LEN + KEY_LEN + TAG_LEN);
        // A fresh IV each time (SP 800-38D §8.2.2).
        assert_ne!(a[1..1 + IV_LEN], b[1..1 + IV_LEN]);
        let back = hsm.unwrap_root(&a, b"aad-1").unwrap();
        assert_eq!(back.expose_secret(), root.expose_secret());
        assert!(matches!(
            hsm.unwrap_root(&a, b"aad-2"),
            Err(KeyError::UnwrapFailed)
        ));
        // The stored IV is the one used: changing it breaks the tag.
        let mut bad = a.clone();
        bad[1] ^= 1;
        assert!(matches!(
            hsm.unwrap_root(&bad, b"aad-1"),
            Err(KeyError::UnwrapFailed)
        ));
    }

    /// Seals in several threads at once, each creating its own key then wrapping and unwrapping
    /// under it. SoftHSM's file object store fails some concurrent object creations with
    /// CKR_GENERAL_ERROR; the vault's one-operation-at-a-time lock per module keeps every call
    /// whole.
    #[test]
    fn operations_from_many_threads_at_once_all_succeed() {
        let Some(p) = softhsm() else { return };
        let base = p.key_label.clone();
        let module = p.module.clone();
        let token = p.token_label.clone();
        let pin = p.pin.expose_secret().to_string();
        std::thread::scope(|s| {
            for t in 0..4 {
                let (base, module, token, pin) = (&base, &module, &token, &pin);
                s.spawn(move || {
                    for round in 0..6 {
                        let hsm = HsmSeal::open(HsmParams {
                            module: module.clone(),
                            slot: None,
                            token_label: token.clone(),
                            key_label: format!("{base}-t{t}-r{round}"),
                            pin: SecretText::new(pin.clone()),
                        })
                        .unwrap();
                        assert!(hsm.ensure_key().unwrap());
                        let root = RootKey::generate().unwrap();
                        let wrapped = hsm.wrap_root(&root, b"aad").unwrap();
                        let back = hsm.unwrap_root(&wrapped, b"aad").unwrap();
                        assert_eq!(back.expose_secret(), root.expose_secret());
                    }
                });
            }
        });
    }

    #[test]
    fn keys_that_could_leave_the_token_or_are_not_aes_256_are_refused() {
        let Some(p) = softhsm() else { return };
        let base = p.key_label.clone();
        let hsm = HsmSeal::open(p).unwrap();
        let root = RootKey::generate().unwrap();
        let with_label = |label: String| HsmSeal {
            ctx: hsm.ctx.clone(),
            ops: hsm.ops.clone(),
            slot: hsm.slot,
            key_label: label,
            pin: SecretText::new(hsm.pin.expose_secret().to_string()),
            describe: String::new(),
        };
        let cases: [(&str, u64, bool, bool, &str); 3] = [
            ("extractable", 32, true, true, "is extractable"),
            ("session", 32, false, false, "is a session object"),
            ("aes128", 16, false, true, "is not an AES-256 key"),
        ];
        for (what, len, extractable, token, expect) in cases {
            let label = format!("{base}-{what}");
            // The session stays open so that a session object stays visible.
            let keep = make_key(&hsm, &label, len, extractable, token);
            let seal = with_label(label);
            let e = seal.wrap_root(&root, b"aad").expect_err(what).to_string();
            assert!(e.contains(expect), "{what}: {e}");
            // ensure_key does not paper over it by creating a second key either.
            let e = seal.ensure_key().expect_err(what).to_string();
            assert!(e.contains(expect), "{what}: {e}");
            // Closing the session destroys its objects: one HSM operation at a time, too.
            let _one = hsm.one_at_a_time().unwrap();
            drop(keep);
        }
    }
}
