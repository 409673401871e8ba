//! The TDX evidence bundle: one JSON document carrying the DCAP quote and the collateral the
//! vault needs to verify it offline. Also turns the files operators and nodes store (raw quote,
//! hex or base64 text, JSON wrappers, dcap-qvl collateral JSON) into that bundle.
//!
//! ```json
//! {"format":"weightvault-tdx-evidence/v1","quote":"<base64>","collateral":{...}}
//! ```
//! `collateral` is the dcap-qvl `QuoteCollateralV3` JSON object (CRLs and signatures as hex,
//! issuer chains as PEM, TCB info and QE identity as the exact signed JSON text).

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
use dcap_qvl::QuoteCollateralV3;
use dcap_qvl::quote::{AuthData, Quote, TDReport10};
use serde::{Deserialize, Serialize};

use crate::attest::AttestError;

/// `format` of the bundle.
pub const FORMAT: &str = "weightvault-tdx-evidence/v1";
/// A bundle larger than this is rejected before parsing (Intel's largest PCK CRL is well below).
pub const MAX_BUNDLE_LEN: usize = 1024 * 1024;
/// A quote larger than this is rejected before parsing (a v4 quote with its PCK chain is ~5 KiB).
pub const MAX_QUOTE_LEN: usize = 64 * 1024;

// Intel TDX DCAP Quoting Library API, §A.3 (quote format): sizes of the fixed parts.
const HEADER_LEN: usize = 48;
const QUOTE_SIG_LEN: usize = 64;
const ATT_KEY_LEN: usize = 64;
const CERT_DATA_HEADER_LEN: usize = 2 + 4;
const ENCLAVE_REPORT_LEN: usize = 384;
const QE_REPORT_SIG_LEN: usize = 64;
const QE_AUTH_LEN_FIELD: usize = 2;
/// Certification data type 6: QE report certification data (v4/v5 quotes).
const CERT_TYPE_QE_REPORT: u16 = 6;
/// Certification data type 5: PCK leaf ‖ PCK CA ‖ root, PEM.
const CERT_TYPE_PCK_CHAIN: u16 = 5;
const TEE_TYPE_TDX: u32 = 0x81;
const ATT_KEY_TYPE_ECDSA_P256: u16 = 2;

/// The collateral object, field for field as dcap-qvl writes it; unknown fields are rejected.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct CollateralJson {
    pck_crl_issuer_chain: String,
    root_ca_crl: String,
    pck_crl: String,
    tcb_info_issuer_chain: String,
    tcb_info: String,
    tcb_info_signature: String,
    qe_identity_issuer_chain: String,
    qe_identity: String,
    qe_identity_signature: String,
    /// Ignored: the PCK chain that counts is the one inside the quote (certification data
    /// type 5), which the QE report signature binds. Accepted so that collateral files fetched
    /// with dcap-qvl's client load unchanged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pck_certificate_chain: Option<String>,
}

impl CollateralJson {
    fn to_dcap(&self) -> Result<QuoteCollateralV3, AttestError> {
        let hex_field = |name: &str, s: &str| {
            hex::decode(s)
                .map_err(|_| AttestError::Malformed(format!("collateral {name} is not hex")))
        };
        Ok(QuoteCollateralV3 {
            pck_crl_issuer_chain: self.pck_crl_issuer_chain.clone(),
            root_ca_crl: hex_field("root_ca_crl", &self.root_ca_crl)?,
            pck_crl: hex_field("pck_crl", &self.pck_crl)?,
            tcb_info_issuer_chain: self.tcb_info_issuer_chain.clone(),
            tcb_info: self.tcb_info.clone(),
            tcb_info_signature: hex_field("tcb_info_signature", &self.tcb_info_signature)?,
            qe_identity_issuer_chain: self.qe_identity_issuer_chain.clone(),
            qe_identity: self.qe_identity.clone(),
            qe_identity_signature: hex_field("qe_identity_signature", &self.qe_identity_signature)?,
            pck_certificate_chain: None,
        })
    }
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct BundleJson {
    format: String,
    quote: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    collateral: Option<CollateralJson>,
}

/// A bundle after parsing, before any cryptographic check.
pub(crate) struct ParsedBundle {
    pub quote_bytes: Vec<u8>,
    pub quote: Quote,
    pub collateral: Option<QuoteCollateralV3>,
}

impl ParsedBundle {
    /// The TD report body (TDX 1.0 part, common to v4 and v5 quotes).
    pub fn td_report(&self) -> Result<&TDReport10, AttestError> {
        self.quote
            .report
            .as_td10()
            .ok_or_else(|| AttestError::Malformed("quote body is not a TD report".into()))
    }
}

pub(crate) fn parse_bundle(evidence: &[u8]) -> Result<ParsedBundle, AttestError> {
    if evidence.len() > MAX_BUNDLE_LEN {
        return Err(AttestError::Malformed("tdx bundle too large".into()));
    }
    let bundle: BundleJson = serde_json::from_slice(evidence)
        .map_err(|_| AttestError::Malformed("not a tdx evidence bundle".into()))?;
    if bundle.format != FORMAT {
        return Err(AttestError::Malformed("unknown tdx bundle format".into()));
    }
    let quote_bytes = STANDARD
        .decode(bundle.quote.as_bytes())
        .map_err(|_| AttestError::Malformed("quote is not base64".into()))?;
    let quote = parse_quote(&quote_bytes)?;
    let collateral = bundle
        .collateral
        .as_ref()
        .map(CollateralJson::to_dcap)
        .transpose()?;
    Ok(ParsedBundle {
        quote_bytes,
        quote,
        collateral,
    })
}

/// Parses a TDX quote and rejects anything but the one layout the vault accepts: version 4 or
/// 5, TDX TEE type, ECDSA-P256 attestation key, QE report certification data (type 6) holding
/// the PCK chain (type 5), and no byte outside the declared lengths.
pub(crate) fn parse_quote(bytes: &[u8]) -> Result<Quote, AttestError> {
    if bytes.len() > MAX_QUOTE_LEN {
        return Err(AttestError::Malformed("quote too large".into()));
    }
    if bytes.len() < HEADER_LEN {
        return Err(AttestError::Malformed(
            "quote shorter than its header".into(),
        ));
    }
    let quote = Quote::parse(bytes)
        .map_err(|e| AttestError::Malformed(format!("quote does not parse: {e}")))?;
    // Intel TDX DCAP Quoting Library API, §A.3 Quote Header: version 4 (TDX 1.0) or 5 (TDX 1.5),
    // tee_type 0x81, attestation key type 2 (ECDSA-256 with P-256).
    if !matches!(quote.header.version, 4 | 5) {
        return Err(AttestError::Malformed(format!(
            "quote version {} is not 4 or 5",
            quote.header.version
        )));
    }
    if quote.header.tee_type != TEE_TYPE_TDX {
        return Err(AttestError::Malformed("not a TDX quote".into()));
    }
    if quote.header.attestation_key_type != ATT_KEY_TYPE_ECDSA_P256 {
        return Err(AttestError::Malformed(
            "attestation key is not ECDSA P-256".into(),
        ));
    }
    if quote.report.as_td10().is_none() {
        return Err(AttestError::Malformed(
            "quote body is not a TD report".into(),
        ));
    }
    let AuthData::V4(auth) = &quote.auth_data else {
        return Err(AttestError::Malformed(
            "quote signature data is not v4".into(),
        ));
    };
    // §A.3 Certification Data: the outer type is 6 (QE report certification data) and its
    // inner certification data is type 5 (the PCK certificate chain).
    if auth.certification_data.cert_type != CERT_TYPE_QE_REPORT {
        return Err(AttestError::Malformed(
            "outer certification data is not type 6".into(),
        ));
    }
    let inner = &auth.qe_report_data;
    if inner.certification_data.cert_type != CERT_TYPE_PCK_CHAIN {
        return Err(AttestError::Malformed(
            "the quote does not carry its PCK chain (certification data type 5)".into(),
        ));
    }
    // Canonical layout: every length field accounts exactly for the bytes present.
    let outer_body = ENCLAVE_REPORT_LEN
        + QE_REPORT_SIG_LEN
        + QE_AUTH_LEN_FIELD
        + inner.qe_auth_data.data.len()
        + CERT_DATA_HEADER_LEN
        + inner.certification_data.body.data.len();
    if auth.certification_data.body.data.len() != outer_body {
        return Err(AttestError::Malformed(
            "trailing bytes in QE report certification data".into(),
        ));
    }
    let auth_len = QUOTE_SIG_LEN + ATT_KEY_LEN + CERT_DATA_HEADER_LEN + outer_body;
    let signed = quote.signed_length();
    let declared = bytes
        .get(signed..signed + 4)
        .and_then(|b| <[u8; 4]>::try_from(b).ok())
        .map(u32::from_le_bytes)
        .ok_or_else(|| AttestError::Malformed("quote truncated".into()))?;
    if usize::try_from(declared).ok() != Some(auth_len) {
        return Err(AttestError::Malformed(
            "quote length fields do not match its size".into(),
        ));
    }
    // Quote buffers come zero-padded from the quote generation library (T1 has 70 such bytes);
    // they are outside every length field and every signature. Anything else there is refused.
    let padding = bytes
        .get(signed + 4 + auth_len..)
        .ok_or_else(|| AttestError::Malformed("quote truncated".into()))?;
    if padding.iter().any(|b| *b != 0) {
        return Err(AttestError::Malformed(
            "non-zero bytes after the quote".into(),
        ));
    }
    Ok(quote)
}

/// Builds the bundle from files as stored: the quote raw, as hex or base64 text, or inside a
/// JSON wrapper (`quote`, `td_quote` or `tdx_quote`: hex/base64 string or byte array), plus the
/// dcap-qvl collateral JSON. A bundle is returned unchanged. TDX takes no extra certificates:
/// the PCK chain travels inside the quote.
pub fn bundle_from_inputs(
    evidence: &[u8],
    extra: &[Vec<u8>],
    collateral: Option<&[u8]>,
) -> Result<Vec<u8>, AttestError> {
    if evidence.len() > MAX_BUNDLE_LEN || collateral.is_some_and(|c| c.len() > MAX_BUNDLE_LEN) {
        return Err(AttestError::Malformed("input too large".into()));
    }
    if !extra.is_empty() {
        return Err(AttestError::Malformed(
            "tdx takes no extra certificates: the PCK chain is inside the quote".into(),
        ));
    }
    if is_bundle(evidence) {
        if collateral.is_some() {
            return Err(AttestError::Malformed(
                "evidence is already a bundle with its collateral".into(),
            ));
        }
        parse_bundle(evidence)?;
        return Ok(evidence.to_vec());
    }
    let quote = decode_quote_input(evidence)?;
    parse_quote(&quote)?;
    let collateral = collateral
        .map(|c| {
            let json: CollateralJson = serde_json::from_slice(c)
                .map_err(|_| AttestError::Malformed("collateral is not dcap-qvl JSON".into()))?;
            json.to_dcap()?;
            Ok::<_, AttestError>(json)
        })
        .transpose()?;
    let bundle = BundleJson {
        format: FORMAT.to_string(),
        quote: STANDARD.encode(&quote),
        collateral,
    };
    serde_json::to_vec(&bundle).map_err(|_| AttestError::Malformed("bundle does not encode".into()))
}

fn is_bundle(evidence: &[u8]) -> bool {
    #[derive(Deserialize)]
    struct Probe {
        format: Option<String>,
    }
    serde_json::from_slice::<Probe>(evidence).is_ok_and(|p| p.format.as_deref() == Some(FORMAT))
}

/// Detects the stored form of a quote and returns its raw bytes.
fn decode_quote_input(input: &[u8]) -> Result<Vec<u8>, AttestError> {
    let is_text = input
        .iter()
        .all(|b| b.is_ascii_graphic() || b.is_ascii_whitespace());
    if !is_text || input.is_empty() {
        return Ok(input.to_vec());
    }
    let text = input.trim_ascii();
    if text.first() == Some(&b'{') {
        let value: serde_json::Value = serde_json::from_slice(text)
            .map_err(|_| AttestError::Malformed("evidence JSON does not parse".into()))?;
        let field = ["quote", "td_quote", "tdx_quote"]
            .iter()
            .find_map(|k| value.get(*k))
            .ok_or_else(|| AttestError::Malformed("evidence JSON has no quote field".into()))?;
        return match field {
            serde_json::Value::String(s) => decode_text(s.as_bytes()),
            serde_json::Value::Array(items) => items
                .iter()
                .map(|v| v.as_u64().and_then(|n| u8::try_from(n).ok()))
                .collect::<Option<Vec<u8>>>()
                .ok_or_else(|| AttestError::Malformed("quote array is not bytes".into())),
            _ => Err(AttestError::Malformed(
                "quote field is not a string or array".into(),
            )),
        };
    }
    decode_text(text)
}

fn decode_text(text: &[u8]) -> Result<Vec<u8>, AttestError> {
    let compact: Vec<u8> = text
        .iter()
        .copied()
        .filter(|b| !b.is_ascii_whitespace())
        .collect();
    let digits = compact
        .strip_prefix(b"0x")
        .or_else(|| compact.strip_prefix(b"0X"))
        .unwrap_or(&compact);
    if !digits.is_empty() && digits.iter().all(u8::is_ascii_hexdigit) {
        return hex::decode(digits).map_err(|_| AttestError::Malformed("quote hex is odd".into()));
    }
    [STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD]
        .iter()
        .find_map(|engine| engine.decode(&compact).ok())
        .ok_or_else(|| AttestError::Malformed("quote is neither raw, hex nor base64".into()))
}

/// Fuzz entry point body: every parser of the bundle and its inner structures.
pub(crate) fn fuzz(data: &[u8]) {
    let _ = parse_bundle(data);
    let _ = parse_quote(data);
    let _ = bundle_from_inputs(data, &[], None);
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = serde_json::from_str::<dcap_qvl::TcbInfo>(text);
        let _ = serde_json::from_str::<dcap_qvl::QeIdentity>(text);
        let _ = serde_json::from_slice::<CollateralJson>(data).map(|c| c.to_dcap());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn minimal_header(version: u16, tee_type: u32) -> Vec<u8> {
        let mut q = Vec::new();
        q.extend_from_slice(&version.to_le_bytes());
        q.extend_from_slice(&ATT_KEY_TYPE_ECDSA_P256.to_le_bytes());
        q.extend_from_slice(&tee_type.to_le_bytes());
        q.resize(HEADER_LEN, 0);
        q
    }

    #[test]
    fn truncated_garbage_and_oversized_are_malformed() {
        let cases: Vec<Vec<u8>> = vec![
            vec![],
            b"\x00garbage".to_vec(),
            minimal_header(4, TEE_TYPE_TDX),
            minimal_header(3, 0),
            minimal_header(9, TEE_TYPE_TDX),
            {
                let mut q = minimal_header(4, TEE_TYPE_TDX);
                q.resize(HEADER_LEN + 584 + 4, 0);
                q.extend_from_slice(&[0xff; 4]);
                q
            },
            vec![0u8; MAX_QUOTE_LEN + 1],
        ];
        for case in cases {
            assert!(matches!(parse_quote(&case), Err(AttestError::Malformed(_))));
        }
        assert!(matches!(
            parse_bundle(&vec![b' '; MAX_BUNDLE_LEN + 1]),
            Err(AttestError::Malformed(_))
        ));
        for bad in [
            &b"{}"[..],
            br#"{"format":"weightvault-tdx-evidence/v1","quote":"!!"}"#,
            br#"{"format":"other","quote":""}"#,
            br#"{"format":"weightvault-tdx-evidence/v1","quote":"","x":1}"#,
            br#"{"format":"weightvault-tdx-evidence/v1","quote":"BAACAA=="}"#,
        ] {
            assert!(matches!(parse_bundle(bad), Err(AttestError::Malformed(_))));
        }
    }

    #[test]
    fn text_forms_decode() {
        assert_eq!(decode_quote_input(b"0400 02\n00").unwrap(), [4, 0, 2, 0]);
        assert_eq!(decode_quote_input(b"0x04000200\n").unwrap(), [4, 0, 2, 0]);
        assert_eq!(decode_quote_input(b"BAACAA==\n").unwrap(), [4, 0, 2, 0]);
        assert_eq!(
            decode_quote_input(br#"{"quote":[4,0,2,0]}"#).unwrap(),
            [4, 0, 2, 0]
        );
        assert_eq!(
            decode_quote_input(br#"{"td_quote":"04000200"}"#).unwrap(),
            [4, 0, 2, 0]
        );
        assert_eq!(
            decode_quote_input(&[4, 0, 2, 0, 0x81]).unwrap(),
            [4, 0, 2, 0, 0x81]
        );
        assert!(decode_quote_input(br#"{"quote":[4,999]}"#).is_err());
        assert!(decode_quote_input(b"not base64 at all!").is_err());
    }

    #[test]
    fn bundle_builder_rejects_bad_inputs() {
        assert!(matches!(
            bundle_from_inputs(b"BAACAA==", &[b"cert".to_vec()], None),
            Err(AttestError::Malformed(_))
        ));
        assert!(matches!(
            bundle_from_inputs(b"BAACAA==", &[], None),
            Err(AttestError::Malformed(_))
        ));
    }

    #[test]
    fn fuzz_never_panics_on_edge_inputs() {
        for data in [
            &b""[..],
            b"{",
            b"\xff\xfe",
            br#"{"format":"weightvault-tdx-evidence/v1","quote":"","collateral":{}}"#,
            br#"{"id":"TDX","version":3}"#,
        ] {
            fuzz(data);
        }
        let mut q = minimal_header(5, TEE_TYPE_TDX);
        q.extend_from_slice(&[3, 0, 0x88, 0x02, 0, 0]);
        q.resize(HEADER_LEN + 6 + 648 + 4, 0xff);
        fuzz(&q);
    }
}
