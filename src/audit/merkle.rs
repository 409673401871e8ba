//! The RFC 6962 / RFC 9162 Merkle tree over SHA-256 that makes the audit log tamper-evident:
//! leaf and node hashing, the tree head (MTH), an [`Accumulator`] that keeps the head current in
//! O(log n) per append, and inclusion and consistency proofs (generation and verification).
//!
//! Pure: no I/O. Proof generation reads leaf hashes through a callback and recomputes the subtree
//! hashes it needs (O(size) hashing); verification is O(log size) and works for any `u64` size.

use aws_lc_rs::digest::{Context, SHA256};

/// A SHA-256 Merkle tree hash: a leaf hash, an interior node hash or a tree head.
pub type Hash = [u8; 32];

/// Why a proof or an accumulator state was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProofError {
    #[error("leaf index {index} is not below tree size {size}")]
    IndexOutOfRange { index: u64, size: u64 },
    #[error("invalid tree sizes for a consistency proof: {old_size} to {new_size}")]
    BadSizes { old_size: u64, new_size: u64 },
    #[error("proof has {got} hashes, expected {expected}")]
    WrongProofLength { expected: usize, got: usize },
    #[error("the proof does not lead to the expected root")]
    RootMismatch,
    #[error("the proof does not lead to the expected old root")]
    OldRootMismatch,
    #[error("a tree of size {size} has {expected} peaks, got {got}")]
    PeakCount {
        size: u64,
        expected: u32,
        got: usize,
    },
}

// RFC 9162 §2.1.1: leaf and interior-node domain separation.
const LEAF_PREFIX: u8 = 0x00;
const NODE_PREFIX: u8 = 0x01;

fn finish(ctx: Context) -> Hash {
    let digest = ctx.finish();
    let mut out = [0u8; 32];
    out.copy_from_slice(digest.as_ref());
    out
}

/// `SHA-256(0x00 || entry)`: the hash of one log entry (RFC 9162 §2.1.1).
pub fn leaf_hash(entry: &[u8]) -> Hash {
    let mut ctx = Context::new(&SHA256);
    ctx.update(&[LEAF_PREFIX]);
    ctx.update(entry);
    finish(ctx)
}

/// `SHA-256(0x01 || left || right)`: an interior node (RFC 9162 §2.1.1).
pub fn node_hash(left: &Hash, right: &Hash) -> Hash {
    let mut ctx = Context::new(&SHA256);
    ctx.update(&[NODE_PREFIX]);
    ctx.update(left);
    ctx.update(right);
    finish(ctx)
}

/// `SHA-256("")`: the head of the empty tree (RFC 9162 §2.1.1, `MTH({})`).
pub fn empty_root() -> Hash {
    finish(Context::new(&SHA256))
}

/// The tree head `MTH(D[n])` of the given leaf hashes (RFC 9162 §2.1.1).
pub fn root(leaves: &[Hash]) -> Hash {
    let mut acc = Accumulator::new();
    for leaf in leaves {
        acc.push(*leaf);
    }
    acc.root()
}

/// The compact range `[0, size)` of a tree: the roots of its maximal perfect subtrees ("peaks"),
/// largest (leftmost) first, one per set bit of `size`. Enough to append and to compute the head;
/// persist `size` and `peaks` and restore with [`Accumulator::from_parts`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Accumulator {
    size: u64,
    peaks: Vec<Hash>,
}

impl Accumulator {
    /// The empty tree.
    pub fn new() -> Self {
        Self::default()
    }

    /// Restores a state saved from [`Accumulator::size`] and [`Accumulator::peaks`]. The peak
    /// hashes cannot be checked here, only their number.
    pub fn from_parts(size: u64, peaks: Vec<Hash>) -> Result<Self, ProofError> {
        let expected = size.count_ones();
        if peaks.len() != expected as usize {
            return Err(ProofError::PeakCount {
                size,
                expected,
                got: peaks.len(),
            });
        }
        Ok(Self { size, peaks })
    }

    /// Number of leaves appended so far.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The peaks, largest subtree first.
    pub fn peaks(&self) -> &[Hash] {
        &self.peaks
    }

    /// Appends one leaf hash (see [`leaf_hash`]).
    ///
    /// # Panics
    /// If the tree already holds `u64::MAX` leaves.
    pub fn push(&mut self, leaf: Hash) {
        let new_size = self
            .size
            .checked_add(1)
            .expect("Merkle tree size overflows u64");
        // Each trailing one bit of the old size is a peak of the same height as the carry: merge.
        let mut carry = leaf;
        let mut bits = self.size;
        while bits & 1 == 1 {
            let left = self.peaks.pop().expect("peak count equals popcount(size)");
            carry = node_hash(&left, &carry);
            bits >>= 1;
        }
        self.peaks.push(carry);
        self.size = new_size;
    }

    /// `MTH` of all leaves so far: the peaks folded from the right (RFC 9162 §2.1.1 splits at the
    /// largest power of two, which is exactly the peak boundary).
    pub fn root(&self) -> Hash {
        let mut peaks = self.peaks.iter().rev();
        let Some(last) = peaks.next() else {
            return empty_root();
        };
        peaks.fold(*last, |right, left| node_hash(left, &right))
    }
}

/// The largest power of two strictly below `n` (RFC 9162 §2.1.1 `k`); requires `n > 1`.
fn split_point(n: u64) -> u64 {
    debug_assert!(n > 1);
    1 << (63 - (n - 1).leading_zeros())
}

/// `MTH(D[start : start + len])`, `len >= 1`.
fn subtree_root(start: u64, len: u64, leaf: &mut dyn FnMut(u64) -> Hash) -> Hash {
    let mut acc = Accumulator::new();
    for i in start..start + len {
        acc.push(leaf(i));
    }
    acc.root()
}

/// The inclusion proof (audit path) of leaf `index` in the tree of `size` leaves, deepest sibling
/// first. `leaf(i)` must return the hash of leaf `i` for every `i < size`.
pub fn inclusion_proof(
    index: u64,
    size: u64,
    leaf: &mut dyn FnMut(u64) -> Hash,
) -> Result<Vec<Hash>, ProofError> {
    if index >= size {
        return Err(ProofError::IndexOutOfRange { index, size });
    }
    let mut proof = Vec::new();
    path(index, 0, size, leaf, &mut proof);
    Ok(proof)
}

// RFC 9162 §2.1.3.1 PATH(m, D[start : start + n]), appended in the RFC's order.
fn path(m: u64, start: u64, n: u64, leaf: &mut dyn FnMut(u64) -> Hash, out: &mut Vec<Hash>) {
    if n == 1 {
        return;
    }
    let k = split_point(n);
    if m < k {
        path(m, start, k, leaf, out);
        out.push(subtree_root(start + k, n - k, leaf));
    } else {
        path(m - k, start + k, n - k, leaf, out);
        out.push(subtree_root(start, k, leaf));
    }
}

/// The consistency proof from the tree of `old_size` leaves to the tree of `new_size` leaves.
/// `old_size == new_size` gives the empty proof; `old_size == 0` is rejected (see
/// [`verify_consistency`]).
pub fn consistency_proof(
    old_size: u64,
    new_size: u64,
    leaf: &mut dyn FnMut(u64) -> Hash,
) -> Result<Vec<Hash>, ProofError> {
    if old_size == 0 || old_size > new_size {
        return Err(ProofError::BadSizes { old_size, new_size });
    }
    let mut proof = Vec::new();
    if old_size < new_size {
        // RFC 9162 §2.1.4.1: PROOF(m, D[n]) = SUBPROOF(m, D[n], true).
        subproof(old_size, 0, new_size, true, leaf, &mut proof);
    }
    Ok(proof)
}

// RFC 9162 §2.1.4.1 SUBPROOF(m, D[start : start + n], b).
fn subproof(
    m: u64,
    start: u64,
    n: u64,
    b: bool,
    leaf: &mut dyn FnMut(u64) -> Hash,
    out: &mut Vec<Hash>,
) {
    if m == n {
        if !b {
            out.push(subtree_root(start, n, leaf));
        }
        return;
    }
    let k = split_point(n);
    if m <= k {
        subproof(m, start, k, b, leaf, out);
        out.push(subtree_root(start + k, n - k, leaf));
    } else {
        subproof(m - k, start + k, n - k, false, leaf, out);
        out.push(subtree_root(start, k, leaf));
    }
}

/// Number of proof hashes the RFC 9162 §2.1.3.2 walk consumes for `index < size`: the same loop
/// as [`verify_inclusion`] without the hashing.
fn inclusion_proof_len(index: u64, size: u64) -> usize {
    let (mut f, mut s) = (index, size - 1);
    let mut len = 0;
    while s != 0 {
        // The left-sibling case of the walk; only its extra shifting matters without hashing.
        if f == s && f & 1 == 0 {
            while f & 1 == 0 && f != 0 {
                f >>= 1;
                s >>= 1;
            }
        }
        f >>= 1;
        s >>= 1;
        len += 1;
    }
    len
}

/// Verifies that `leaf` is leaf `index` of the tree of `size` leaves with head `root`.
pub fn verify_inclusion(
    leaf: &Hash,
    index: u64,
    size: u64,
    proof: &[Hash],
    root: &Hash,
) -> Result<(), ProofError> {
    // RFC 9162 §2.1.3.2 step 1.
    if index >= size {
        return Err(ProofError::IndexOutOfRange { index, size });
    }
    let expected = inclusion_proof_len(index, size);
    if proof.len() != expected {
        return Err(ProofError::WrongProofLength {
            expected,
            got: proof.len(),
        });
    }
    // RFC 9162 §2.1.3.2 steps 2-3.
    let (mut f, mut s) = (index, size - 1);
    let mut r = *leaf;
    // RFC 9162 §2.1.3.2 step 4.
    for p in proof {
        if s == 0 {
            return Err(ProofError::WrongProofLength {
                expected,
                got: proof.len(),
            });
        }
        if f & 1 == 1 || f == s {
            r = node_hash(p, &r);
            if f & 1 == 0 {
                while f & 1 == 0 && f != 0 {
                    f >>= 1;
                    s >>= 1;
                }
            }
        } else {
            r = node_hash(&r, p);
        }
        f >>= 1;
        s >>= 1;
    }
    // RFC 9162 §2.1.3.2 step 5.
    if s != 0 {
        return Err(ProofError::WrongProofLength {
            expected,
            got: proof.len(),
        });
    }
    if r != *root {
        return Err(ProofError::RootMismatch);
    }
    Ok(())
}

/// Number of hashes a consistency proof for `0 < old_size < new_size` carries: the RFC 9162
/// §2.1.4.2 walk without the hashing, minus the old root it prepends for a power-of-two size.
fn consistency_proof_len(old_size: u64, new_size: u64) -> usize {
    let (mut f, mut s) = (old_size - 1, new_size - 1);
    while f & 1 == 1 {
        f >>= 1;
        s >>= 1;
    }
    let mut walked = 1; // the first element seeds fr and sr
    while s != 0 {
        // The left-sibling case of the walk; only its extra shifting matters without hashing.
        if f == s && f & 1 == 0 {
            while f & 1 == 0 && f != 0 {
                f >>= 1;
                s >>= 1;
            }
        }
        f >>= 1;
        s >>= 1;
        walked += 1;
    }
    if old_size.is_power_of_two() {
        walked - 1
    } else {
        walked
    }
}

/// Verifies that the tree of `new_size` leaves with head `new_root` extends the tree of `old_size`
/// leaves with head `old_root`.
///
/// `old_size == 0` is rejected with [`ProofError::BadSizes`]: every tree extends the empty tree,
/// so such a proof proves nothing, and the transparency-dev corpus (our vectors) rejects every
/// `size1 = 0` case. A caller whose trusted size is 0 has nothing to check. Equal non-zero sizes
/// need an empty proof and equal roots (RFC 9162 §2.1.4.1 defines no proof for them; this
/// follows the same corpus).
pub fn verify_consistency(
    old_size: u64,
    new_size: u64,
    old_root: &Hash,
    new_root: &Hash,
    proof: &[Hash],
) -> Result<(), ProofError> {
    if old_size == 0 || old_size > new_size {
        return Err(ProofError::BadSizes { old_size, new_size });
    }
    if old_size == new_size {
        if !proof.is_empty() {
            return Err(ProofError::WrongProofLength {
                expected: 0,
                got: proof.len(),
            });
        }
        if old_root != new_root {
            return Err(ProofError::RootMismatch);
        }
        return Ok(());
    }
    let expected = consistency_proof_len(old_size, new_size);
    let wrong_length = ProofError::WrongProofLength {
        expected,
        got: proof.len(),
    };
    // RFC 9162 §2.1.4.2 step 1.
    if proof.is_empty() || proof.len() != expected {
        return Err(wrong_length);
    }
    // RFC 9162 §2.1.4.2 step 2: a power-of-two old tree is itself a node of the new tree.
    let seed = if old_size.is_power_of_two() {
        old_root
    } else {
        &proof[0]
    };
    let rest = if old_size.is_power_of_two() {
        proof
    } else {
        &proof[1..]
    };
    // RFC 9162 §2.1.4.2 steps 3-4.
    let (mut f, mut s) = (old_size - 1, new_size - 1);
    while f & 1 == 1 {
        f >>= 1;
        s >>= 1;
    }
    // RFC 9162 §2.1.4.2 step 5.
    let (mut fr, mut sr) = (*seed, *seed);
    // RFC 9162 §2.1.4.2 step 6.
    for c in rest {
        if s == 0 {
            return Err(wrong_length);
        }
        if f & 1 == 1 || f == s {
            fr = node_hash(c, &fr);
            sr = node_hash(c, &sr);
            if f & 1 == 0 {
                while f & 1 == 0 && f != 0 {
                    f >>= 1;
                    s >>= 1;
                }
            }
        } else {
            sr = node_hash(&sr, c);
        }
        f >>= 1;
        s >>= 1;
    }
    // RFC 9162 §2.1.4.2 step 7.
    if s != 0 {
        return Err(wrong_length);
    }
    if fr != *old_root {
        return Err(ProofError::OldRootMismatch);
    }
    if sr != *new_root {
        return Err(ProofError::RootMismatch);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaves(n: u64) -> Vec<Hash> {
        (0..n).map(|i| leaf_hash(&i.to_be_bytes())).collect()
    }

    // MTH straight from the recursive definition, independent of the accumulator.
    fn reference_root(d: &[Hash]) -> Hash {
        match d.len() {
            0 => empty_root(),
            1 => d[0],
            n => {
                let k = split_point(n as u64) as usize;
                node_hash(&reference_root(&d[..k]), &reference_root(&d[k..]))
            }
        }
    }

    fn flipped(proof: &[Hash], element: usize, bit: usize) -> Vec<Hash> {
        let mut p = proof.to_vec();
        p[element][bit / 8] ^= 1 << (bit % 8);
        p
    }

    #[test]
    fn known_constants() {
        assert_eq!(
            hex::encode(empty_root()),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(
            hex::encode(leaf_hash(b"")),
            "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d"
        );
        assert_eq!(root(&[]), empty_root());
        assert_eq!(Accumulator::new().root(), empty_root());
    }

    #[test]
    fn accumulator_matches_root_and_restores() {
        let d = leaves(64);
        let mut acc = Accumulator::new();
        for n in 1..=64u64 {
            acc.push(d[n as usize - 1]);
            assert_eq!(acc.size(), n);
            assert_eq!(acc.peaks().len(), n.count_ones() as usize);
            let want = reference_root(&d[..n as usize]);
            assert_eq!(acc.root(), want, "size {n}");
            assert_eq!(root(&d[..n as usize]), want, "size {n}");
            let restored = Accumulator::from_parts(n, acc.peaks().to_vec()).unwrap();
            assert_eq!(restored, acc);
        }
        assert_eq!(
            Accumulator::from_parts(3, vec![[0; 32]]),
            Err(ProofError::PeakCount {
                size: 3,
                expected: 2,
                got: 1
            })
        );
    }

    #[test]
    fn every_inclusion_proof_verifies_and_a_flipped_bit_fails() {
        let d = leaves(64);
        for n in 1..=64u64 {
            let r = root(&d[..n as usize]);
            for i in 0..n {
                let proof = inclusion_proof(i, n, &mut |j| d[j as usize]).unwrap();
                assert_eq!(proof.len(), inclusion_proof_len(i, n));
                verify_inclusion(&d[i as usize], i, n, &proof, &r).unwrap();
                for e in 0..proof.len() {
                    let bad = flipped(&proof, e, (i as usize + e) % 256);
                    assert_eq!(
                        verify_inclusion(&d[i as usize], i, n, &bad, &r),
                        Err(ProofError::RootMismatch)
                    );
                }
                let mut wrong_leaf = d[i as usize];
                wrong_leaf[0] ^= 1;
                assert!(verify_inclusion(&wrong_leaf, i, n, &proof, &r).is_err());
                // The size is not committed by the root, so only a changed index must fail.
                assert!(verify_inclusion(&d[i as usize], i ^ 1, n, &proof, &r).is_err());
            }
            assert_eq!(
                inclusion_proof(n, n, &mut |j| d[j as usize]),
                Err(ProofError::IndexOutOfRange { index: n, size: n })
            );
        }
    }

    #[test]
    fn every_consistency_proof_verifies_and_a_flipped_bit_fails() {
        let d = leaves(64);
        for n in 1..=64u64 {
            let new_root = root(&d[..n as usize]);
            for m in 1..=n {
                let old_root = root(&d[..m as usize]);
                let proof = consistency_proof(m, n, &mut |j| d[j as usize]).unwrap();
                if m < n {
                    assert_eq!(proof.len(), consistency_proof_len(m, n));
                } else {
                    assert!(proof.is_empty());
                }
                verify_consistency(m, n, &old_root, &new_root, &proof).unwrap();
                for e in 0..proof.len() {
                    let bad = flipped(&proof, e, (m as usize * 7 + e) % 256);
                    assert!(verify_consistency(m, n, &old_root, &new_root, &bad).is_err());
                }
                let mut wrong_old = old_root;
                wrong_old[5] ^= 0x10;
                let got = verify_consistency(m, n, &wrong_old, &new_root, &proof);
                if m < n && !m.is_power_of_two() {
                    assert_eq!(got, Err(ProofError::OldRootMismatch));
                } else {
                    assert!(got.is_err());
                }
                if m < n {
                    assert!(verify_consistency(m, n, &new_root, &old_root, &proof).is_err());
                    assert!(verify_consistency(m + 1, n, &old_root, &new_root, &proof).is_err());
                }
            }
        }
    }

    #[test]
    fn consistency_size_rules() {
        let r = empty_root();
        let bad = |old_size, new_size| ProofError::BadSizes { old_size, new_size };
        assert_eq!(verify_consistency(0, 0, &r, &r, &[]), Err(bad(0, 0)));
        assert_eq!(verify_consistency(0, 5, &r, &r, &[]), Err(bad(0, 5)));
        assert_eq!(verify_consistency(3, 2, &r, &r, &[]), Err(bad(3, 2)));
        assert_eq!(consistency_proof(0, 4, &mut |_| r), Err(bad(0, 4)));
        assert_eq!(consistency_proof(5, 4, &mut |_| r), Err(bad(5, 4)));
    }

    #[test]
    fn huge_sizes_do_not_overflow() {
        // Any proof of the right length for these sizes must fail on the root, never panic.
        for (index, size) in [
            (u64::MAX - 1, u64::MAX),
            (0, u64::MAX),
            (1 << 63, (1 << 63) + 1),
        ] {
            let len = inclusion_proof_len(index, size);
            assert!(len <= 64);
            let proof = vec![[7u8; 32]; len];
            assert_eq!(
                verify_inclusion(&[1; 32], index, size, &proof, &[2; 32]),
                Err(ProofError::RootMismatch)
            );
        }
        for (old, new) in [(u64::MAX - 1, u64::MAX), (1, u64::MAX), (1 << 63, u64::MAX)] {
            let len = consistency_proof_len(old, new);
            let proof = vec![[7u8; 32]; len];
            assert!(matches!(
                verify_consistency(old, new, &[1; 32], &[2; 32], &proof),
                Err(ProofError::OldRootMismatch | ProofError::RootMismatch)
            ));
        }
    }
}
