//! Shamir secret sharing of the root key (the `shamir` seal): N shares, any M of which rebuild it.
//! The arithmetic is the `blahaj` crate's (GF(2^8), one polynomial per key byte); its random
//! coefficients come from aws-lc-rs. A share on its own says nothing about the key.
//!
//! Text form of a share (docs/key-ceremony.md): `wvs1-` followed by hex of
//! `version (1) || generation (8) || threshold (1) || x (1) || y (32) || check (4)`, where
//! `check` is the first 4 bytes of SHA-256 over everything before it. The check catches typing
//! mistakes only; whether shares belong together is known only once M of them are combined and
//! the result opens the seal's verifier.

use aws_lc_rs::digest::{SHA256, digest};
use aws_lc_rs::rand::{SecureRandom, SystemRandom};
use zeroize::{Zeroize, Zeroizing};

use super::secret::{KEY_LEN, RootKey};

const PREFIX: &str = "wvs1-";
const VERSION: u8 = 1;
/// Length of the generation id that ties shares to one root key.
pub const GENERATION_LEN: usize = 8;
const BODY_LEN: usize = 1 + GENERATION_LEN + 1 + 1 + KEY_LEN;
const TEXT_LEN: usize = BODY_LEN + 4;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ShareError {
    #[error(
        "malformed share: expected {PREFIX} followed by {} hex digits with a valid check",
        TEXT_LEN * 2
    )]
    Malformed,
    #[error("share threshold must be 2..=N and N at most 255 (got {threshold} of {shares})")]
    BadParameters { shares: u8, threshold: u8 },
    #[error("random number generator failed")]
    Rng,
}

/// One parsed share. Wiped on drop; no `Debug`, no `Clone`.
pub struct Share {
    pub generation: [u8; GENERATION_LEN],
    pub threshold: u8,
    pub x: u8,
    y: Zeroizing<[u8; KEY_LEN]>,
}

impl Share {
    /// Parses the text form; surrounding whitespace is ignored.
    pub fn parse(text: &str) -> Result<Share, ShareError> {
        let text = text.trim();
        let hex_part = text.strip_prefix(PREFIX).ok_or(ShareError::Malformed)?;
        // Lower-case hex only, so each share has exactly one text form (the one `to_text`
        // writes): no second spelling of a share can slip past a comparison of texts.
        if hex_part.len() != TEXT_LEN * 2
            || !hex_part
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(ShareError::Malformed);
        }
        let mut raw = Zeroizing::new([0u8; TEXT_LEN]);
        hex::decode_to_slice(hex_part, &mut raw[..]).map_err(|_| ShareError::Malformed)?;
        let (body, check) = raw.split_at(BODY_LEN);
        if digest(&SHA256, body).as_ref()[..4] != *check || body[0] != VERSION {
            return Err(ShareError::Malformed);
        }
        let mut generation = [0u8; GENERATION_LEN];
        generation.copy_from_slice(&body[1..1 + GENERATION_LEN]);
        let threshold = body[1 + GENERATION_LEN];
        let x = body[2 + GENERATION_LEN];
        // x = 0 would be the secret itself; a threshold below 2 is not a sharing.
        if x == 0 || threshold < 2 {
            return Err(ShareError::Malformed);
        }
        let mut y = Zeroizing::new([0u8; KEY_LEN]);
        y.copy_from_slice(&body[3 + GENERATION_LEN..]);
        Ok(Share {
            generation,
            threshold,
            x,
            y,
        })
    }

    /// The text form, for printing once to the operator.
    pub fn to_text(&self) -> Zeroizing<String> {
        let mut raw = Zeroizing::new(Vec::with_capacity(TEXT_LEN));
        raw.push(VERSION);
        raw.extend_from_slice(&self.generation);
        raw.push(self.threshold);
        raw.push(self.x);
        raw.extend_from_slice(&self.y[..]);
        let check = digest(&SHA256, &raw);
        raw.extend_from_slice(&check.as_ref()[..4]);
        Zeroizing::new(format!("{PREFIX}{}", hex::encode(&raw[..])))
    }
}

/// The coefficient source for `blahaj`: bytes drawn in advance from aws-lc-rs, so the only
/// fallible step (the OS generator) happens before dealing starts.
struct PrefilledRng {
    bytes: Zeroizing<Vec<u8>>,
    pos: usize,
}

impl rand_core::TryRng for PrefilledRng {
    type Error = std::convert::Infallible;

    fn try_next_u32(&mut self) -> Result<u32, Self::Error> {
        let mut b = [0u8; 4];
        self.try_fill_bytes(&mut b)?;
        Ok(u32::from_le_bytes(b))
    }

    fn try_next_u64(&mut self) -> Result<u64, Self::Error> {
        let mut b = [0u8; 8];
        self.try_fill_bytes(&mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    fn try_fill_bytes(&mut self, dst: &mut [u8]) -> Result<(), Self::Error> {
        let end = self.pos + dst.len();
        // Sized for the worst case in `split`; running out would be a bug, never a weak key.
        assert!(end <= self.bytes.len(), "prefilled randomness exhausted");
        dst.copy_from_slice(&self.bytes[self.pos..end]);
        self.bytes[self.pos..end].zeroize();
        self.pos = end;
        Ok(())
    }
}

impl rand_core::TryCryptoRng for PrefilledRng {}

/// Splits the root key into `shares` shares, any `threshold` of which rebuild it.
pub fn split(
    root: &RootKey,
    generation: [u8; GENERATION_LEN],
    shares: u8,
    threshold: u8,
) -> Result<Vec<Share>, ShareError> {
    if threshold < 2 || threshold > shares {
        return Err(ShareError::BadParameters { shares, threshold });
    }
    // Each of the (threshold - 1) random coefficients per key byte is one uniform u8, which the
    // sampler draws from at most a few u32 (rejection sampling): 64 bytes per coefficient is
    // far more than it can use.
    let need = KEY_LEN * usize::from(threshold) * 64;
    let mut bytes = Zeroizing::new(vec![0u8; need]);
    SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| ShareError::Rng)?;
    let mut rng = PrefilledRng { bytes, pos: 0 };
    let dealt = blahaj::Sharks(threshold).dealer_rng(root.expose_secret(), &mut rng);
    let mut out = Vec::with_capacity(usize::from(shares));
    for s in dealt.take(usize::from(shares)) {
        let bytes = Zeroizing::new(Vec::from(&s));
        let mut y = Zeroizing::new([0u8; KEY_LEN]);
        y.copy_from_slice(&bytes[1..]);
        out.push(Share {
            generation,
            threshold,
            x: bytes[0],
            y,
        });
    }
    Ok(out)
}

/// Rebuilds a candidate root key from at least `threshold` shares of one generation with
/// distinct `x`; anything else (too few, mixed generations or thresholds, a repeated `x`) is
/// `None`. Callers check these first to give a precise answer; the checks are repeated here so
/// that no caller can interpolate through a repeated point or below the threshold. A wrong share
/// gives a wrong key, not an error: the caller checks the result against the seal's verifier.
pub fn combine(shares: &[Share]) -> Option<RootKey> {
    let first = shares.first()?;
    let threshold = first.threshold;
    let mut seen = [false; 256];
    for s in shares {
        if s.generation != first.generation
            || s.threshold != threshold
            || std::mem::replace(&mut seen[usize::from(s.x)], true)
        {
            return None;
        }
    }
    // Shamir: fewer than `threshold` points leave the polynomial undetermined.
    if shares.len() < usize::from(threshold) {
        return None;
    }
    let parsed: Vec<blahaj::Share> = shares
        .iter()
        .filter_map(|s| {
            let mut raw = Zeroizing::new(Vec::with_capacity(1 + KEY_LEN));
            raw.push(s.x);
            raw.extend_from_slice(&s.y[..]);
            blahaj::Share::try_from(&raw[..]).ok()
        })
        .collect();
    let secret = Zeroizing::new(blahaj::Sharks(threshold).recover(&parsed).ok()?);
    let mut key = Zeroizing::new([0u8; KEY_LEN]);
    if secret.len() != KEY_LEN {
        return None;
    }
    key.copy_from_slice(&secret);
    Some(RootKey::from_bytes(&mut key))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn texts(shares: &[Share]) -> Vec<String> {
        shares.iter().map(|s| s.to_text().to_string()).collect()
    }

    #[test]
    fn any_threshold_subset_rebuilds_and_fewer_do_not() {
        let root = RootKey::generate().unwrap();
        let shares = split(&root, [7; 8], 5, 3).unwrap();
        let t = texts(&shares);
        let parse = |idx: &[usize]| -> Vec<Share> {
            idx.iter().map(|i| Share::parse(&t[*i]).unwrap()).collect()
        };
        for set in [[0, 1, 2], [0, 2, 4], [4, 3, 1]] {
            let k = combine(&parse(&set)).unwrap();
            assert_eq!(k.expose_secret(), root.expose_secret());
        }
        // Two shares are below the threshold: blahaj refuses.
        assert!(combine(&parse(&[0, 1])).is_none());
    }

    #[test]
    fn a_changed_share_rebuilds_another_key() {
        let root = RootKey::generate().unwrap();
        let shares = split(&root, [1; 8], 3, 2).unwrap();
        let mut a = Share::parse(&shares[0].to_text()).unwrap();
        a.y[0] ^= 1;
        let b = Share::parse(&shares[1].to_text()).unwrap();
        let k = combine(&[a, b]).unwrap();
        assert_ne!(k.expose_secret(), root.expose_secret());
    }

    #[test]
    fn text_form_round_trips_and_rejects_typos() {
        let root = RootKey::generate().unwrap();
        let shares = split(&root, [9; 8], 2, 2).unwrap();
        let t = shares[0].to_text();
        let back = Share::parse(&format!("  {}\n", &*t)).unwrap();
        assert_eq!(&*back.to_text(), &*t);
        assert_eq!(back.generation, [9; 8]);
        assert_eq!((back.threshold, back.x), (2, 1));
        // One changed digit fails the check; so do a bad prefix, length and hex.
        let mut typo = t.to_string().into_bytes();
        let last = typo.len() - 10;
        typo[last] = if typo[last] == b'0' { b'1' } else { b'0' };
        for bad in [
            String::from_utf8(typo).unwrap(),
            t.replace("wvs1-", "wvs2-"),
            t[..t.len() - 2].to_string(),
            format!("{}zz", &t[..t.len() - 2]),
            String::new(),
        ] {
            assert_eq!(
                Share::parse(&bad).err(),
                Some(ShareError::Malformed),
                "{bad}"
            );
        }
    }

    #[test]
    fn a_share_has_one_text_form() {
        let root = RootKey::generate().unwrap();
        let shares = split(&root, [0xab; 8], 2, 2).unwrap();
        let t = shares[0].to_text();
        // The same bytes in upper case are refused: the lower-case form is the only one.
        let upper = format!("wvs1-{}", t[5..].to_ascii_uppercase());
        assert_ne!(upper, *t);
        assert_eq!(Share::parse(&upper).err(), Some(ShareError::Malformed));
    }

    #[test]
    fn combine_refuses_repeated_points_mixed_generations_and_too_few() {
        let root = RootKey::generate().unwrap();
        let shares = split(&root, [3; 8], 4, 3).unwrap();
        let t = texts(&shares);
        let p = |i: usize| Share::parse(&t[i]).unwrap();
        // Three shares, but one point twice: only two distinct points, below the threshold.
        assert!(combine(&[p(0), p(1), p(1)]).is_none());
        assert!(combine(&[p(0), p(1)]).is_none());
        assert!(combine(&[]).is_none());
        // The same point under another generation or threshold does not mix in.
        let other = split(&root, [4; 8], 4, 3).unwrap();
        assert!(combine(&[p(0), p(1), Share::parse(&other[2].to_text()).unwrap()]).is_none());
        let other_m = split(&root, [3; 8], 4, 2).unwrap();
        assert!(combine(&[p(0), p(1), Share::parse(&other_m[2].to_text()).unwrap()]).is_none());
        // More than the threshold, all distinct: still the key.
        let k = combine(&[p(3), p(0), p(1), p(2)]).unwrap();
        assert_eq!(k.expose_secret(), root.expose_secret());
    }

    #[test]
    fn bad_parameters_are_refused() {
        let root = RootKey::generate().unwrap();
        assert!(split(&root, [0; 8], 3, 4).is_err());
        assert!(split(&root, [0; 8], 3, 1).is_err());
        assert_eq!(split(&root, [0; 8], 255, 2).unwrap().len(), 255);
    }
}
