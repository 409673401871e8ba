//! Secret key types. Each one zeroizes on drop, has neither `Debug` nor `Clone`, and hands out its
//! bytes only through `expose_secret`, so every use of raw key material is greppable.

use aws_lc_rs::rand::{SecureRandom, SystemRandom};
use zeroize::{Zeroize, ZeroizeOnDrop};

/// Length of every symmetric key in the hierarchy (AES-256).
pub const KEY_LEN: usize = 32;

macro_rules! secret_key {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Zeroize, ZeroizeOnDrop)]
        pub struct $name([u8; KEY_LEN]);

        impl $name {
            /// A fresh key from the operating system's CSPRNG.
            pub fn generate() -> Result<Self, aws_lc_rs::error::Unspecified> {
                let mut bytes = [0u8; KEY_LEN];
                SystemRandom::new().fill(&mut bytes)?;
                Ok(Self(bytes))
            }

            /// Takes ownership of raw key bytes (for example just unwrapped); the caller's copy
            /// is wiped.
            pub fn from_bytes(bytes: &mut [u8; KEY_LEN]) -> Self {
                let key = Self(*bytes);
                bytes.zeroize();
                key
            }

            /// The one way out of the type: raw bytes, for a KDF or a cipher constructor.
            pub fn expose_secret(&self) -> &[u8; KEY_LEN] {
                &self.0
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
}
