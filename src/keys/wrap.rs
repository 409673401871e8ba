//! Key wrapping: AES-256-GCM (NIST SP 800-38D) with a random 96-bit nonce and associated data
//! that names what is wrapped and where it belongs, so a wrapped key moved to another context
//! does not unwrap. Layout: `0x01 || nonce (12) || ciphertext || tag (16)`.

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use aws_lc_rs::rand::{SecureRandom, SystemRandom};
use zeroize::Zeroizing;

use super::KeyError;

const WRAP_VERSION: u8 = 1;

fn cipher(key: &[u8; 32]) -> LessSafeKey {
    LessSafeKey::new(UnboundKey::new(&AES_256_GCM, key).expect("32-byte AES-256 key"))
}

/// Wraps `secret` under `key`, binding `aad`.
pub fn wrap(key: &[u8; 32], secret: &[u8], aad: &[u8]) -> Result<Vec<u8>, KeyError> {
    let mut nonce = [0u8; NONCE_LEN];
    // Random nonces: SP 800-38D §8.3 bounds this to 2^32 wraps per key; a KEK wraps one DEK per
    // model version and is rotated long before that.
    SystemRandom::new()
        .fill(&mut nonce)
        .map_err(|_| KeyError::Rng)?;
    let mut out = Vec::with_capacity(1 + NONCE_LEN + secret.len() + 16);
    out.push(WRAP_VERSION);
    out.extend_from_slice(&nonce);
    let mut body = secret.to_vec();
    cipher(key)
        .seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(aad),
            &mut body,
        )
        .map_err(|_| KeyError::Rng)?;
    out.extend_from_slice(&body);
    Ok(out)
}

/// Unwraps; every failure is [`KeyError::UnwrapFailed`].
pub fn unwrap(key: &[u8; 32], wrapped: &[u8], aad: &[u8]) -> Result<Zeroizing<Vec<u8>>, KeyError> {
    if wrapped.len() < 1 + NONCE_LEN + 16 || wrapped[0] != WRAP_VERSION {
        return Err(KeyError::UnwrapFailed);
    }
    let nonce: [u8; NONCE_LEN] = wrapped[1..1 + NONCE_LEN]
        .try_into()
        .expect("length checked");
    let mut body = Zeroizing::new(wrapped[1 + NONCE_LEN..].to_vec());
    let len = cipher(key)
        .open_in_place(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(aad),
            &mut body,
        )
        .map_err(|_| KeyError::UnwrapFailed)?
        .len();
    body.truncate(len);
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_context_binding() {
        let key = [3u8; 32];
        let w = wrap(&key, b"secret", b"ctx-a").unwrap();
        assert_eq!(&unwrap(&key, &w, b"ctx-a").unwrap()[..], b"secret");
        assert!(matches!(
            unwrap(&key, &w, b"ctx-b"),
            Err(KeyError::UnwrapFailed)
        ));
        assert!(matches!(
            unwrap(&[4u8; 32], &w, b"ctx-a"),
            Err(KeyError::UnwrapFailed)
        ));
        let mut bad = w.clone();
        *bad.last_mut().unwrap() ^= 1;
        assert!(matches!(
            unwrap(&key, &bad, b"ctx-a"),
            Err(KeyError::UnwrapFailed)
        ));
        assert!(matches!(
            unwrap(&key, &w[..10], b"ctx-a"),
            Err(KeyError::UnwrapFailed)
        ));
    }
}
