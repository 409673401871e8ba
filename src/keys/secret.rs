//! Secret key types. Each one zeroizes on drop, has neither `Debug` nor `Clone`, and hands out its
//! bytes only through `expose_secret`, so every use of raw key material is greppable. The bytes
//! live in locked memory where the OS allows ([`super::locked`]).

use aws_lc_rs::rand::{SecureRandom, SystemRandom};
use zeroize::Zeroize;

use super::locked::LockedBytes;

/// Length of every symmetric key in the hierarchy (AES-256).
pub const KEY_LEN: usize = 32;

macro_rules! secret_key {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        pub struct $name(LockedBytes<KEY_LEN>);

        impl $name {
            /// A fresh key from the operating system's CSPRNG, generated in locked memory.
            pub fn generate() -> Result<Self, aws_lc_rs::error::Unspecified> {
                let mut bytes = LockedBytes::zeroed();
                SystemRandom::new().fill(bytes.expose_mut())?;
                Ok(Self(bytes))
            }

            /// Takes ownership of raw key bytes (for example just unwrapped); the caller's copy
            /// is wiped.
            pub fn from_bytes(bytes: &mut [u8; KEY_LEN]) -> Self {
                let mut key = LockedBytes::zeroed();
                key.expose_mut().copy_from_slice(bytes);
                bytes.zeroize();
                Self(key)
            }

            /// The one way out of the type: raw bytes, for a KDF or a cipher constructor.
            pub fn expose_secret(&self) -> &[u8; KEY_LEN] {
                self.0.expose()
            }
        }
    };
}

secret_key!(
    /// The root of the key hierarchy: it wraps the KEK ring and the vault's signing keys.
    RootKey
);
secret_key!(
    /// A key-encryption key, one version of the KEK ring; it wraps DEKs.
    Kek
);
secret_key!(
    /// The data-encryption key of one model version; per-file subkeys derive from it by HKDF.
    Dek
);

/// A credential held as text (an HSM PIN): wiped on drop, printed as `[redacted]`, read through
/// `expose_secret` only. It is configuration, so unlike keys it can be cloned with the config.
#[derive(Clone, Default, serde::Deserialize, serde::Serialize)]
#[serde(transparent)]
pub struct SecretText(String);

impl SecretText {
    pub fn new(text: String) -> Self {
        Self(text)
    }

    pub fn expose_secret(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for SecretText {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("[redacted]")
    }
}

impl Drop for SecretText {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn from_bytes_wipes_the_source() {
        let mut raw = [7u8; KEY_LEN];
        let key = Dek::from_bytes(&mut raw);
        assert_eq!(raw, [0u8; KEY_LEN]);
        assert_eq!(key.expose_secret(), &[7u8; KEY_LEN]);
    }

    #[test]
    fn generated_keys_differ() {
        let a = Dek::generate().unwrap();
        let b = Dek::generate().unwrap();
        assert_ne!(a.expose_secret(), b.expose_secret());
    }

    #[test]
    fn secret_text_never_prints() {
        let pin = SecretText::new("1234-secret".into());
        assert_eq!(format!("{pin:?}"), "[redacted]");
        assert_eq!(pin.expose_secret(), "1234-secret");
    }
}
