//! The TPM 2.0 structures the verifier reads: `TPMS_ATTEST` (a quote), `TPMT_SIGNATURE` and
//! `TPMT_PUBLIC`, plus the AK public key as an X.509 `SubjectPublicKeyInfo`. Unmarshalling is
//! done by `tpm2-protocol` (bounds-checked, allocation-free, no panics); this file decides what a
//! quote must contain and runs the signature check through aws-lc-rs.

use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::signature::{
    self, ECDSA_P256_SHA256_FIXED, ParsedPublicKey, RSA_PKCS1_2048_8192_SHA256,
    RSA_PSS_2048_8192_SHA256, RsaParameters, RsaPssSaltLength, RsaPublicKeyComponents,
    UnparsedPublicKey,
};
use tpm2_protocol::TpmUnmarshal;
use tpm2_protocol::data::{
    TpmAlgId, TpmEccCurve, TpmSt, TpmaObject, TpmsAttest, TpmtPublic, TpmtSignature, TpmuAttest,
    TpmuPublicId, TpmuPublicParms, TpmuSignature,
};
use x509_parser::oid_registry::{OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_PKCS1_RSAENCRYPTION};
use x509_parser::prelude::FromDer;
use x509_parser::x509::SubjectPublicKeyInfo;

use crate::attest::AttestError;

/// `TPM_GENERATED_VALUE` (TPM 2.0 Part 2 §6.2): the first four bytes of every structure the TPM
/// signs itself; a restricted signing key never signs external data that starts with it.
pub(super) const TPM_GENERATED_VALUE: u32 = 0xff54_4347;
/// `TPM_ST_ATTEST_QUOTE` (TPM 2.0 Part 2 §6.9).
pub(super) const TPM_ST_ATTEST_QUOTE: u16 = 0x8018;
/// `TPM_ALG_SHA256` (TPM 2.0 Part 2 §6.3, TCG Algorithm Registry).
pub(super) const TPM_ALG_SHA256: u16 = 0x000b;
/// A marshalled `TPMS_ATTEST` of a quote is a few hundred bytes (`TPM2B_ATTEST` is bounded by
/// `sizeof(TPMS_ATTEST)`); anything larger is not a quote.
pub(super) const MAX_ATTEST_LEN: usize = 2048;
/// RSA-8192 signature plus headers.
pub(super) const MAX_SIGNATURE_LEN: usize = 1100;
/// RSA-8192 `TPMT_PUBLIC` with an auth policy.
pub(super) const MAX_TPM_PUBLIC_LEN: usize = 1400;
/// Largest PCR index a `TPMS_PCR_SELECT` of `PCR_SELECT_MAX` (4) bytes can name.
pub(super) const MAX_PCR_INDEX: u8 = 31;
/// DER prefix of a P-256 `SubjectPublicKeyInfo` holding an uncompressed point (RFC 5480 §2):
/// SEQUENCE { SEQUENCE { id-ecPublicKey, prime256v1 }, BIT STRING (0 unused bits) 04 || X || Y }.
const P256_SPKI_PREFIX: [u8; 26] = [
    0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a,
    0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
];
/// RSASSA-PSS with the maximum salt length: TPMs built to library revisions before 1.38 use it
/// (TPM 2.0 Part 1, Annex B, RSASSA-PSS); later ones use a salt as long as the digest.
static RSA_PSS_2048_8192_SHA256_MAX_SALT: RsaParameters =
    RSA_PSS_2048_8192_SHA256.with_pss_salt_length(RsaPssSaltLength::Max);

/// The parts of a `TPMS_ATTEST` of type `TPM_ST_ATTEST_QUOTE` the verifier uses.
#[derive(Debug)]
pub(super) struct Quote {
    pub qualified_signer: Vec<u8>,
    pub extra_data: Vec<u8>,
    pub clock: u64,
    pub reset_count: u32,
    pub restart_count: u32,
    pub firmware_version: u64,
    /// `(hashAlg, pcrSelect bitmap)` in the order of the `TPML_PCR_SELECTION`.
    pub selections: Vec<(u16, Vec<u8>)>,
    pub pcr_digest: Vec<u8>,
}

fn malformed(what: &str, e: impl std::fmt::Debug) -> AttestError {
    AttestError::Malformed(format!("{what}: {e:?}"))
}

/// Parses a quote. TPM 2.0 Part 2 §10.12 (`TPMS_ATTEST`, `TPMS_CLOCK_INFO`, `TPMS_QUOTE_INFO`).
pub(super) fn parse_quote(msg: &[u8]) -> Result<Quote, AttestError> {
    if msg.len() > MAX_ATTEST_LEN {
        return Err(AttestError::Malformed("TPMS_ATTEST too large".into()));
    }
    let head = msg
        .get(..6)
        .ok_or_else(|| AttestError::Malformed("TPMS_ATTEST truncated".into()))?;
    // TPM 2.0 Part 2 §10.12 TPMS_ATTEST.magic: TPM_GENERATED_VALUE, so the quote was built inside
    // the TPM and not signed as external data.
    if u32::from_be_bytes([head[0], head[1], head[2], head[3]]) != TPM_GENERATED_VALUE {
        return Err(AttestError::Malformed(
            "TPMS_ATTEST.magic is not TPM_GENERATED_VALUE".into(),
        ));
    }
    // TPM 2.0 Part 2 §10.12 TPMS_ATTEST.type: only TPM_ST_ATTEST_QUOTE carries a PCR digest.
    if u16::from_be_bytes([head[4], head[5]]) != TPM_ST_ATTEST_QUOTE {
        return Err(AttestError::Malformed(
            "TPMS_ATTEST.type is not TPM_ST_ATTEST_QUOTE".into(),
        ));
    }
    let (attest, rest) = TpmsAttest::unmarshal(msg).map_err(|e| malformed("TPMS_ATTEST", e))?;
    if !rest.is_empty() {
        return Err(AttestError::Malformed(
            "trailing bytes after TPMS_ATTEST".into(),
        ));
    }
    if attest.attest_type != TpmSt::AttestQuote {
        return Err(AttestError::Malformed(
            "TPMS_ATTEST.type is not TPM_ST_ATTEST_QUOTE".into(),
        ));
    }
    let TpmuAttest::Quote(info) = attest.attested else {
        return Err(AttestError::Malformed(
            "TPMS_ATTEST.attested is not TPMS_QUOTE_INFO".into(),
        ));
    };
    let selections = info
        .pcr_select
        .iter()
        .map(|s| (s.hash.value(), s.pcr_select.to_vec()))
        .collect();
    Ok(Quote {
        qualified_signer: attest.qualified_signer.to_vec(),
        extra_data: attest.extra_data.to_vec(),
        clock: attest.clock_info.clock.value(),
        reset_count: attest.clock_info.reset_count.value(),
        restart_count: attest.clock_info.restart_count.value(),
        firmware_version: attest.firmware_version.value(),
        selections,
        pcr_digest: info.pcr_digest.to_vec(),
    })
}

/// PCR indices named by a `TPMS_PCR_SELECT` bitmap, ascending. TPM 2.0 Part 2 §10.6.1: bit `i`
/// of octet `j` selects PCR `8j + i`; this is also the order in which `TPM2_Quote` concatenates
/// the PCR values for `pcrDigest` (TPM 2.0 Part 3 §18.4).
pub(super) fn selected_indices(bitmap: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    for (octet, byte) in bitmap.iter().enumerate() {
        for bit in 0..8u8 {
            if byte & (1 << bit) != 0 {
                // `bitmap` is at most PCR_SELECT_MAX (4) octets long, so this fits in a u8.
                out.push((octet as u8).saturating_mul(8).saturating_add(bit));
            }
        }
    }
    out
}

/// The signature schemes the verifier accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum SigScheme {
    RsassaSha256,
    RsapssSha256,
    EcdsaP256Sha256,
}

impl SigScheme {
    pub(super) fn as_str(self) -> &'static str {
        match self {
            SigScheme::RsassaSha256 => "rsassa-sha256",
            SigScheme::RsapssSha256 => "rsapss-sha256",
            SigScheme::EcdsaP256Sha256 => "ecdsa-p256-sha256",
        }
    }
}

/// A parsed `TPMT_SIGNATURE`: the scheme and the signature bytes in the form aws-lc-rs takes
/// (RSA: the raw signature; ECDSA: `r || s`, 32 bytes each).
#[derive(Debug)]
pub(super) struct Signature {
    pub scheme: SigScheme,
    pub bytes: Vec<u8>,
}

fn scheme_not_allowed(detail: String) -> AttestError {
    AttestError::Policy {
        rule: "tpm signature scheme",
        detail,
    }
}

/// Left-pads an ECDSA scalar to 32 bytes (leading zero octets beyond 32 are dropped).
fn fixed_scalar(v: &[u8]) -> Result<[u8; 32], AttestError> {
    let start = v.iter().position(|b| *b != 0).unwrap_or(v.len());
    let v = &v[start..];
    if v.len() > 32 {
        return Err(AttestError::Malformed(
            "ECDSA signature scalar longer than 32 bytes".into(),
        ));
    }
    let mut out = [0u8; 32];
    out[32 - v.len()..].copy_from_slice(v);
    Ok(out)
}

/// Parses a `TPMT_SIGNATURE`. TPM 2.0 Part 2 §11.3.4 (`TPMT_SIGNATURE`), §11.3.1
/// (`TPMS_SIGNATURE_RSA`), §11.3.2 (`TPMS_SIGNATURE_ECC`).
pub(super) fn parse_signature(b: &[u8]) -> Result<Signature, AttestError> {
    if b.len() > MAX_SIGNATURE_LEN {
        return Err(AttestError::Malformed("TPMT_SIGNATURE too large".into()));
    }
    let (sig, rest) = TpmtSignature::unmarshal(b).map_err(|e| malformed("TPMT_SIGNATURE", e))?;
    if !rest.is_empty() {
        return Err(AttestError::Malformed(
            "trailing bytes after TPMT_SIGNATURE".into(),
        ));
    }
    let (scheme, hash, bytes) = match sig.signature {
        TpmuSignature::Rsassa(s) => (SigScheme::RsassaSha256, s.hash, s.sig.to_vec()),
        TpmuSignature::Rsapss(s) => (SigScheme::RsapssSha256, s.hash, s.sig.to_vec()),
        TpmuSignature::Ecdsa(s) => {
            let mut rs = fixed_scalar(&s.signature_r)?.to_vec();
            rs.extend_from_slice(&fixed_scalar(&s.signature_s)?);
            (SigScheme::EcdsaP256Sha256, s.hash, rs)
        }
        _ => {
            return Err(scheme_not_allowed(format!(
                "signature algorithm {:#06x} is not RSASSA, RSAPSS or ECDSA",
                sig.sig_alg.value()
            )));
        }
    };
    // Only SHA-256: a SHA-1 quote signature is forgeable in practice.
    if hash != TpmAlgId::Sha256 {
        return Err(scheme_not_allowed(format!(
            "signature hash {:#06x} is not SHA-256",
            hash.value()
        )));
    }
    Ok(Signature { scheme, bytes })
}

/// The kind of AK public key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum AkKind {
    Rsa,
    EcP256,
}

/// Checks a DER `SubjectPublicKeyInfo` (RFC 5280 §4.1.2.7) and says which kind of AK it holds.
pub(super) fn spki_kind(spki: &[u8]) -> Result<AkKind, AttestError> {
    let (rest, info) = SubjectPublicKeyInfo::from_der(spki)
        .map_err(|_| AttestError::Malformed("ak_public is not a SubjectPublicKeyInfo".into()))?;
    if !rest.is_empty() {
        return Err(AttestError::Malformed(
            "trailing bytes after ak_public".into(),
        ));
    }
    let alg = &info.algorithm.algorithm;
    let kind = if *alg == OID_PKCS1_RSAENCRYPTION {
        AkKind::Rsa
    } else if *alg == OID_KEY_TYPE_EC_PUBLIC_KEY
        && info
            .algorithm
            .parameters
            .as_ref()
            .and_then(|p| p.as_oid().ok())
            .is_some_and(|curve| curve == OID_EC_P256)
    {
        AkKind::EcP256
    } else {
        return Err(AttestError::Policy {
            rule: "tpm ak key type",
            detail: "AK is neither RSA nor ECC P-256".into(),
        });
    };
    let alg: &'static dyn signature::VerificationAlgorithm = match kind {
        AkKind::Rsa => &RSA_PKCS1_2048_8192_SHA256,
        AkKind::EcP256 => &ECDSA_P256_SHA256_FIXED,
    };
    ParsedPublicKey::new(alg, spki)
        .map_err(|_| AttestError::Malformed("ak_public is not a valid public key".into()))?;
    Ok(kind)
}

/// Verifies the AK signature over the marshalled `TPMS_ATTEST`. TPM 2.0 Part 3 §18.4
/// (`TPM2_Quote`): the signature is over the digest of the attestation structure with the hash
/// of the signing scheme.
pub(super) fn verify_signature(
    spki: &[u8],
    kind: AkKind,
    sig: &Signature,
    msg: &[u8],
) -> Result<(), AttestError> {
    let ok = match (kind, sig.scheme) {
        (AkKind::Rsa, SigScheme::RsassaSha256) => {
            UnparsedPublicKey::new(&RSA_PKCS1_2048_8192_SHA256, spki)
                .verify(msg, &sig.bytes)
                .is_ok()
        }
        (AkKind::Rsa, SigScheme::RsapssSha256) => {
            UnparsedPublicKey::new(&RSA_PSS_2048_8192_SHA256, spki)
                .verify(msg, &sig.bytes)
                .is_ok()
                || UnparsedPublicKey::new(&RSA_PSS_2048_8192_SHA256_MAX_SALT, spki)
                    .verify(msg, &sig.bytes)
                    .is_ok()
        }
        (AkKind::EcP256, SigScheme::EcdsaP256Sha256) => {
            UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, spki)
                .verify(msg, &sig.bytes)
                .is_ok()
        }
        // A scheme that does not fit the key cannot have been made by it.
        _ => false,
    };
    if ok {
        Ok(())
    } else {
        Err(AttestError::BadSignature)
    }
}

/// An AK `TPMT_PUBLIC` as the verifier uses it.
#[derive(Debug)]
pub(super) struct TpmPublic {
    pub spki: Vec<u8>,
    pub attributes: TpmaObject,
}

/// Parses a `TPMT_PUBLIC` (TPM 2.0 Part 2 §12.2.4) holding an RSA or ECC P-256 key and returns
/// its key as a DER `SubjectPublicKeyInfo`.
pub(super) fn parse_tpm_public(b: &[u8]) -> Result<TpmPublic, AttestError> {
    if b.len() > MAX_TPM_PUBLIC_LEN {
        return Err(AttestError::Malformed("TPMT_PUBLIC too large".into()));
    }
    let (public, rest) = TpmtPublic::unmarshal(b).map_err(|e| malformed("TPMT_PUBLIC", e))?;
    if !rest.is_empty() {
        return Err(AttestError::Malformed(
            "trailing bytes after TPMT_PUBLIC".into(),
        ));
    }
    let spki = match (&public.parameters, &public.unique) {
        // TPM 2.0 Part 2 §12.2.3.5 TPMS_RSA_PARMS: an exponent of zero means 2^16 + 1.
        (TpmuPublicParms::Rsa(parms), TpmuPublicId::Rsa(n)) => {
            let e = match parms.exponent.value() {
                0 => 65_537u32,
                e => e,
            };
            let e = e.to_be_bytes();
            let e_start = e.iter().position(|b| *b != 0).unwrap_or(e.len());
            let n_start = n.iter().position(|b| *b != 0).unwrap_or(n.len());
            let components = RsaPublicKeyComponents {
                n: &n[n_start..],
                e: &e[e_start..],
            };
            components
                .as_der()
                .map_err(|_| AttestError::Malformed("TPMT_PUBLIC RSA key is invalid".into()))?
                .as_ref()
                .to_vec()
        }
        (TpmuPublicParms::Ecc(parms), TpmuPublicId::Ecc(point)) => {
            if parms.curve_id != TpmEccCurve::NistP256 {
                return Err(AttestError::Policy {
                    rule: "tpm ak key type",
                    detail: "ECC AK is not on NIST P-256".into(),
                });
            }
            let mut spki = P256_SPKI_PREFIX.to_vec();
            spki.push(0x04);
            spki.extend_from_slice(&fixed_scalar(&point.x)?);
            spki.extend_from_slice(&fixed_scalar(&point.y)?);
            // Rejects points not on the curve.
            ParsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, &spki)
                .map_err(|_| AttestError::Malformed("TPMT_PUBLIC ECC point is invalid".into()))?;
            spki
        }
        _ => {
            return Err(AttestError::Policy {
                rule: "tpm ak key type",
                detail: "TPMT_PUBLIC is neither RSA nor ECC".into(),
            });
        }
    };
    Ok(TpmPublic {
        spki,
        attributes: public.object_attributes,
    })
}

/// TPM 2.0 Part 2 §8.3 TPMA_OBJECT: an attestation key is a restricted signing key that never
/// leaves its TPM (fixedTPM, fixedParent) and was generated inside it (sensitiveDataOrigin).
/// Only a restricted key refuses to sign external data that begins with `TPM_GENERATED_VALUE`
/// (TPM 2.0 Part 3 §20.2 TPM2_Sign), which is what makes a quote trustworthy.
pub(super) fn check_ak_attributes(attributes: TpmaObject) -> Result<(), AttestError> {
    let required = TpmaObject::FIXED_TPM
        | TpmaObject::FIXED_PARENT
        | TpmaObject::SENSITIVE_DATA_ORIGIN
        | TpmaObject::RESTRICTED
        | TpmaObject::SIGN_ENCRYPT;
    if !attributes.contains(required) || attributes.contains(TpmaObject::DECRYPT) {
        return Err(AttestError::Policy {
            rule: "tpm ak attributes",
            detail: format!(
                "objectAttributes {:#010x} are not those of a restricted signing key",
                attributes.bits()
            ),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selection_bits_map_to_ascending_indices() {
        assert_eq!(selected_indices(&[0x01, 0x80, 0x00]), vec![0, 15]);
        assert_eq!(
            selected_indices(&[0xff, 0xff, 0xff]),
            (0..24).collect::<Vec<u8>>()
        );
        assert_eq!(selected_indices(&[0, 0, 0, 0x80]), vec![31]);
        assert!(selected_indices(&[]).is_empty());
    }

    #[test]
    fn quote_parser_rejects_bad_input_without_panicking() {
        for input in [
            &[][..],
            &[0xff, 0x54, 0x43][..],
            &[0xff, 0x54, 0x43, 0x47, 0x80, 0x18][..],
            &[0xff, 0x54, 0x43, 0x47, 0x80, 0x17, 0, 0][..],
            &[0x00, 0x54, 0x43, 0x47, 0x80, 0x18, 0, 0][..],
            &[0xffu8; 64][..],
            &[0u8; 4096][..],
        ] {
            assert!(matches!(parse_quote(input), Err(AttestError::Malformed(_))));
        }
    }

    #[test]
    fn signature_parser_rejects_bad_input_without_panicking() {
        assert!(matches!(
            parse_signature(&[]),
            Err(AttestError::Malformed(_))
        ));
        // RSASSA with a declared size larger than the data.
        assert!(matches!(
            parse_signature(&[0x00, 0x14, 0x00, 0x0b, 0x01, 0x00, 0xaa]),
            Err(AttestError::Malformed(_))
        ));
        // HMAC signatures are not accepted.
        let mut hmac = vec![0x00, 0x05, 0x00, 0x0b];
        hmac.extend_from_slice(&[0u8; 32]);
        assert!(matches!(
            parse_signature(&hmac),
            Err(AttestError::Policy { .. })
        ));
        // RSASSA over SHA-1 is not accepted.
        let mut sha1 = vec![0x00, 0x14, 0x00, 0x04, 0x00, 0x02, 0xaa, 0xbb];
        assert!(matches!(
            parse_signature(&sha1),
            Err(AttestError::Policy { .. })
        ));
        sha1.push(0);
        assert!(matches!(
            parse_signature(&sha1),
            Err(AttestError::Malformed(_))
        ));
        assert!(matches!(
            parse_signature(&vec![0u8; MAX_SIGNATURE_LEN + 1]),
            Err(AttestError::Malformed(_))
        ));
    }

    #[test]
    fn ecdsa_scalars_are_left_padded() {
        assert_eq!(fixed_scalar(&[1]).unwrap()[31], 1);
        let mut long = vec![0u8; 3];
        long.extend_from_slice(&[7u8; 32]);
        assert_eq!(fixed_scalar(&long).unwrap(), [7u8; 32]);
        assert!(fixed_scalar(&[1u8; 33]).is_err());
    }

    #[test]
    fn spki_and_tpm_public_reject_garbage() {
        assert!(matches!(
            spki_kind(b"garbage"),
            Err(AttestError::Malformed(_))
        ));
        assert!(matches!(spki_kind(&[]), Err(AttestError::Malformed(_))));
        assert!(matches!(
            parse_tpm_public(&[0x00, 0x01, 0x00]),
            Err(AttestError::Malformed(_))
        ));
        assert!(matches!(
            parse_tpm_public(&vec![0u8; MAX_TPM_PUBLIC_LEN + 1]),
            Err(AttestError::Malformed(_))
        ));
    }

    #[test]
    fn ak_attributes_must_be_a_restricted_signing_key() {
        let good = TpmaObject::FIXED_TPM
            | TpmaObject::FIXED_PARENT
            | TpmaObject::SENSITIVE_DATA_ORIGIN
            | TpmaObject::USER_WITH_AUTH
            | TpmaObject::RESTRICTED
            | TpmaObject::SIGN_ENCRYPT;
        assert!(check_ak_attributes(good).is_ok());
        let unrestricted = TpmaObject::FIXED_TPM
            | TpmaObject::FIXED_PARENT
            | TpmaObject::SENSITIVE_DATA_ORIGIN
            | TpmaObject::SIGN_ENCRYPT;
        assert!(check_ak_attributes(unrestricted).is_err());
        assert!(check_ak_attributes(good | TpmaObject::DECRYPT).is_err());
    }
}
