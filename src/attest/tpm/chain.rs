//! Trust in the attestation key through an X.509 chain: the pinned Google Compute Engine vTPM
//! roots (or the operator's own), path building and validity by rustls-webpki (RFC 5280 §6), and
//! the checks on the AK certificate itself (its key is the AK, its purpose is a TCG one).

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, TrustAnchor, UnixTime};
use webpki::{
    CertRevocationList, EndEntityCert, ExpirationPolicy, ExtendedKeyUsageValidator, KeyPurposeId,
    KeyPurposeIdIter, KeyUsage, OwnedCertRevocationList, RequiredEkuNotFoundContext,
    RevocationCheckDepth, RevocationOptionsBuilder, UnknownStatusPolicy,
};
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::attest::AttestError;
use crate::time::UnixMs;

/// Google's vTPM EK/AK roots (go-tpm-tools `server/ca-certs`, also served under
/// `https://pki.goog/cloud_integrity/`). Name, DER bytes, SHA-256 of the DER.
pub(super) const BUILTIN_ROOTS: [(&str, &[u8], &str); 2] = [
    (
        "tpm_ek_root_1.cer",
        include_bytes!("../roots/tpm/tpm_ek_root_1.cer"),
        "9bd5285f8fb18502a7947e621ffd470266f49fcd3b73e19a190f690ad32a7caf",
    ),
    (
        "gcp_ek_ak_ca_root.crt",
        include_bytes!("../roots/tpm/gcp_ek_ak_ca_root.crt"),
        "594759594b9b61524f6c8ef668f7177f7b9066bc0674f2f49fe9e052be78beb2",
    ),
];

/// Google's intermediates under those roots. They only help build paths (a GCE AK certificate
/// names its issuer but the attestation does not always carry it); they confer no trust.
pub(super) const BUILTIN_INTERMEDIATES: [(&str, &[u8], &str); 3] = [
    (
        "tpm_ek_intermediate_2.crt",
        include_bytes!("../roots/tpm/tpm_ek_intermediate_2.crt"),
        "5d8dbcf8c8053dd8ffad711b6219355032b7122c34cac0f90ccb49def69ec504",
    ),
    (
        "tpm_ek_intermediate_3.crt",
        include_bytes!("../roots/tpm/tpm_ek_intermediate_3.crt"),
        "7132b6ea71101f6c51bb58f98c3798c19b65be510eca0344318900510b593178",
    ),
    (
        "gcp_ek_ak_ca_intermediate_v3.crt",
        include_bytes!("../roots/tpm/gcp_ek_ak_ca_intermediate_v3.crt"),
        "c84de8116dfaf5a908f21e810487791f5437e206d00ad8025050cca6bd2ff627",
    ),
];

/// `tcg-kp-EKCertificate` (2.23.133.8.1), DER content octets. Google puts it on AK certificates.
const TCG_KP_EK_CERTIFICATE: &[u8] = &[0x67, 0x81, 0x05, 0x08, 0x01];
/// `tcg-kp-AIKCertificate` (2.23.133.8.3), the TCG purpose of an attestation key certificate.
const TCG_KP_AIK_CERTIFICATE: &[u8] = &[0x67, 0x81, 0x05, 0x08, 0x03];
/// Largest certificate accepted anywhere (roots, intermediates, evidence).
pub(super) const MAX_CERT_LEN: usize = 16 * 1024;

/// Signature algorithms allowed on certificates of an AK chain.
static CHAIN_ALGS: &[&dyn rustls::pki_types::SignatureVerificationAlgorithm] = &[
    webpki::aws_lc_rs::RSA_PKCS1_2048_8192_SHA256,
    webpki::aws_lc_rs::RSA_PKCS1_2048_8192_SHA384,
    webpki::aws_lc_rs::RSA_PKCS1_2048_8192_SHA512,
    webpki::aws_lc_rs::RSA_PSS_2048_8192_SHA256_LEGACY_KEY,
    webpki::aws_lc_rs::RSA_PSS_2048_8192_SHA384_LEGACY_KEY,
    webpki::aws_lc_rs::RSA_PSS_2048_8192_SHA512_LEGACY_KEY,
    webpki::aws_lc_rs::ECDSA_P256_SHA256,
    webpki::aws_lc_rs::ECDSA_P256_SHA384,
    webpki::aws_lc_rs::ECDSA_P384_SHA256,
    webpki::aws_lc_rs::ECDSA_P384_SHA384,
];

/// RFC 5280 §4.2.1.12 applied to every certificate of the path: when a certificate restricts its
/// purposes, one of them must be a TCG TPM key purpose.
struct TcgKeyPurpose;

impl ExtendedKeyUsageValidator for TcgKeyPurpose {
    fn validate(&self, iter: KeyPurposeIdIter<'_, '_>) -> Result<(), webpki::Error> {
        let mut present = Vec::new();
        for id in iter {
            let id = id?;
            if id == KeyPurposeId::new(TCG_KP_EK_CERTIFICATE)
                || id == KeyPurposeId::new(TCG_KP_AIK_CERTIFICATE)
            {
                return Ok(());
            }
            present.push(id.to_decoded_oid());
        }
        if present.is_empty() {
            Ok(())
        } else {
            Err(webpki::Error::RequiredEkuNotFoundContext(
                RequiredEkuNotFoundContext {
                    required: KeyUsage::required(TCG_KP_AIK_CERTIFICATE),
                    present,
                },
            ))
        }
    }
}

/// Parsed trust anchors, known intermediates and CRLs, built once per verifier.
pub(super) struct AkTrustStore {
    anchors: Vec<TrustAnchor<'static>>,
    intermediates: Vec<CertificateDer<'static>>,
    crls: Vec<CertRevocationList<'static>>,
}

impl AkTrustStore {
    pub(super) fn new(
        roots: &[Vec<u8>],
        intermediates: Vec<Vec<u8>>,
        crls: &[Vec<u8>],
    ) -> Result<Self, AttestError> {
        let mut anchors = Vec::with_capacity(roots.len());
        for (i, der) in roots.iter().enumerate() {
            let cert = CertificateDer::from(der.as_slice());
            let anchor =
                webpki::anchor_from_trusted_cert(&cert).map_err(|e| AttestError::Policy {
                    rule: "tpm policy",
                    detail: format!("ak_roots[{i}] is not a usable certificate: {e}"),
                })?;
            anchors.push(anchor.to_owned());
        }
        for (i, der) in intermediates.iter().enumerate() {
            if der.len() > MAX_CERT_LEN || X509Certificate::from_der(der).is_err() {
                return Err(AttestError::Policy {
                    rule: "tpm policy",
                    detail: format!("ak_intermediates[{i}] is not a certificate"),
                });
            }
        }
        let crls = crls
            .iter()
            .enumerate()
            .map(|(i, der)| {
                OwnedCertRevocationList::from_der(der)
                    .map(CertRevocationList::from)
                    .map_err(|e| AttestError::Policy {
                        rule: "tpm policy",
                        detail: format!("ak_crls[{i}] is not a CRL: {e}"),
                    })
            })
            .collect::<Result<_, _>>()?;
        Ok(Self {
            anchors,
            intermediates: intermediates
                .into_iter()
                .map(CertificateDer::from)
                .collect(),
            crls,
        })
    }

    /// Verifies that `chain[0]` certifies `ak_spki` as a TPM key and chains to an anchor at
    /// `now_ms`; `chain[1..]` are intermediates supplied with the evidence (untrusted helpers).
    pub(super) fn verify(
        &self,
        chain: &[Vec<u8>],
        ak_spki: &[u8],
        now_ms: UnixMs,
    ) -> Result<(), AttestError> {
        let Some((leaf_der, supplied)) = chain.split_first() else {
            return Err(AttestError::UntrustedKey);
        };
        if self.anchors.is_empty() {
            return Err(AttestError::Chain("no AK roots are configured".into()));
        }
        let leaf = CertificateDer::from(leaf_der.as_slice());
        let ee = EndEntityCert::try_from(&leaf)
            .map_err(|e| AttestError::Chain(format!("AK certificate: {e}")))?;
        let mut intermediates: Vec<CertificateDer<'_>> = supplied
            .iter()
            .map(|c| CertificateDer::from(c.as_slice()))
            .collect();
        intermediates.extend(self.intermediates.iter().cloned());
        let time = UnixTime::since_unix_epoch(Duration::from_millis(now_ms));
        let crls: Vec<&CertRevocationList<'_>> = self.crls.iter().collect();
        // RFC 5280 §6.3: every certificate of the path that a configured CRL covers must not be
        // revoked, and such a CRL must be current (nextUpdate after `now_ms`).
        let revocation = RevocationOptionsBuilder::new(&crls).ok().map(|b| {
            b.with_depth(RevocationCheckDepth::Chain)
                .with_status_policy(UnknownStatusPolicy::Allow)
                .with_expiration_policy(ExpirationPolicy::Enforce)
                .build()
        });
        // RFC 5280 §6.1: signatures, validity at `now_ms`, basic constraints, path length and name
        // constraints along a path from the AK certificate to a configured anchor.
        ee.verify_for_usage(
            CHAIN_ALGS,
            &self.anchors,
            &intermediates,
            time,
            TcgKeyPurpose,
            revocation,
            None,
        )
        .map_err(|e| match e {
            webpki::Error::CertExpired { .. }
            | webpki::Error::CertNotValidYet { .. }
            | webpki::Error::CrlExpired { .. } => {
                AttestError::Expired(format!("AK certificate chain: {e}"))
            }
            _ => AttestError::Chain(format!("AK certificate chain: {e}")),
        })?;
        check_leaf(leaf_der, ak_spki)
    }
}

/// The AK certificate must certify exactly the AK that signed the quote (RFC 5280 §4.1.2.7), be
/// issued for a TCG TPM key purpose (TCG EK Credential Profile, extended key usage) and allow signatures when
/// it restricts key usage (RFC 5280 §4.2.1.3).
fn check_leaf(leaf_der: &[u8], ak_spki: &[u8]) -> Result<(), AttestError> {
    let (_, cert) = X509Certificate::from_der(leaf_der)
        .map_err(|_| AttestError::Chain("AK certificate does not parse".into()))?;
    if cert.tbs_certificate.subject_pki.raw != ak_spki {
        return Err(AttestError::UntrustedKey);
    }
    let eku = cert
        .extended_key_usage()
        .map_err(|_| AttestError::Chain("AK certificate has a bad extendedKeyUsage".into()))?;
    let tcg_purpose = eku.is_some_and(|e| {
        e.value.other.iter().any(|oid| {
            oid.as_bytes() == TCG_KP_EK_CERTIFICATE || oid.as_bytes() == TCG_KP_AIK_CERTIFICATE
        })
    });
    if !tcg_purpose {
        return Err(AttestError::Chain(
            "AK certificate is not issued for a TCG TPM key purpose".into(),
        ));
    }
    let key_usage = cert
        .key_usage()
        .map_err(|_| AttestError::Chain("AK certificate has a bad keyUsage".into()))?;
    if key_usage.is_some_and(|ku| !ku.value.digital_signature()) {
        return Err(AttestError::Chain(
            "AK certificate does not allow digital signatures".into(),
        ));
    }
    Ok(())
}

/// Certificates from one configuration string: PEM (one or more `CERTIFICATE` blocks) or the
/// base64 of one DER certificate.
pub(super) fn certs_from_config(s: &str) -> Result<Vec<Vec<u8>>, AttestError> {
    let certs = certs_from_blob(s.as_bytes())?;
    if certs.is_empty() {
        return Err(AttestError::Malformed("no certificate found".into()));
    }
    Ok(certs)
}

/// CRLs from one configuration string: PEM (`X509 CRL` blocks) or the base64 of one DER CRL.
pub(super) fn crls_from_config(s: &str) -> Result<Vec<Vec<u8>>, AttestError> {
    let bad = || AttestError::Malformed("not a CRL (PEM or base64 DER)".into());
    let crls: Vec<Vec<u8>> = if s.contains("-----BEGIN ") {
        CertificateRevocationListDer::pem_slice_iter(s.as_bytes())
            .map(|c| c.map(|c| c.as_ref().to_vec()).map_err(|_| bad()))
            .collect::<Result<_, _>>()?
    } else {
        let compact: String = s.split_ascii_whitespace().collect();
        vec![STANDARD.decode(compact).map_err(|_| bad())?]
    };
    if crls.is_empty() {
        return Err(bad());
    }
    Ok(crls)
}

/// Certificates from a file as stored: PEM, raw DER, or base64/hex text of one DER certificate.
pub(super) fn certs_from_blob(b: &[u8]) -> Result<Vec<Vec<u8>>, AttestError> {
    let bad = || AttestError::Malformed("not a certificate (PEM, DER, base64 or hex)".into());
    let certs: Vec<Vec<u8>> = if b.windows(11).any(|w| w == b"-----BEGIN ") {
        CertificateDer::pem_slice_iter(b)
            .map(|c| c.map(|c| c.as_ref().to_vec()).map_err(|_| bad()))
            .collect::<Result<_, _>>()?
    } else if b.first() == Some(&0x30) {
        vec![b.to_vec()]
    } else {
        let text = std::str::from_utf8(b).map_err(|_| bad())?;
        let compact: String = text.split_ascii_whitespace().collect();
        let der = if compact.bytes().all(|c| c.is_ascii_hexdigit()) {
            hex::decode(&compact).map_err(|_| bad())?
        } else {
            STANDARD.decode(&compact).map_err(|_| bad())?
        };
        vec![der]
    };
    for c in &certs {
        if c.len() > MAX_CERT_LEN || X509Certificate::from_der(c).is_err() {
            return Err(bad());
        }
    }
    Ok(certs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_lc_rs::digest;

    #[test]
    fn pinned_certificates_have_the_published_fingerprints() {
        for (name, der, fingerprint) in BUILTIN_ROOTS.iter().chain(BUILTIN_INTERMEDIATES.iter()) {
            assert_eq!(
                hex::encode(digest::digest(&digest::SHA256, der)),
                *fingerprint,
                "{name}"
            );
        }
    }

    #[test]
    fn builtin_store_builds() {
        let roots: Vec<Vec<u8>> = BUILTIN_ROOTS.iter().map(|r| r.1.to_vec()).collect();
        let inter = BUILTIN_INTERMEDIATES.iter().map(|r| r.1.to_vec()).collect();
        let store = AkTrustStore::new(&roots, inter, &[]).unwrap();
        assert_eq!(store.anchors.len(), 2);
        assert_eq!(store.intermediates.len(), 3);
    }

    #[test]
    fn cert_blobs_in_every_stored_form() {
        let der = BUILTIN_ROOTS[0].1;
        assert_eq!(certs_from_blob(der).unwrap(), vec![der.to_vec()]);
        let b64 = STANDARD.encode(der);
        assert_eq!(certs_from_blob(b64.as_bytes()).unwrap(), vec![der.to_vec()]);
        assert_eq!(
            certs_from_blob(hex::encode(der).as_bytes()).unwrap(),
            vec![der.to_vec()]
        );
        let pem = format!(
            "-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n",
            b64
        );
        let two = format!("{pem}{pem}");
        assert_eq!(certs_from_config(&two).unwrap().len(), 2);
        assert!(certs_from_blob(b"garbage").is_err());
        assert!(certs_from_blob(&[0x30, 0x03, 0x02, 0x01]).is_err());
        assert!(certs_from_config("").is_err());
    }
}
