//! The Azure vTPM evidence bundle (the one form `verify` takes) and its construction from the
//! forms the samples are stored in (Trustee's `evidence-v0.json` / `evidence-v1.json`, or the
//! `hcl-report.bin` + `tpm-quote-v1.json` + `vcek.pem` trio).
//!
//! ```json
//! {"format":"weightvault-azure-vtpm-evidence/v1",
//!  "hcl_report":"<base64 of the HCL report>",
//!  "vcek":"<base64 DER VCEK/VLEK>",            // az-snp-vtpm only
//!  "chain":["<base64 DER ASK/ASVK>","<ARK>"],   // optional (AMD roots are pinned)
//!  "td_quote":"<base64 DCAP quote>",            // az-tdx-vtpm only
//!  "collateral":{...dcap-qvl QuoteCollateralV3 JSON...},   // az-tdx-vtpm
//!  "tpm_quote":{"message":"<base64 TPMS_ATTEST>","signature":"<base64 raw RSASSA signature>"},
//!  "pcrs":{"0":"<hex sha256 PCR>", ...}}
//! ```

use std::collections::BTreeMap;

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
use serde::{Deserialize, Serialize};

use super::hcl::{HW_REPORT_LEN, MAX_HCL_LEN};

/// The SNP report fits the HCL's hardware slot.
const _: () = assert!(snp::REPORT_LEN <= HW_REPORT_LEN);

/// A quote as stored: TPMS_ATTEST, raw signature, PCR index → hex value.
type StoredQuote = (Vec<u8>, Vec<u8>, BTreeMap<String, String>);
use crate::attest::{AttestError, snp};

pub const FORMAT: &str = "weightvault-azure-vtpm-evidence/v1";
/// Largest bundle accepted (TDX collateral with Intel's CRLs dominates).
pub const MAX_BUNDLE_LEN: usize = 1024 * 1024 + 64 * 1024;
/// Largest TPMS_ATTEST accepted.
pub const MAX_MESSAGE_LEN: usize = 2048;
/// Largest raw RSA signature (RSA-4096).
pub const MAX_SIGNATURE_LEN: usize = 512;
const MAX_CERT_LEN: usize = 8 * 1024;
const MAX_CHAIN: usize = 4;
const MAX_QUOTE_LEN: usize = 64 * 1024;

#[derive(Serialize, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
struct QuoteJson {
    message: String,
    signature: String,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct BundleJson {
    format: String,
    hcl_report: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    vcek: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    chain: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    td_quote: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    collateral: Option<serde_json::Value>,
    tpm_quote: QuoteJson,
    pcrs: BTreeMap<String, String>,
}

/// A decoded bundle. Nothing in it is trusted yet.
#[derive(Debug, Clone, PartialEq)]
pub struct Bundle {
    pub hcl_report: Vec<u8>,
    pub vcek: Option<Vec<u8>>,
    pub chain: Vec<Vec<u8>>,
    pub td_quote: Option<Vec<u8>>,
    /// dcap-qvl collateral JSON text.
    pub collateral: Option<Vec<u8>>,
    pub message: Vec<u8>,
    pub signature: Vec<u8>,
    /// Index → lowercase hex SHA-256 PCR value, as given (checked by the TPM verifier).
    pub pcrs: BTreeMap<String, String>,
}

fn malformed(d: &str) -> AttestError {
    AttestError::Malformed(d.into())
}

fn b64(field: &str, s: &str, max: usize) -> Result<Vec<u8>, AttestError> {
    if s.len() > max.saturating_mul(4) / 3 + 4 {
        return Err(AttestError::Malformed(format!("{field} is too large")));
    }
    let v = STANDARD
        .decode(s)
        .map_err(|_| AttestError::Malformed(format!("{field} is not base64")))?;
    if v.is_empty() {
        return Err(AttestError::Malformed(format!("{field} is empty")));
    }
    Ok(v)
}

impl Bundle {
    pub fn parse(bytes: &[u8]) -> Result<Bundle, AttestError> {
        if bytes.len() > MAX_BUNDLE_LEN {
            return Err(malformed("azure vtpm bundle too large"));
        }
        let j: BundleJson = serde_json::from_slice(bytes)
            .map_err(|_| malformed("not an azure vtpm evidence bundle (JSON)"))?;
        if j.format != FORMAT {
            return Err(malformed("unknown azure vtpm bundle format"));
        }
        if j.chain.len() > MAX_CHAIN || j.pcrs.len() > 32 {
            return Err(malformed("too many certificates or PCRs"));
        }
        let collateral = match j.collateral {
            None => None,
            Some(v @ serde_json::Value::Object(_)) => {
                Some(serde_json::to_vec(&v).map_err(|_| malformed("collateral does not encode"))?)
            }
            Some(_) => return Err(malformed("collateral is not a JSON object")),
        };
        Ok(Bundle {
            hcl_report: b64("hcl_report", &j.hcl_report, MAX_HCL_LEN)?,
            vcek: j
                .vcek
                .as_deref()
                .map(|s| b64("vcek", s, MAX_CERT_LEN))
                .transpose()?,
            chain: j
                .chain
                .iter()
                .map(|c| b64("chain", c, MAX_CERT_LEN))
                .collect::<Result<_, _>>()?,
            td_quote: j
                .td_quote
                .as_deref()
                .map(|s| b64("td_quote", s, MAX_QUOTE_LEN))
                .transpose()?,
            collateral,
            message: b64("tpm_quote.message", &j.tpm_quote.message, MAX_MESSAGE_LEN)?,
            signature: b64(
                "tpm_quote.signature",
                &j.tpm_quote.signature,
                MAX_SIGNATURE_LEN,
            )?,
            pcrs: j.pcrs,
        })
    }

    pub fn encode(&self) -> Result<Vec<u8>, AttestError> {
        let collateral = self
            .collateral
            .as_deref()
            .map(serde_json::from_slice::<serde_json::Value>)
            .transpose()
            .map_err(|_| malformed("collateral is not JSON"))?;
        serde_json::to_vec(&BundleJson {
            format: FORMAT.into(),
            hcl_report: STANDARD.encode(&self.hcl_report),
            vcek: self.vcek.as_ref().map(|v| STANDARD.encode(v)),
            chain: self.chain.iter().map(|c| STANDARD.encode(c)).collect(),
            td_quote: self.td_quote.as_ref().map(|v| STANDARD.encode(v)),
            collateral,
            tpm_quote: QuoteJson {
                message: STANDARD.encode(&self.message),
                signature: STANDARD.encode(&self.signature),
            },
            pcrs: self.pcrs.clone(),
        })
        .map_err(|_| malformed("bundle does not encode"))
    }
}

/// One stored blob: a JSON byte array, or a string in hex, base64 or URL-safe base64.
fn blob(v: &serde_json::Value, what: &str) -> Result<Vec<u8>, AttestError> {
    match v {
        serde_json::Value::Array(items) => items
            .iter()
            .map(|x| x.as_u64().and_then(|n| u8::try_from(n).ok()))
            .collect::<Option<Vec<u8>>>()
            .ok_or_else(|| AttestError::Malformed(format!("{what} is not a byte array"))),
        serde_json::Value::String(s) => text_blob(s.as_bytes())
            .ok_or_else(|| AttestError::Malformed(format!("{what} is neither hex nor base64"))),
        _ => Err(AttestError::Malformed(format!("{what} has the wrong type"))),
    }
}

fn text_blob(t: &[u8]) -> Option<Vec<u8>> {
    let c: Vec<u8> = t
        .iter()
        .copied()
        .filter(|b| !b.is_ascii_whitespace())
        .collect();
    if c.is_empty() {
        return None;
    }
    if c.len().is_multiple_of(2)
        && c.iter().all(u8::is_ascii_hexdigit)
        && let Ok(v) = hex::decode(&c)
    {
        return Some(v);
    }
    [STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD]
        .iter()
        .find_map(|e| e.decode(&c).ok())
}

/// Certificates: PEM text (as a JSON string too), or DER / base64 of DER.
fn cert_file(input: &[u8]) -> Vec<u8> {
    if input.windows(11).any(|w| w == b"-----BEGIN ") || input.first() == Some(&0x30) {
        return input.to_vec();
    }
    text_blob(input).unwrap_or_else(|| input.to_vec())
}

/// `{message, signature, pcrs}` in Trustee's v0 (byte arrays) or v1 (hex) form.
fn tpm_quote(v: &serde_json::Value) -> Result<StoredQuote, AttestError> {
    let message = blob(
        v.get("message")
            .ok_or_else(|| malformed("quote has no message"))?,
        "quote message",
    )?;
    let signature = blob(
        v.get("signature")
            .ok_or_else(|| malformed("quote has no signature"))?,
        "quote signature",
    )?;
    let signature = strip_tpmt_signature(signature);
    let list = v
        .get("pcrs")
        .and_then(|p| p.as_array())
        .ok_or_else(|| malformed("quote has no pcrs list"))?;
    if list.len() > 32 {
        return Err(malformed("too many PCRs"));
    }
    let mut pcrs = BTreeMap::new();
    for (i, p) in list.iter().enumerate() {
        pcrs.insert(i.to_string(), hex::encode(blob(p, "pcr")?));
    }
    Ok((message, signature, pcrs))
}

/// TPM 2.0 Part 2 §11.3.4 TPMT_SIGNATURE (sigAlg RSASSA 0x0014, hash SHA-256 0x000b, TPM2B):
/// reduced to the bare signature the bundle carries.
fn strip_tpmt_signature(sig: Vec<u8>) -> Vec<u8> {
    if sig.len() > 6 && sig[..4] == [0x00, 0x14, 0x00, 0x0b] {
        let n = usize::from(u16::from_be_bytes([sig[4], sig[5]]));
        if n == sig.len() - 6 {
            return sig[6..].to_vec();
        }
    }
    sig
}

/// Builds the bundle from stored files. `evidence` is one of: a bundle (returned unchanged);
/// Trustee's JSON (`report`/`hcl_report`, `quote`/`tpm_quote`, `vcek`, `td_quote`); or the HCL
/// report itself (raw, hex or base64), in which case `extra` holds the TPM quote JSON (Trustee
/// `tpm-quote-v1.json`), certificate files (VCEK PEM with or without ASK/ARK, DER) and for TDX
/// the raw TD quote. `collateral` is the dcap-qvl collateral JSON (TDX).
pub fn bundle_from_inputs(
    evidence: &[u8],
    extra: &[Vec<u8>],
    collateral: Option<&[u8]>,
) -> Result<Vec<u8>, AttestError> {
    if Bundle::parse(evidence).is_ok() {
        return Ok(evidence.to_vec());
    }
    if evidence.len() > MAX_BUNDLE_LEN
        || extra.len() > 8
        || extra.iter().any(|e| e.len() > MAX_BUNDLE_LEN)
        || collateral.is_some_and(|c| c.len() > MAX_BUNDLE_LEN)
    {
        return Err(malformed("input too large"));
    }
    let hcl;
    let mut quote = None;
    let mut cert_files: Vec<Vec<u8>> = Vec::new();
    let mut td_quote = None;
    let trimmed = evidence.trim_ascii();
    if trimmed.first() == Some(&b'{') {
        let v: serde_json::Value = serde_json::from_slice(trimmed)
            .map_err(|_| malformed("evidence JSON does not parse"))?;
        let h = ["hcl_report", "report"]
            .iter()
            .find_map(|k| v.get(*k))
            .ok_or_else(|| malformed("evidence JSON has no hcl_report"))?;
        hcl = Some(blob(h, "hcl_report")?);
        if let Some(q) = ["tpm_quote", "quote"].iter().find_map(|k| v.get(*k)) {
            quote = Some(tpm_quote(q)?);
        }
        match v.get("vcek") {
            Some(serde_json::Value::String(s)) => cert_files.push(cert_file(s.as_bytes())),
            Some(other @ serde_json::Value::Array(_)) => cert_files.push(blob(other, "vcek")?),
            _ => {}
        }
        if let Some(t) = v.get("td_quote") {
            td_quote = Some(blob(t, "td_quote")?);
        }
    } else if evidence.starts_with(super::hcl::HCL_MAGIC) {
        hcl = Some(evidence.to_vec());
    } else {
        hcl = text_blob(evidence);
    }
    let hcl = hcl.ok_or_else(|| malformed("evidence is not an HCL report"))?;
    for file in extra {
        let t = file.trim_ascii();
        if t.first() == Some(&b'{') {
            let v: serde_json::Value =
                serde_json::from_slice(t).map_err(|_| malformed("extra JSON does not parse"))?;
            quote = Some(tpm_quote(&v)?);
        } else if t.windows(11).any(|w| w == b"-----BEGIN ") {
            cert_files.push(t.to_vec());
        } else if file.first() == Some(&0x30) {
            cert_files.push(file.clone());
        } else if matches!(file.get(..2), Some([4 | 5, 0])) {
            td_quote = Some(file.clone());
        } else {
            return Err(malformed(
                "extra file is neither a TPM quote, certificates nor a TD quote",
            ));
        }
    }
    let (message, signature, pcrs) = quote.ok_or_else(|| malformed("no TPM quote given"))?;
    let (vcek, chain) = if cert_files.is_empty() {
        (None, Vec::new())
    } else {
        let report = hcl
            .get(super::hcl::HEADER_LEN..super::hcl::HEADER_LEN + snp::REPORT_LEN)
            .ok_or_else(|| malformed("HCL report truncated"))?;
        // The SNP module sorts the files into the VCEK and its CA chain.
        let sb = snp::bundle_from_inputs(report, &cert_files, None)?;
        let sb = snp::Bundle::parse(&sb)?;
        (Some(sb.vek), sb.chain)
    };
    let collateral = collateral
        .map(|c| {
            serde_json::from_slice::<serde_json::Value>(c)
                .ok()
                .filter(|v| v.is_object())
                .map(|v| serde_json::to_vec(&v).unwrap_or_default())
                .ok_or_else(|| malformed("collateral is not a JSON object"))
        })
        .transpose()?;
    Bundle {
        hcl_report: hcl,
        vcek,
        chain,
        td_quote,
        collateral,
        message,
        signature,
        pcrs,
    }
    .encode()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_strictness() {
        let b = Bundle {
            hcl_report: vec![1; 10],
            vcek: Some(vec![2; 3]),
            chain: vec![],
            td_quote: None,
            collateral: Some(b"{\"a\":1}".to_vec()),
            message: vec![3; 4],
            signature: vec![4; 5],
            pcrs: [("0".to_string(), "00".repeat(32))].into_iter().collect(),
        };
        let enc = b.encode().unwrap();
        assert_eq!(Bundle::parse(&enc).unwrap(), b);
        assert_eq!(bundle_from_inputs(&enc, &[], None).unwrap(), enc);
        let mut v: serde_json::Value = serde_json::from_slice(&enc).unwrap();
        v["other"] = serde_json::json!(1);
        assert!(Bundle::parse(&serde_json::to_vec(&v).unwrap()).is_err());
        for bad in [
            &b""[..],
            b"{",
            b"null",
            b"[1]",
            &vec![b' '; MAX_BUNDLE_LEN + 1],
        ] {
            assert!(matches!(Bundle::parse(bad), Err(AttestError::Malformed(_))));
            assert!(bundle_from_inputs(bad, &[], None).is_err());
        }
    }

    #[test]
    fn tpmt_signature_is_stripped() {
        let mut s = vec![0x00, 0x14, 0x00, 0x0b, 0x01, 0x00];
        s.extend([7u8; 256]);
        assert_eq!(strip_tpmt_signature(s), vec![7u8; 256]);
        assert_eq!(strip_tpmt_signature(vec![7u8; 256]), vec![7u8; 256]);
    }
}
