//! The Nitro evidence bundle is the raw COSE_Sign1; this builds it from the forms documents are
//! stored in (raw, base64, hex, JSON wrappers) for `weightvault attest verify`.

use base64::Engine;
use base64::alphabet;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};

use super::document::{MAX_DOCUMENT_LEN, parse_envelope};
use super::malformed;
use crate::attest::AttestError;

/// Inputs larger than this are rejected (hex of a maximal document, plus whitespace).
const MAX_INPUT_LEN: usize = 4 * MAX_DOCUMENT_LEN;

/// Base64 with either alphabet and optional padding (stored vectors use the standard one).
const B64: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);
const B64_URL: GeneralPurpose = GeneralPurpose::new(
    &alphabet::URL_SAFE,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);
/// JSON members that may hold the document in a wrapper object.
const JSON_KEYS: [&str; 5] = [
    "attestation_document",
    "attestation_doc",
    "attestation",
    "document",
    "evidence",
];

fn looks_like_cose(b: &[u8]) -> bool {
    // 0x84: array(4); 0xd2: tag 18.
    matches!(b, [0x84, ..] | [0xd2, 0x84, ..])
}

fn decode_text(text: &[u8], json_depth: u8) -> Option<Vec<u8>> {
    let compact: Vec<u8> = text
        .iter()
        .copied()
        .filter(|b| !b.is_ascii_whitespace())
        .collect();
    // Hex first: base64 of a COSE_Sign1 starts with "hE" or "0oQ", never a hex digit pair.
    if compact.len().is_multiple_of(2) && compact.iter().all(u8::is_ascii_hexdigit) {
        return hex::decode(&compact).ok();
    }
    if let Ok(raw) = B64.decode(&compact).or_else(|_| B64_URL.decode(&compact)) {
        return Some(raw);
    }
    if json_depth == 0 {
        return None;
    }
    match serde_json::from_slice::<serde_json::Value>(text).ok()? {
        serde_json::Value::String(s) => decode_text(s.as_bytes(), 0),
        serde_json::Value::Object(map) => JSON_KEYS.iter().find_map(|k| match map.get(*k) {
            Some(serde_json::Value::String(s)) => decode_text(s.as_bytes(), 0),
            _ => None,
        }),
        _ => None,
    }
}

/// Builds the Nitro bundle (the raw COSE_Sign1 bytes) from a stored file: raw CBOR (returned
/// unchanged), base64 (standard or URL-safe), hex, or a JSON string or object holding one of
/// those under `attestation_document`, `attestation_doc`, `attestation`, `document` or
/// `evidence`. The chain travels inside the document, so `extra` and `collateral` must be empty.
pub fn bundle_from_inputs(
    evidence: &[u8],
    extra: &[Vec<u8>],
    collateral: Option<&[u8]>,
) -> Result<Vec<u8>, AttestError> {
    if !extra.is_empty() || collateral.is_some() {
        return Err(malformed(
            "nitro documents carry their own certificates; no --certs or --collateral",
        ));
    }
    if evidence.len() > MAX_INPUT_LEN {
        return Err(malformed("evidence file too large"));
    }
    let raw = if looks_like_cose(evidence) {
        evidence.to_vec()
    } else {
        decode_text(evidence, 1)
            .filter(|raw| looks_like_cose(raw))
            .ok_or_else(|| malformed("not a Nitro attestation document (raw, base64, hex, JSON)"))?
    };
    parse_envelope(&raw)?;
    Ok(raw)
}

#[cfg(test)]
mod tests {
    use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};

    use super::super::document::tests::{is_malformed, sample_bundle};
    use super::*;

    #[test]
    fn bundle_from_inputs_detects_forms() {
        let raw = sample_bundle();
        let b64 = STANDARD.encode(&raw);
        let wrapped = format!(
            "{}\n",
            b64.as_bytes()
                .chunks(76)
                .map(|c| std::str::from_utf8(c).unwrap())
                .collect::<Vec<_>>()
                .join("\n")
        );
        let json = serde_json::json!({ "attestation_document": b64 }).to_string();
        let inputs = [
            raw.clone(),
            b64.clone().into_bytes(),
            wrapped.into_bytes(),
            URL_SAFE_NO_PAD.encode(&raw).into_bytes(),
            hex::encode(&raw).into_bytes(),
            hex::encode_upper(&raw).into_bytes(),
            json.into_bytes(),
            serde_json::to_vec(&b64).unwrap(),
        ];
        for input in inputs {
            assert_eq!(bundle_from_inputs(&input, &[], None).unwrap(), raw);
        }
        assert!(is_malformed(bundle_from_inputs(&raw, &[vec![1]], None)));
        assert!(is_malformed(bundle_from_inputs(&raw, &[], Some(b"x"))));
        assert!(is_malformed(bundle_from_inputs(b"hello world", &[], None)));
        assert!(is_malformed(bundle_from_inputs(b"{\"x\":1}", &[], None)));
        assert!(is_malformed(bundle_from_inputs(b"\x84\x01", &[], None)));
        assert!(is_malformed(bundle_from_inputs(
            &vec![b'A'; MAX_INPUT_LEN + 1],
            &[],
            None
        )));
    }
}
