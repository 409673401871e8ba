//! The Azure HCL (paravisor) attestation report: a 32-byte header, the hardware report (SEV-SNP
//! ATTESTATION_REPORT or TDX TDREPORT, in a fixed 1184-byte slot), then the IGVM "runtime claims"
//! request data whose JSON (`var JSON`) carries the vTPM attestation key. Layout as produced by
//! the Azure HCL and parsed by Microsoft's `az-cvm-vtpm` crate (`hcl` module) and Trustee.
//!
//! ```text
//! 0x00 u32 signature  "HCLA"
//! 0x04 u32 version    1 (SNP) / 2 (TDX)
//! 0x08 u32 report_size = 0x20 + 1184 + request data size
//! 0x0c u32 request_type
//! 0x10 u32 status     0
//! 0x14 12 bytes reserved
//! 0x20 1184 bytes hardware report (SNP report, or 1024-byte TDREPORT + zero padding)
//! 0x4c0 IGVM_REQUEST_DATA: u32 data_size, u32 version, u32 report_type (2 SNP, 4 TDX),
//!       u32 hash_type (1 SHA-256), u32 variable_data_size, variable_data (JSON)
//! ```

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

use crate::attest::AttestError;

/// "HCLA" read as a little-endian u32.
pub const HCL_MAGIC: &[u8; 4] = b"HCLA";
pub const HEADER_LEN: usize = 0x20;
/// Fixed size of the hardware report slot.
pub const HW_REPORT_LEN: usize = 1184;
/// Offset of the IGVM request data.
pub const REQUEST_OFFSET: usize = HEADER_LEN + HW_REPORT_LEN;
pub const REQUEST_HEADER_LEN: usize = 20;
/// The HCL report is 2600 bytes on current Azure CVMs; larger input is refused.
pub const MAX_HCL_LEN: usize = 8 * 1024;
/// IGVM report type of an SEV-SNP hardware report.
pub const REPORT_TYPE_SNP: u32 = 2;
/// IGVM report type of a TDX hardware report.
pub const REPORT_TYPE_TDX: u32 = 4;
/// IGVM hash type SHA-256: REPORT_DATA[0..32] = SHA-256(var JSON), the rest zero.
pub const HASH_TYPE_SHA256: u32 = 1;
/// Size of a TDREPORT_STRUCT (Intel TDX Module ABI spec, 348551, TDREPORT_STRUCT).
pub const TDREPORT_LEN: usize = 1024;
/// Offset of REPORTDATA inside REPORTMACSTRUCT (348551, REPORTMACSTRUCT).
const TDREPORT_REPORT_DATA: usize = 128;
/// Smallest and largest accepted RSA AK modulus, bits.
const MIN_RSA_BITS: usize = 2048;
const MAX_RSA_BITS: usize = 4096;

fn malformed(d: &str) -> AttestError {
    AttestError::Malformed(d.into())
}

fn u32_at(b: &[u8], off: usize) -> Result<u32, AttestError> {
    b.get(off..off + 4)
        .and_then(|s| <[u8; 4]>::try_from(s).ok())
        .map(u32::from_le_bytes)
        .ok_or_else(|| malformed("HCL report truncated"))
}

/// A parsed HCL report. Nothing in it is trusted until the hardware report verifies.
#[derive(Debug, Clone)]
pub struct HclReport<'a> {
    pub header_version: u32,
    pub report_type: u32,
    /// The whole 1184-byte hardware slot.
    pub hw_report: &'a [u8],
    /// The variable data (UTF-8 JSON), exactly as hashed into the hardware report data.
    pub var_json: &'a [u8],
}

impl<'a> HclReport<'a> {
    pub fn parse(b: &'a [u8]) -> Result<Self, AttestError> {
        if b.len() > MAX_HCL_LEN {
            return Err(malformed("HCL report too large"));
        }
        if b.len() < REQUEST_OFFSET + REQUEST_HEADER_LEN {
            return Err(malformed("HCL report truncated"));
        }
        if &b[..4] != HCL_MAGIC {
            return Err(malformed("not an HCL report (magic)"));
        }
        let header_version = u32_at(b, 4)?;
        let report_size = u32_at(b, 8)? as usize;
        let status = u32_at(b, 0x10)?;
        if status != 0 {
            return Err(malformed("HCL report status is not success"));
        }
        let data_size = u32_at(b, REQUEST_OFFSET)? as usize;
        let version = u32_at(b, REQUEST_OFFSET + 4)?;
        let report_type = u32_at(b, REQUEST_OFFSET + 8)?;
        let hash_type = u32_at(b, REQUEST_OFFSET + 12)?;
        let var_size = u32_at(b, REQUEST_OFFSET + 16)? as usize;
        if version != 1 {
            return Err(malformed("unknown IGVM request data version"));
        }
        if report_type != REPORT_TYPE_SNP && report_type != REPORT_TYPE_TDX {
            return Err(malformed("unknown IGVM report type"));
        }
        // Only SHA-256 is accepted: the binding below hashes with it.
        if hash_type != HASH_TYPE_SHA256 {
            return Err(malformed("IGVM hash type is not SHA-256"));
        }
        if data_size != REQUEST_HEADER_LEN.saturating_add(var_size)
            || report_size != REQUEST_OFFSET.saturating_add(data_size)
        {
            return Err(malformed("HCL report sizes are inconsistent"));
        }
        let start = REQUEST_OFFSET + REQUEST_HEADER_LEN;
        let var_json = b
            .get(start..start.saturating_add(var_size))
            .ok_or_else(|| malformed("HCL variable data truncated"))?;
        // Nothing may hide after the declared data: the padding is not covered by any hash.
        if b[report_size..].iter().any(|x| *x != 0) {
            return Err(malformed("non-zero bytes after the HCL report"));
        }
        Ok(Self {
            header_version,
            report_type,
            hw_report: &b[HEADER_LEN..REQUEST_OFFSET],
            var_json,
        })
    }

    /// REPORTDATA of the TDREPORT in the hardware slot (not signed: the quote is what counts).
    pub fn tdreport_report_data(&self) -> Result<&'a [u8], AttestError> {
        if self.hw_report[TDREPORT_LEN..].iter().any(|x| *x != 0) {
            return Err(malformed("non-zero bytes after the TDREPORT"));
        }
        Ok(&self.hw_report[TDREPORT_REPORT_DATA..TDREPORT_REPORT_DATA + 64])
    }
}

/// What the vault reads from the var JSON.
#[derive(Debug, Clone)]
pub struct VarData {
    /// DER SubjectPublicKeyInfo of the `HCLAkPub` RSA key.
    pub ak_spki: Vec<u8>,
    /// `vm-configuration` scalar members (lowercased names), as strings.
    pub vm_configuration: Vec<(String, String)>,
    /// `user-data`, when a string.
    pub user_data: Option<String>,
}

fn der_len(out: &mut Vec<u8>, len: usize) {
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes = len.to_be_bytes();
        let skip = bytes.iter().take_while(|b| **b == 0).count();
        out.push(0x80 | (bytes.len() - skip) as u8);
        out.extend_from_slice(&bytes[skip..]);
    }
}

fn der(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    der_len(&mut out, content.len());
    out.extend_from_slice(content);
    out
}

/// An unsigned big-endian integer as DER INTEGER (X.690 §8.3): minimal, positive.
fn der_uint(v: &[u8]) -> Vec<u8> {
    let v = &v[v.iter().take_while(|b| **b == 0).count()..];
    let mut c = Vec::with_capacity(v.len() + 1);
    if v.first().is_none_or(|b| b & 0x80 != 0) {
        c.push(0);
    }
    c.extend_from_slice(v);
    der(0x02, &c)
}

/// RFC 8017 Appendix A.1.1 RSAPublicKey inside an RFC 5280 §4.1.2.7 SubjectPublicKeyInfo with
/// the rsaEncryption algorithm (RFC 3279 §2.3.1, parameters NULL).
pub fn rsa_spki(n: &[u8], e: &[u8]) -> Vec<u8> {
    let mut rsa = der_uint(n);
    rsa.extend(der_uint(e));
    let rsa = der(0x30, &rsa);
    let mut bits = vec![0u8];
    bits.extend(rsa);
    let alg = der(
        0x30,
        &[
            0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01, 0x05, 0x00,
        ],
    );
    let mut spki = alg;
    spki.extend(der(0x03, &bits));
    der(0x30, &spki)
}

fn jwk_b64(key: &serde_json::Value, field: &str) -> Result<Vec<u8>, AttestError> {
    let s = key
        .get(field)
        .and_then(|v| v.as_str())
        .ok_or_else(|| AttestError::Malformed(format!("HCLAkPub has no {field}")))?;
    // RFC 7518 §6.3.1: n and e are base64url without padding.
    URL_SAFE_NO_PAD
        .decode(s)
        .map_err(|_| AttestError::Malformed(format!("HCLAkPub {field} is not base64url")))
}

/// Reads the var JSON: exactly one key with `kid` "HCLAkPub", an RSA JWK (RFC 7517/7518).
pub fn parse_var_json(var: &[u8]) -> Result<VarData, AttestError> {
    let v: serde_json::Value =
        serde_json::from_slice(var).map_err(|_| malformed("HCL variable data is not JSON"))?;
    let keys = v
        .get("keys")
        .and_then(|k| k.as_array())
        .ok_or_else(|| malformed("HCL variable data has no keys"))?;
    let mut aks = keys
        .iter()
        .filter(|k| k.get("kid").and_then(|x| x.as_str()) == Some("HCLAkPub"));
    let (Some(ak), None) = (aks.next(), aks.next()) else {
        return Err(malformed("need exactly one HCLAkPub key"));
    };
    if ak.get("kty").and_then(|x| x.as_str()) != Some("RSA") {
        return Err(malformed("HCLAkPub is not an RSA key"));
    }
    let n = jwk_b64(ak, "n")?;
    let e = jwk_b64(ak, "e")?;
    let n_trim = &n[n.iter().take_while(|b| **b == 0).count()..];
    let bits = n_trim.len() * 8;
    if !(MIN_RSA_BITS..=MAX_RSA_BITS).contains(&bits) || e.is_empty() || e.len() > 8 {
        return Err(malformed("HCLAkPub RSA key size not accepted"));
    }
    let mut vm_configuration = Vec::new();
    if let Some(cfg) = v.get("vm-configuration").and_then(|c| c.as_object()) {
        for (k, val) in cfg.iter().take(32) {
            let s = match val {
                serde_json::Value::Bool(b) => b.to_string(),
                serde_json::Value::String(s) => s.chars().take(128).collect(),
                serde_json::Value::Number(n) => n.to_string(),
                _ => continue,
            };
            let key: String = k.chars().take(64).collect::<String>().to_ascii_lowercase();
            vm_configuration.push((key, s));
        }
    }
    let user_data = v
        .get("user-data")
        .and_then(|u| u.as_str())
        .map(|s| s.chars().take(256).collect::<String>().to_ascii_lowercase());
    Ok(VarData {
        ak_spki: rsa_spki(n_trim, &e),
        vm_configuration,
        user_data,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn minimal(var: &[u8], report_type: u32) -> Vec<u8> {
        let mut b = vec![0u8; REQUEST_OFFSET];
        b[..4].copy_from_slice(HCL_MAGIC);
        b[4..8].copy_from_slice(&1u32.to_le_bytes());
        let data = REQUEST_HEADER_LEN + var.len();
        b[8..12].copy_from_slice(&((REQUEST_OFFSET + data) as u32).to_le_bytes());
        for v in [data as u32, 1, report_type, 1, var.len() as u32] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        b.extend_from_slice(var);
        b.resize(2600, 0);
        b
    }

    #[test]
    fn parses_minimal_and_rejects_edges() {
        let ok = minimal(b"{}", REPORT_TYPE_SNP);
        let r = HclReport::parse(&ok).unwrap();
        assert_eq!(r.var_json, b"{}");
        assert_eq!(r.hw_report.len(), HW_REPORT_LEN);
        let mut bad_magic = ok.clone();
        bad_magic[0] = b'X';
        let mut bad_hash = ok.clone();
        bad_hash[REQUEST_OFFSET + 12] = 2;
        let mut bad_size = ok.clone();
        bad_size[REQUEST_OFFSET + 16] = 0xff;
        let mut trailing = ok.clone();
        trailing[2599] = 1;
        let mut bad_type = ok.clone();
        bad_type[REQUEST_OFFSET + 8] = 3;
        let big = vec![0u8; MAX_HCL_LEN + 1];
        for input in [
            &b""[..],
            &ok[..100],
            &ok[..REQUEST_OFFSET + 10],
            &bad_magic,
            &bad_hash,
            &bad_size,
            &trailing,
            &bad_type,
            &big,
        ] {
            assert!(matches!(
                HclReport::parse(input),
                Err(AttestError::Malformed(_))
            ));
        }
    }

    #[test]
    fn var_json_needs_one_rsa_ak() {
        let n = URL_SAFE_NO_PAD.encode([0xc5u8; 256]);
        let good = format!(r#"{{"keys":[{{"kid":"HCLAkPub","kty":"RSA","e":"AQAB","n":"{n}"}}]}}"#);
        let d = parse_var_json(good.as_bytes()).unwrap();
        // A valid SPKI for aws-lc-rs.
        assert!(
            aws_lc_rs::signature::ParsedPublicKey::new(
                &aws_lc_rs::signature::RSA_PKCS1_2048_8192_SHA256,
                &d.ak_spki
            )
            .is_ok()
        );
        let two = format!(
            r#"{{"keys":[{{"kid":"HCLAkPub","kty":"RSA","e":"AQAB","n":"{n}"}},{{"kid":"HCLAkPub","kty":"RSA","e":"AQAB","n":"{n}"}}]}}"#
        );
        let small = r#"{"keys":[{"kid":"HCLAkPub","kty":"RSA","e":"AQAB","n":"AQAB"}]}"#;
        let ec = r#"{"keys":[{"kid":"HCLAkPub","kty":"EC","e":"AQAB","n":"AQAB"}]}"#;
        for bad in [
            &b"{}"[..],
            b"[]",
            b"\xff",
            two.as_bytes(),
            small.as_bytes(),
            ec.as_bytes(),
        ] {
            assert!(matches!(
                parse_var_json(bad),
                Err(AttestError::Malformed(_))
            ));
        }
    }
}
