//! Maps dcap-qvl's `anyhow` errors to typed [`AttestError`]s.
//!
//! dcap-qvl reports failures as text. The classes below match the messages of the version pinned
//! in Cargo.lock (0.7.1, `src/verify.rs` and `src/utils.rs`, plus the webpki error names it
//! embeds); the integration tests pin each class on a real vector or mutation, so a wording
//! change in an upgrade fails the tests instead of silently changing a reason. An unknown message
//! is still a rejection (fail closed), reported as `Malformed`.

use crate::attest::AttestError;

/// Policy rule names reported as the short reason (stable, no attacker bytes).
pub const RULE_TCB_LEVEL: &str = "tdx tcb level not appraisable";
pub const RULE_TD_ATTRIBUTES: &str = "tdx td attributes";

const MAX_DETAIL: usize = 300;

pub(crate) fn map(err: &anyhow::Error) -> AttestError {
    let full = format!("{err:#}");
    let detail: String = full.chars().take(MAX_DETAIL).collect();
    let has = |needles: &[&str]| needles.iter().any(|n| full.contains(n));

    // Time: collateral or certificate outside its validity window at the verification time.
    if has(&[
        "TCBInfo expired",
        "QE Identity expired",
        "issue date is in the future",
        "CertExpired",
        "CertNotValidYet",
        "CrlExpired",
    ]) {
        return AttestError::Expired(detail);
    }
    // The quoting enclave is not Intel's TD QE, or its report does not vouch for the
    // attestation key: the key that signed the quote is not trusted.
    if has(&[
        "QE report validation failed",
        "QE MRSIGNER mismatch",
        "QE ISVPRODID mismatch",
        "QE MISCSELECT mismatch",
        "QE ATTRIBUTES mismatch",
        "QE report hash mismatch",
        "Invalid QE auth data length",
    ]) {
        return AttestError::UntrustedKey;
    }
    // Certificate paths, CRLs and the trust anchor, checked before any signature they carry.
    if has(&[
        "Failed to verify certificate chain",
        "Failed to load root ca",
        "Failed to parse root CA CRL",
        "Failed to parse PCK CRL",
        "CertRevoked",
        "must be issued directly by the root CA",
        "Too many intermediate certificates",
        "Certificate chain is too short",
        "Failed to parse TCB Info leaf certificate",
        "Failed to parse QE Identity leaf certificate",
        "Failed to parse PCK certificate",
        "Failed to extract PCK certificates",
    ]) {
        return AttestError::Chain(detail);
    }
    if has(&[
        "Signature is invalid",
        "ISV enclave report signature is invalid",
    ]) {
        return AttestError::BadSignature;
    }
    if has(&["Debug mode is enabled"]) {
        return AttestError::DebugMode;
    }
    if has(&[
        "No matching TCB level",
        "Fmspc mismatch",
        "TCB status is invalid",
        "Unrecognized TCB status",
        "is below minimum required",
        "TDX module",
        "non-TDX TCB info",
    ]) {
        return AttestError::Policy {
            rule: RULE_TCB_LEVEL,
            detail,
        };
    }
    if has(&[
        "TD profiling is enabled",
        "Reserved bits in TD attributes",
        "TD migration is enabled",
        "SERVTD_EXT is enabled",
        "SEPT_VE_DISABLE is not enabled",
        "Invalid MR service TD",
    ]) {
        return AttestError::Policy {
            rule: RULE_TD_ATTRIBUTES,
            detail,
        };
    }
    AttestError::Malformed(detail)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(msg: &str) -> AttestError {
        map(&anyhow::anyhow!(msg.to_string()))
    }

    #[test]
    fn classes() {
        assert!(matches!(m("TCBInfo expired"), AttestError::Expired(_)));
        assert!(matches!(
            m("Failed to verify certificate chain: CrlExpired { time: 1 }"),
            AttestError::Expired(_)
        ));
        assert!(matches!(
            m("Failed to verify certificate chain: UnknownIssuer"),
            AttestError::Chain(_)
        ));
        assert_eq!(
            m("Signature is invalid for tcb_info in quote_collateral"),
            AttestError::BadSignature
        );
        assert_eq!(
            m("QE report validation failed: Debug mode is enabled"),
            AttestError::UntrustedKey
        );
        assert_eq!(m("Debug mode is enabled"), AttestError::DebugMode);
        assert!(matches!(
            m("No matching TCB level found"),
            AttestError::Policy {
                rule: RULE_TCB_LEVEL,
                ..
            }
        ));
        assert!(matches!(
            m("SEPT_VE_DISABLE is not enabled"),
            AttestError::Policy {
                rule: RULE_TD_ATTRIBUTES,
                ..
            }
        ));
        assert!(matches!(m("something new"), AttestError::Malformed(_)));
        let long = m(&"x".repeat(10_000));
        assert!(matches!(long, AttestError::Malformed(d) if d.len() == MAX_DETAIL));
    }
}
