//! The SEV-SNP evidence bundle: one JSON document carrying the report and the certificates the
//! vault needs, so verification never fetches anything.
//!
//! ```json
//! {"format":"weightvault-snp-evidence/v1",
//!  "report":"<base64 of the 1184-byte ATTESTATION_REPORT>",
//!  "vek":"<base64 of the VCEK or VLEK certificate, DER>",
//!  "chain":["<base64 DER ASK or ASVK>", "<base64 DER ARK>"]}
//! ```
//! `chain` is optional: the ASK/ASVK/ARK of every product are pinned in the binary.

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE, URL_SAFE_NO_PAD};
use serde::{Deserialize, Serialize};

use super::certs::{MAX_CERT_LEN, parse_cert, pem_certs};
use super::report::REPORT_LEN;
use crate::attest::AttestError;

pub const FORMAT: &str = "weightvault-snp-evidence/v1";
/// A bundle larger than this is rejected before parsing.
pub const MAX_BUNDLE_LEN: usize = 64 * 1024;
/// At most this many extra certificates (ASK, ASVK, ARK and one spare).
pub const MAX_CHAIN: usize = 4;

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct BundleJson {
    format: String,
    report: String,
    vek: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    chain: Vec<String>,
}

/// A decoded bundle. Nothing in it is trusted yet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bundle {
    pub report: Vec<u8>,
    pub vek: Vec<u8>,
    pub chain: Vec<Vec<u8>>,
}

fn malformed(detail: &str) -> AttestError {
    AttestError::Malformed(detail.into())
}

impl Bundle {
    pub fn parse(bytes: &[u8]) -> Result<Bundle, AttestError> {
        if bytes.len() > MAX_BUNDLE_LEN {
            return Err(malformed("snp evidence bundle too large"));
        }
        let json: BundleJson = serde_json::from_slice(bytes)
            .map_err(|_| malformed("not an snp evidence bundle (JSON)"))?;
        if json.format != FORMAT {
            return Err(malformed("unknown snp evidence bundle format"));
        }
        if json.chain.len() > MAX_CHAIN {
            return Err(malformed("too many certificates in the bundle"));
        }
        let b64 = |s: &str, what: &str| {
            STANDARD
                .decode(s)
                .map_err(|_| AttestError::Malformed(format!("{what} is not base64")))
        };
        let report = b64(&json.report, "report")?;
        if report.len() != REPORT_LEN {
            return Err(malformed("report is not 1184 bytes"));
        }
        let vek = b64(&json.vek, "vek")?;
        let chain = json
            .chain
            .iter()
            .map(|c| b64(c, "chain certificate"))
            .collect::<Result<Vec<_>, _>>()?;
        if std::iter::once(&vek)
            .chain(chain.iter())
            .any(|c| c.len() > MAX_CERT_LEN)
        {
            return Err(malformed("certificate too large"));
        }
        Ok(Bundle { report, vek, chain })
    }

    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(&BundleJson {
            format: FORMAT.to_string(),
            report: STANDARD.encode(&self.report),
            vek: STANDARD.encode(&self.vek),
            chain: self.chain.iter().map(|c| STANDARD.encode(c)).collect(),
        })
        .expect("bundle serializes")
    }
}

/// Decodes one stored blob: hex text, base64 text (standard or URL-safe), a JSON wrapper whose
/// `report`/`attestation_report`/`evidence` field holds one of those or a byte array, or raw.
fn decode_blob(input: &[u8]) -> Vec<u8> {
    if let Ok(value) = serde_json::from_slice::<serde_json::Value>(input)
        && let Some(obj) = value.as_object()
    {
        for key in ["report", "attestation_report", "evidence"] {
            match obj.get(key) {
                Some(serde_json::Value::String(s)) => return decode_blob(s.as_bytes()),
                Some(serde_json::Value::Array(items)) => {
                    let bytes: Option<Vec<u8>> = items
                        .iter()
                        .map(|v| v.as_u64().and_then(|n| u8::try_from(n).ok()))
                        .collect();
                    if let Some(bytes) = bytes {
                        return bytes;
                    }
                }
                _ => {}
            }
        }
    }
    let text: Vec<u8> = input
        .iter()
        .copied()
        .filter(|b| !b.is_ascii_whitespace())
        .collect();
    if !text.is_empty() && input.is_ascii() {
        if text.len().is_multiple_of(2)
            && text.iter().all(u8::is_ascii_hexdigit)
            && let Ok(bytes) = hex::decode(&text)
        {
            return bytes;
        }
        for engine in [&STANDARD, &URL_SAFE, &URL_SAFE_NO_PAD] {
            if let Ok(bytes) = engine.decode(&text) {
                return bytes;
            }
        }
    }
    input.to_vec()
}

/// Certificates in one stored file: PEM (one or several), DER, or base64/hex of DER.
fn decode_certs(input: &[u8]) -> Result<Vec<Vec<u8>>, AttestError> {
    if input.windows(11).any(|w| w == b"-----BEGIN ") {
        let certs = pem_certs(input)?;
        if certs.is_empty() {
            return Err(malformed("PEM file holds no certificate"));
        }
        return Ok(certs);
    }
    Ok(vec![decode_blob(input)])
}

/// Builds the canonical bundle from files as stored (see the module doc and
/// docs/attestation/snp.md): `evidence` is the report (raw, hex, base64 or a JSON wrapper) or
/// already a bundle (returned unchanged); `extra` and `collateral` are certificate files (DER, PEM
/// with one or more certificates, base64). Exactly one of the certificates must be an end-entity
/// (the VCEK or VLEK); the CA certificates become `chain`, intermediates before roots.
pub fn bundle_from_inputs(
    evidence: &[u8],
    extra: &[Vec<u8>],
    collateral: Option<&[u8]>,
) -> Result<Vec<u8>, AttestError> {
    if Bundle::parse(evidence).is_ok() {
        return Ok(evidence.to_vec());
    }
    if evidence.len() > MAX_BUNDLE_LEN {
        return Err(malformed("evidence file too large"));
    }
    let report = decode_blob(evidence);
    if report.len() != REPORT_LEN {
        return Err(AttestError::Malformed(format!(
            "evidence decodes to {} bytes, not a 1184-byte SNP report",
            report.len()
        )));
    }
    let mut leaves = Vec::new();
    let mut intermediates = Vec::new();
    let mut roots = Vec::new();
    for file in extra.iter().map(Vec::as_slice).chain(collateral) {
        for der in decode_certs(file)? {
            let cert = parse_cert(&der)?;
            if !cert.is_ca() {
                leaves.push(der);
            } else if cert.subject().as_raw() == cert.issuer().as_raw() {
                roots.push(der);
            } else {
                intermediates.push(der);
            }
        }
    }
    let [vek] = <[Vec<u8>; 1]>::try_from(leaves)
        .map_err(|_| malformed("need exactly one VCEK or VLEK certificate"))?;
    let mut chain = intermediates;
    chain.extend(roots);
    chain.dedup();
    if chain.len() > MAX_CHAIN {
        return Err(malformed("too many certificates"));
    }
    Ok(Bundle { report, vek, chain }.encode())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bundle_round_trips_and_is_strict() {
        let b = Bundle {
            report: vec![7u8; REPORT_LEN],
            vek: vec![1, 2, 3],
            chain: vec![vec![4], vec![5]],
        };
        let enc = b.encode();
        assert_eq!(Bundle::parse(&enc).unwrap(), b);
        let mut v: serde_json::Value = serde_json::from_slice(&enc).unwrap();
        v["extra"] = serde_json::json!(1);
        assert!(Bundle::parse(&serde_json::to_vec(&v).unwrap()).is_err());
        let mut v: serde_json::Value = serde_json::from_slice(&enc).unwrap();
        v["format"] = serde_json::json!("other");
        assert!(Bundle::parse(&serde_json::to_vec(&v).unwrap()).is_err());
        let mut v: serde_json::Value = serde_json::from_slice(&enc).unwrap();
        v["report"] = serde_json::json!(STANDARD.encode([0u8; 10]));
        assert!(Bundle::parse(&serde_json::to_vec(&v).unwrap()).is_err());
        let mut v: serde_json::Value = serde_json::from_slice(&enc).unwrap();
        v["chain"] = serde_json::json!(["AA==", "AA==", "AA==", "AA==", "AA=="]);
        assert!(Bundle::parse(&serde_json::to_vec(&v).unwrap()).is_err());
    }

    #[test]
    fn malformed_inputs_never_panic() {
        let big = vec![b' '; MAX_BUNDLE_LEN + 1];
        for input in [&b""[..], b"{", b"null", b"[]", b"\xff\xfe", &big] {
            assert!(matches!(
                Bundle::parse(input),
                Err(AttestError::Malformed(_))
            ));
            assert!(bundle_from_inputs(input, &[], None).is_err());
        }
    }

    #[test]
    fn blob_forms() {
        let raw = vec![0xA5u8; 16];
        assert_eq!(decode_blob(&raw), raw);
        assert_eq!(decode_blob(hex::encode_upper(&raw).as_bytes()), raw);
        assert_eq!(decode_blob(STANDARD.encode(&raw).as_bytes()), raw);
        assert_eq!(decode_blob(URL_SAFE_NO_PAD.encode(&raw).as_bytes()), raw);
        let wrapped = serde_json::json!({ "report": raw.clone() }).to_string();
        assert_eq!(decode_blob(wrapped.as_bytes()), raw);
        let wrapped = serde_json::json!({ "attestation_report": hex::encode(&raw) }).to_string();
        assert_eq!(decode_blob(wrapped.as_bytes()), raw);
    }
}
