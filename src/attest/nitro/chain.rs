//! The certificate side of a Nitro document: pinned roots, the path from `cabundle[0]` through
//! the intermediates to the per-document signing certificate (AWS attestation process
//! §3.2.3–§3.2.4), and that certificate's profile. Paths are built and signatures checked by
//! rustls-webpki on aws-lc-rs; x509-parser reads the extensions webpki ignores.

use std::time::Duration;

use rustls::pki_types::{CertificateDer, TrustAnchor, UnixTime};
use webpki::{EndEntityCert, ExtendedKeyUsageValidator, KeyPurposeIdIter};
use x509_parser::certificate::X509Certificate;
use x509_parser::oid_registry::{OID_KEY_TYPE_EC_PUBLIC_KEY, OID_NIST_EC_P384};
use x509_parser::time::ASN1Time;

use super::document::Document;
use super::{malformed, policy_error};
use crate::attest::AttestError;
use crate::time::UnixMs;

/// A trusted root, kept both as bytes (to compare with `cabundle[0]`) and as a webpki anchor.
pub(super) struct Root {
    der: Vec<u8>,
    anchor: TrustAnchor<'static>,
}

impl Root {
    pub(super) fn from_der(der: Vec<u8>) -> Result<Self, AttestError> {
        let anchor = webpki::anchor_from_trusted_cert(&CertificateDer::from(der.as_slice()))
            .map_err(|e| policy_error("nitro.roots_pem", format!("root: {e}")))?
            .to_owned();
        Ok(Self { der, anchor })
    }

    /// One PEM `CERTIFICATE` holding a self-issued CA certificate.
    pub(super) fn from_pem(pem: &str) -> Result<Self, AttestError> {
        let err = |d: &str| policy_error("nitro.roots_pem", d.to_string());
        let (rest, pem) = x509_parser::pem::parse_x509_pem(pem.as_bytes())
            .map_err(|_| err("not a PEM certificate"))?;
        if pem.label != "CERTIFICATE" || !rest.iter().all(u8::is_ascii_whitespace) {
            return Err(err("expected exactly one PEM CERTIFICATE"));
        }
        let cert = parse_cert(&pem.contents).map_err(|_| err("not an X.509 certificate"))?;
        let is_ca = matches!(cert.basic_constraints(), Ok(Some(bc)) if bc.value.ca);
        if !is_ca || cert.subject() != cert.issuer() {
            return Err(err("root must be a self-issued CA certificate"));
        }
        Self::from_der(pem.contents)
    }

    #[cfg(test)]
    pub(super) fn der(&self) -> &[u8] {
        &self.der
    }
}

pub(super) fn parse_cert(der: &[u8]) -> Result<X509Certificate<'_>, AttestError> {
    match x509_parser::parse_x509_certificate(der) {
        Ok(([], cert)) => Ok(cert),
        _ => Err(AttestError::Chain("certificate is not DER X.509".into())),
    }
}

fn asn1_time(ms: u64) -> Result<ASN1Time, AttestError> {
    i64::try_from(ms / 1000)
        .ok()
        .and_then(|s| ASN1Time::from_timestamp(s).ok())
        .ok_or_else(|| malformed("time out of range"))
}

/// webpki checks EKUs through this hook; [`leaf_p384_point`] requires there be none.
struct AnyEku;

impl ExtendedKeyUsageValidator for AnyEku {
    fn validate(&self, iter: KeyPurposeIdIter<'_, '_>) -> Result<(), webpki::Error> {
        for id in iter {
            id?;
        }
        Ok(())
    }
}

fn webpki_error(e: webpki::Error) -> AttestError {
    match e {
        webpki::Error::CertExpired { .. } | webpki::Error::CertNotValidYet { .. } => {
            AttestError::Expired(format!("certificate not valid at the document time: {e}"))
        }
        other => AttestError::Chain(format!("{other}")),
    }
}

/// AWS attestation process §3.2.3–§3.2.4: the chain from a trusted root through the bundle to
/// the leaf, valid at the document's time and at `now_ms`. Returns the leaf's P-384 public key
/// (uncompressed point).
pub(super) fn verify_chain(
    roots: &[Root],
    doc: &Document,
    now_ms: UnixMs,
) -> Result<Vec<u8>, AttestError> {
    // §3.2.3: cabundle = [ROOT_CERT, INTERM_1, ..., INTERM_N].
    let Some((root_der, intermediates)) = doc.cabundle.split_first() else {
        return Err(AttestError::Chain(
            "document has no CA bundle, so no path to the AWS root".into(),
        ));
    };
    // Pinning: the bundle's root must be one of ours, byte for byte.
    let root = roots
        .iter()
        .find(|r| r.der == *root_der)
        .ok_or_else(|| AttestError::Chain("cabundle[0] is not a trusted root".into()))?;
    let leaf_der = CertificateDer::from(doc.certificate.as_slice());
    let leaf = EndEntityCert::try_from(&leaf_der)
        .map_err(|e| AttestError::Chain(format!("leaf certificate: {e}")))?;
    let inter: Vec<CertificateDer<'_>> = intermediates
        .iter()
        .map(|c| CertificateDer::from(c.as_slice()))
        .collect();
    // §3.2.3.1: every certificate valid at the document's own time. §3.2.4: no CRLs.
    // Only ECDSA P-384/SHA-384 signatures exist in the AWS Nitro PKI.
    let doc_time = UnixTime::since_unix_epoch(Duration::from_millis(doc.timestamp_ms));
    let path = leaf
        .verify_for_usage(
            &[webpki::aws_lc_rs::ECDSA_P384_SHA384],
            std::slice::from_ref(&root.anchor),
            &inter,
            doc_time,
            AnyEku,
            None,
            None,
        )
        .map_err(webpki_error)?;
    // §3.2.3: the path is exactly leaf ← INTERM_N ← … ← INTERM_1 ← ROOT, every entry used.
    let used: Vec<CertificateDer<'_>> = path.intermediate_certificates().map(|c| c.der()).collect();
    let in_order = used.len() == intermediates.len()
        && used
            .iter()
            .zip(intermediates.iter().rev())
            .all(|(u, b)| u.as_ref() == b.as_slice());
    if !in_order {
        return Err(AttestError::Chain(
            "certificate path does not follow the cabundle order".into(),
        ));
    }
    for der in intermediates {
        let cert = parse_cert(der)?;
        // §3.2.3.2–§3.2.3.3 (RFC 5280 §4.2.1.3, §4.2.1.9): CAs with keyCertSign.
        let is_ca = matches!(cert.basic_constraints(), Ok(Some(bc)) if bc.value.ca);
        let cert_sign = matches!(cert.key_usage(), Ok(Some(ku)) if ku.value.key_cert_sign());
        if !is_ca || !cert_sign {
            return Err(AttestError::Chain(
                "intermediate is not a CA with keyCertSign".into(),
            ));
        }
    }
    let leaf = parse_cert(&doc.certificate)?;
    let point = leaf_p384_point(&leaf)?;
    // Stricter than §3.2.3.1: every certificate must also be valid when the vault verifies.
    let now = asn1_time(now_ms)?;
    for der in doc.cabundle.iter().chain([&doc.certificate]) {
        if !parse_cert(der)?.validity().is_valid_at(now) {
            return Err(AttestError::Expired(
                "certificate not valid at the verification time".into(),
            ));
        }
    }
    Ok(point)
}

/// §3.2.3.3: the signing certificate is an end entity with digitalSignature and a P-384 key.
pub(super) fn leaf_p384_point(leaf: &X509Certificate<'_>) -> Result<Vec<u8>, AttestError> {
    let chain = |d: &str| AttestError::Chain(format!("leaf certificate: {d}"));
    match leaf.basic_constraints() {
        Ok(None) => {}
        Ok(Some(bc)) if !bc.value.ca => {}
        Ok(Some(_)) => return Err(chain("is a CA")),
        Err(_) => return Err(chain("has invalid basic constraints")),
    }
    if !matches!(leaf.key_usage(), Ok(Some(ku)) if ku.value.digital_signature()) {
        return Err(chain("lacks digitalSignature key usage"));
    }
    // No purpose besides signing attestation documents is defined; accept none (RFC 5280
    // §4.2.1.12 would restrict the key to the listed purposes).
    if !matches!(leaf.extended_key_usage(), Ok(None)) {
        return Err(chain("has an extended key usage"));
    }
    let spki = leaf.public_key();
    let curve = spki
        .algorithm
        .parameters
        .as_ref()
        .and_then(|p| p.as_oid().ok());
    if spki.algorithm.algorithm != OID_KEY_TYPE_EC_PUBLIC_KEY || curve != Some(OID_NIST_EC_P384) {
        return Err(chain("key is not ECDSA P-384"));
    }
    Ok(spki.subject_public_key.data.to_vec())
}
