//! The TPM evidence bundle (the one form `verify` takes) and its construction from the forms
//! evidence is stored in: Trustee's `tpm_evidence.json` and go-tpm-tools' `attest.Attestation`
//! protobuf (raw, hex or base64).

use std::collections::BTreeMap;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde::{Deserialize, Serialize};

use super::chain::{MAX_CERT_LEN, certs_from_blob};
use super::wire::{
    MAX_ATTEST_LEN, MAX_PCR_INDEX, MAX_SIGNATURE_LEN, MAX_TPM_PUBLIC_LEN, parse_tpm_public,
};
use crate::attest::AttestError;

/// Value of the bundle's `format` field.
pub const FORMAT: &str = "weightvault-tpm-evidence/v1";
/// Largest bundle `verify` accepts.
pub const MAX_BUNDLE_LEN: usize = 96 * 1024;
/// Largest input `bundle_from_inputs` reads (a go-tpm-tools attestation carries its event log).
pub const MAX_INPUT_LEN: usize = 4 * 1024 * 1024;
/// Most certificates in `ak_cert_chain`.
pub const MAX_CHAIN_CERTS: usize = 8;
/// Largest DER `SubjectPublicKeyInfo` (RSA-8192).
const MAX_SPKI_LEN: usize = 1100;
/// `HashAlgo.SHA256` of go-tpm-tools' `tpm.proto` (the TPM algorithm id).
const PB_HASH_SHA256: i32 = 0x000b;

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct BundleJson {
    format: String,
    ak_public: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    ak_tpm_public: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    ak_cert_chain: Vec<String>,
    quote: QuoteJson,
    pcrs: BTreeMap<String, String>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct QuoteJson {
    message: String,
    signature: String,
}

/// A decoded bundle. Nothing in it is trusted yet.
#[derive(Debug)]
pub(super) struct Bundle {
    pub ak_spki: Vec<u8>,
    pub ak_tpm_public: Option<Vec<u8>>,
    pub ak_cert_chain: Vec<Vec<u8>>,
    pub message: Vec<u8>,
    pub signature: Vec<u8>,
    /// SHA-256 bank values by PCR index.
    pub pcrs: BTreeMap<u8, [u8; 32]>,
}

fn b64(field: &str, s: &str, max: usize) -> Result<Vec<u8>, AttestError> {
    if s.len() > max.saturating_mul(4) / 3 + 4 {
        return Err(AttestError::Malformed(format!("{field} is too large")));
    }
    let v = STANDARD
        .decode(s)
        .map_err(|_| AttestError::Malformed(format!("{field} is not base64")))?;
    if v.is_empty() || v.len() > max {
        return Err(AttestError::Malformed(format!(
            "{field} must be 1..={max} bytes"
        )));
    }
    Ok(v)
}

/// A PCR index written canonically in decimal (`"0"` to `"31"`).
fn pcr_index(s: &str) -> Result<u8, AttestError> {
    let bad = || AttestError::Malformed("PCR index must be decimal 0..=31".into());
    if s.is_empty() || s.len() > 2 || (s.len() > 1 && s.starts_with('0')) {
        return Err(bad());
    }
    if !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let i: u8 = s.parse().map_err(|_| bad())?;
    if i > MAX_PCR_INDEX {
        return Err(bad());
    }
    Ok(i)
}

fn pcr_value(s: &str) -> Result<[u8; 32], AttestError> {
    let bad = || AttestError::Malformed("PCR value must be 64 lowercase hex digits".into());
    if s.len() != 64 || s.bytes().any(|b| b.is_ascii_uppercase()) {
        return Err(bad());
    }
    let mut out = [0u8; 32];
    hex::decode_to_slice(s, &mut out).map_err(|_| bad())?;
    Ok(out)
}

/// Decodes a bundle. Checks form and sizes only; `verify` decides what is true.
pub(super) fn decode(evidence: &[u8]) -> Result<Bundle, AttestError> {
    if evidence.len() > MAX_BUNDLE_LEN {
        return Err(AttestError::Malformed("evidence too large".into()));
    }
    let json: BundleJson = serde_json::from_slice(evidence)
        .map_err(|_| AttestError::Malformed("not TPM evidence JSON".into()))?;
    if json.format != FORMAT {
        return Err(AttestError::Malformed("unknown TPM evidence format".into()));
    }
    if json.ak_cert_chain.len() > MAX_CHAIN_CERTS {
        return Err(AttestError::Malformed("ak_cert_chain is too long".into()));
    }
    let ak_cert_chain = json
        .ak_cert_chain
        .iter()
        .map(|c| b64("ak_cert_chain", c, MAX_CERT_LEN))
        .collect::<Result<Vec<_>, _>>()?;
    let ak_tpm_public = json
        .ak_tpm_public
        .as_deref()
        .map(|s| b64("ak_tpm_public", s, MAX_TPM_PUBLIC_LEN))
        .transpose()?;
    let mut pcrs = BTreeMap::new();
    for (k, v) in &json.pcrs {
        pcrs.insert(pcr_index(k)?, pcr_value(v)?);
    }
    Ok(Bundle {
        ak_spki: b64("ak_public", &json.ak_public, MAX_SPKI_LEN)?,
        ak_tpm_public,
        ak_cert_chain,
        message: b64("quote.message", &json.quote.message, MAX_ATTEST_LEN)?,
        signature: b64("quote.signature", &json.quote.signature, MAX_SIGNATURE_LEN)?,
        pcrs,
    })
}

/// Encodes a bundle in its canonical JSON form.
fn encode(b: &Bundle) -> Result<Vec<u8>, AttestError> {
    let json = BundleJson {
        format: FORMAT.to_string(),
        ak_public: STANDARD.encode(&b.ak_spki),
        ak_tpm_public: b.ak_tpm_public.as_ref().map(|t| STANDARD.encode(t)),
        ak_cert_chain: b.ak_cert_chain.iter().map(|c| STANDARD.encode(c)).collect(),
        quote: QuoteJson {
            message: STANDARD.encode(&b.message),
            signature: STANDARD.encode(&b.signature),
        },
        pcrs: b
            .pcrs
            .iter()
            .map(|(i, v)| (i.to_string(), hex::encode(v)))
            .collect(),
    };
    let out = serde_json::to_vec(&json)
        .map_err(|_| AttestError::Malformed("bundle does not serialize".into()))?;
    // What we emit must be what `verify` accepts.
    decode(&out)?;
    Ok(out)
}

/// Trustee's TPM evidence (`deps/verifier/test_data/tpm_evidence.json`).
#[derive(Deserialize)]
struct TrusteeEvidence {
    ak_public: String,
    tpm_quote: TrusteeQuote,
}

#[derive(Deserialize)]
struct TrusteeQuote {
    message: String,
    signature: String,
    /// SHA-256 bank, index = PCR number.
    pcrs: Vec<String>,
}

fn from_trustee(t: TrusteeEvidence) -> Result<Bundle, AttestError> {
    if t.tpm_quote.pcrs.len() > usize::from(MAX_PCR_INDEX) + 1 {
        return Err(AttestError::Malformed("too many PCRs".into()));
    }
    let mut pcrs = BTreeMap::new();
    for (i, v) in t.tpm_quote.pcrs.iter().enumerate() {
        // `i` is at most MAX_PCR_INDEX, checked above.
        pcrs.insert(i as u8, pcr_value(&v.to_ascii_lowercase())?);
    }
    Ok(Bundle {
        ak_spki: b64("ak_public", &t.ak_public, MAX_SPKI_LEN)?,
        ak_tpm_public: None,
        ak_cert_chain: Vec::new(),
        message: b64("tpm_quote.message", &t.tpm_quote.message, MAX_ATTEST_LEN)?,
        signature: b64(
            "tpm_quote.signature",
            &t.tpm_quote.signature,
            MAX_SIGNATURE_LEN,
        )?,
        pcrs,
    })
}

/// go-tpm-tools `proto/attest.proto` `Attestation` (only the fields used here).
#[derive(Clone, PartialEq, prost::Message)]
struct PbAttestation {
    /// `TPMT_PUBLIC` of the AK.
    #[prost(bytes = "vec", tag = "1")]
    ak_pub: Vec<u8>,
    #[prost(message, repeated, tag = "2")]
    quotes: Vec<PbQuote>,
    /// DER.
    #[prost(bytes = "vec", tag = "6")]
    ak_cert: Vec<u8>,
    /// DER.
    #[prost(bytes = "vec", repeated, tag = "7")]
    intermediate_certs: Vec<Vec<u8>>,
}

/// go-tpm-tools `proto/tpm.proto` `Quote`.
#[derive(Clone, PartialEq, prost::Message)]
struct PbQuote {
    /// `TPMS_ATTEST`.
    #[prost(bytes = "vec", tag = "1")]
    quote: Vec<u8>,
    /// `TPMT_SIGNATURE`.
    #[prost(bytes = "vec", tag = "2")]
    raw_sig: Vec<u8>,
    #[prost(message, optional, tag = "3")]
    pcrs: Option<PbPcrs>,
}

/// go-tpm-tools `proto/tpm.proto` `PCRs`.
#[derive(Clone, PartialEq, prost::Message)]
struct PbPcrs {
    /// `HashAlgo` (TPM algorithm id).
    #[prost(int32, tag = "1")]
    hash: i32,
    #[prost(btree_map = "uint32, bytes", tag = "2")]
    pcrs: BTreeMap<u32, Vec<u8>>,
}

fn from_protobuf(raw: &[u8]) -> Result<Bundle, AttestError> {
    let att = <PbAttestation as prost::Message>::decode(raw)
        .map_err(|_| AttestError::Malformed("not a go-tpm-tools Attestation".into()))?;
    if att.ak_pub.is_empty() || att.quotes.is_empty() {
        return Err(AttestError::Malformed(
            "go-tpm-tools Attestation without ak_pub or quotes".into(),
        ));
    }
    let ak = parse_tpm_public(&att.ak_pub)?;
    // The SHA-256 bank's quote; the others (SHA-1, SHA-384) are not used.
    let quote = att
        .quotes
        .iter()
        .find(|q| q.pcrs.as_ref().is_some_and(|p| p.hash == PB_HASH_SHA256))
        .ok_or_else(|| AttestError::Malformed("no quote over the SHA-256 PCR bank".into()))?;
    let mut pcrs = BTreeMap::new();
    for (i, v) in quote.pcrs.iter().flat_map(|p| p.pcrs.iter()) {
        let i = u8::try_from(*i)
            .ok()
            .filter(|i| *i <= MAX_PCR_INDEX)
            .ok_or_else(|| AttestError::Malformed("PCR index out of range".into()))?;
        let v: [u8; 32] = v
            .as_slice()
            .try_into()
            .map_err(|_| AttestError::Malformed("SHA-256 PCR value is not 32 bytes".into()))?;
        pcrs.insert(i, v);
    }
    let mut chain: Vec<Vec<u8>> = Vec::new();
    if !att.ak_cert.is_empty() {
        chain.push(att.ak_cert);
    }
    chain.extend(att.intermediate_certs);
    Ok(Bundle {
        ak_spki: ak.spki,
        ak_tpm_public: Some(att.ak_pub),
        ak_cert_chain: chain,
        message: quote.quote.clone(),
        signature: quote.raw_sig.clone(),
        pcrs,
    })
}

/// Raw bytes of a binary file stored as itself, as hex text or as base64 text.
fn binary_from_text(evidence: &[u8]) -> Vec<u8> {
    if let Ok(text) = std::str::from_utf8(evidence) {
        let compact: String = text.split_ascii_whitespace().collect();
        if !compact.is_empty()
            && compact.bytes().all(|c| c.is_ascii_hexdigit())
            && let Ok(v) = hex::decode(&compact)
        {
            return v;
        }
        if let Ok(v) = STANDARD.decode(&compact) {
            return v;
        }
    }
    evidence.to_vec()
}

/// Builds the bundle from evidence as stored (see docs/attestation/tpm.md). `extra` are
/// certificate files (PEM, DER, base64): appended to `ak_cert_chain` in order, so when the
/// evidence carries no AK certificate the first one is the AK certificate. TPM evidence needs no
/// collateral. A bundle is returned unchanged.
pub fn bundle_from_inputs(
    evidence: &[u8],
    extra: &[Vec<u8>],
    collateral: Option<&[u8]>,
) -> Result<Vec<u8>, AttestError> {
    if collateral.is_some() {
        return Err(AttestError::Malformed(
            "TPM evidence takes no collateral".into(),
        ));
    }
    if evidence.len() > MAX_INPUT_LEN {
        return Err(AttestError::Malformed("evidence file too large".into()));
    }
    let trimmed = evidence.trim_ascii();
    let mut bundle = if trimmed.first() == Some(&b'{') {
        let value: serde_json::Value = serde_json::from_slice(trimmed)
            .map_err(|_| AttestError::Malformed("evidence is not valid JSON".into()))?;
        if value.get("format").is_some() {
            let bundle = decode(evidence)?;
            if extra.is_empty() {
                return Ok(evidence.to_vec());
            }
            bundle
        } else if value.get("tpm_quote").is_some() {
            let t: TrusteeEvidence = serde_json::from_value(value)
                .map_err(|_| AttestError::Malformed("not Trustee TPM evidence".into()))?;
            from_trustee(t)?
        } else {
            return Err(AttestError::Malformed(
                "JSON is neither a TPM bundle nor Trustee TPM evidence".into(),
            ));
        }
    } else {
        from_protobuf(&binary_from_text(evidence))?
    };
    for file in extra {
        bundle.ak_cert_chain.extend(certs_from_blob(file)?);
    }
    if bundle.ak_cert_chain.len() > MAX_CHAIN_CERTS {
        return Err(AttestError::Malformed("too many certificates".into()));
    }
    encode(&bundle)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Bundle {
        Bundle {
            ak_spki: vec![1, 2, 3],
            ak_tpm_public: Some(vec![4]),
            ak_cert_chain: vec![vec![5, 6]],
            message: vec![7],
            signature: vec![8],
            pcrs: [(0u8, [0u8; 32]), (10, [0xab; 32])].into_iter().collect(),
        }
    }

    #[test]
    fn bundle_round_trips_canonically() {
        let enc = encode(&sample()).unwrap();
        let dec = decode(&enc).unwrap();
        assert_eq!(dec.pcrs, sample().pcrs);
        assert_eq!(encode(&dec).unwrap(), enc);
        // A bundle given to bundle_from_inputs comes back byte for byte.
        assert_eq!(bundle_from_inputs(&enc, &[], None).unwrap(), enc);
    }

    #[test]
    fn decode_rejects_bad_fields() {
        let good = String::from_utf8(encode(&sample()).unwrap()).unwrap();
        for bad in [
            good.replace(FORMAT, "weightvault-tpm-evidence/v0"),
            good.replace("\"10\"", "\"010\""),
            good.replace("\"10\"", "\"32\""),
            good.replace("\"10\"", "\"x\""),
            good.replace(&"ab".repeat(32), &"AB".repeat(32)),
            good.replace(&"ab".repeat(32), &"ab".repeat(31)),
            good.replace("\"format\"", "\"unknown\":1,\"format\""),
            good.replace("\"ak_public\":\"AQID\"", "\"ak_public\":\"\""),
            good.replace("\"ak_public\":\"AQID\"", "\"ak_public\":\"!!\""),
            good[..good.len() / 2].to_string(),
        ] {
            assert!(
                matches!(decode(bad.as_bytes()), Err(AttestError::Malformed(_))),
                "{bad}"
            );
        }
        assert!(matches!(
            decode(&vec![b' '; MAX_BUNDLE_LEN + 1]),
            Err(AttestError::Malformed(_))
        ));
    }

    #[test]
    fn inputs_that_are_nothing_known_are_malformed() {
        for input in [
            &b""[..],
            b"{}",
            b"{\"a\":1}",
            b"\x00\x01\x02garbage",
            b"deadbeef",
            b"{\"tpm_quote\":{}}",
        ] {
            assert!(
                matches!(
                    bundle_from_inputs(input, &[], None),
                    Err(AttestError::Malformed(_))
                ),
                "{input:?}"
            );
        }
        assert!(bundle_from_inputs(b"{}", &[], Some(b"x")).is_err());
        assert!(bundle_from_inputs(&vec![0u8; MAX_INPUT_LEN + 1], &[], None).is_err());
    }
}
