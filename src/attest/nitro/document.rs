//! Parsing of the COSE_Sign1 envelope (RFC 9052) and of the attestation document it carries
//! (AWS attestation process §2.2, §3.1, §3.2.2). Nothing here is trusted yet: the chain and the
//! signature are checked by the caller.

use std::collections::BTreeMap;

use ciborium::Value;
use coset::{Algorithm, Header, ProtectedHeader, iana};

use super::malformed;
use crate::attest::AttestError;

/// AWS attestation process §3.1: the payload is `bstr .size (1..16384)`.
pub const MAX_PAYLOAD_LEN: usize = 16 * 1024;
/// A bundle (the whole COSE_Sign1) larger than this is rejected before parsing.
pub const MAX_DOCUMENT_LEN: usize = MAX_PAYLOAD_LEN + 1024;
/// AWS attestation process §2.2: `cert = bytes .size (1..1024)`.
const MAX_CERT_LEN: usize = 1024;
/// AWS attestation process §2.2: `user_data = bytes .size (0..1024)` (also nonce, public_key).
const MAX_USER_DATA_LEN: usize = 1024;
/// Root plus at most six intermediates (webpki's sub-CA limit); AWS issues root + 3.
const MAX_CABUNDLE_LEN: usize = 7;
const MAX_MODULE_ID_LEN: usize = 128;
/// AWS attestation process §2.2: `index = 0..31`.
const MAX_PCRS: usize = 32;
/// SHA-384 PCR values (`digest = "SHA384"`).
const PCR_LEN: usize = 48;
/// RFC 9053 §2.1: an ES384 signature is r || s, 48 bytes each.
const ES384_SIG_LEN: usize = 96;
/// The one protected header AWS emits, `{1: -35}` (alg: ES384), in deterministic encoding.
pub(super) const ES384_PROTECTED: [u8; 4] = [0xa1, 0x01, 0x38, 0x22];
/// RFC 9052 §4.2: tag of a tagged COSE_Sign1.
const COSE_SIGN1_TAG: u64 = 18;

/// One CBOR data item, with nothing after it (RFC 8949 §5.1: a well-formed item).
fn decode_cbor(bytes: &[u8], what: &str) -> Result<Value, AttestError> {
    let mut rest = bytes;
    let value: Value = ciborium::de::from_reader(&mut rest)
        .map_err(|_| malformed(format!("{what} is not well-formed CBOR")))?;
    if !rest.is_empty() {
        return Err(malformed(format!("{what} has trailing bytes")));
    }
    Ok(value)
}

/// A COSE_Sign1 whose layout is checked; nothing in it is trusted yet.
pub(super) struct Envelope {
    pub protected: Vec<u8>,
    pub unprotected: Value,
    pub payload: Vec<u8>,
    pub signature: Vec<u8>,
}

pub(super) fn parse_envelope(bytes: &[u8]) -> Result<Envelope, AttestError> {
    if bytes.len() > MAX_DOCUMENT_LEN {
        return Err(malformed("document too large"));
    }
    // RFC 9052 §4.2: COSE_Sign1 = [protected: bstr, unprotected: header_map, payload: bstr,
    // signature: bstr], untagged as AWS emits it or with tag 18 (AWS attestation process §3.1).
    let items = match decode_cbor(bytes, "document")? {
        Value::Array(items) => items,
        Value::Tag(COSE_SIGN1_TAG, inner) => match *inner {
            Value::Array(items) => items,
            _ => return Err(malformed("tag 18 does not hold a COSE_Sign1 array")),
        },
        _ => return Err(malformed("document is not a COSE_Sign1 array")),
    };
    let [protected, unprotected, payload, signature]: [Value; 4] = items
        .try_into()
        .map_err(|_| malformed("COSE_Sign1 must have 4 elements"))?;
    let (Value::Bytes(protected), Value::Bytes(payload), Value::Bytes(signature)) =
        (protected, payload, signature)
    else {
        return Err(malformed(
            "COSE_Sign1 protected, payload and signature must be byte strings",
        ));
    };
    if payload.is_empty() || payload.len() > MAX_PAYLOAD_LEN {
        return Err(malformed("payload must be 1..=16384 bytes"));
    }
    // RFC 9053 §2.1: ES384 signatures are exactly 96 bytes.
    if signature.len() != ES384_SIG_LEN {
        return Err(malformed("signature is not 96 bytes"));
    }
    Ok(Envelope {
        protected,
        unprotected,
        payload,
        signature,
    })
}

/// RFC 9052 §3 and AWS attestation process §3.1: protected `{1: -35}` only, unprotected `{}`.
pub(super) fn check_headers(env: &Envelope) -> Result<ProtectedHeader, AttestError> {
    let protected = ProtectedHeader::from_cbor_bstr(Value::Bytes(env.protected.clone()))
        .map_err(|_| malformed("protected header is not a COSE header map"))?;
    let rest = Header {
        alg: None,
        ..protected.header.clone()
    };
    if protected.header.alg != Some(Algorithm::Assigned(iana::Algorithm::ES384))
        || !rest.is_empty()
        || env.protected != ES384_PROTECTED
    {
        return Err(malformed(
            "protected header must be exactly {1: -35} (ES384)",
        ));
    }
    if !matches!(&env.unprotected, Value::Map(m) if m.is_empty()) {
        return Err(malformed("unprotected header must be an empty map"));
    }
    Ok(protected)
}

/// The attestation document, syntax-checked (AWS attestation process §3.2.2).
#[derive(Debug)]
pub(super) struct Document {
    pub module_id: String,
    pub digest: String,
    pub timestamp_ms: u64,
    pub pcrs: BTreeMap<u8, Vec<u8>>,
    pub certificate: Vec<u8>,
    /// Empty when the field is absent, null or `[]`; reported as a chain failure.
    pub cabundle: Vec<Vec<u8>>,
    pub public_key: Option<Vec<u8>>,
    pub nonce: Option<Vec<u8>>,
}

const FIELDS: [&str; 9] = [
    "module_id",
    "digest",
    "timestamp",
    "pcrs",
    "certificate",
    "cabundle",
    "public_key",
    "user_data",
    "nonce",
];

fn bytes_field(
    v: Option<Value>,
    name: &str,
    min: usize,
    max: usize,
) -> Result<Option<Vec<u8>>, AttestError> {
    match v {
        None => Ok(None),
        Some(Value::Bytes(b)) if (min..=max).contains(&b.len()) => Ok(Some(b)),
        Some(Value::Bytes(_)) => Err(malformed(format!("{name} must be {min}..={max} bytes"))),
        // AWS attestation process §3.2.2.1: no field content can be null.
        Some(_) => Err(malformed(format!("{name} is not a byte string"))),
    }
}

fn required<T>(v: Option<T>, name: &str) -> Result<T, AttestError> {
    v.ok_or_else(|| malformed(format!("{name} is missing")))
}

pub(super) fn parse_document(payload: &[u8]) -> Result<Document, AttestError> {
    let Value::Map(entries) = decode_cbor(payload, "payload")? else {
        return Err(malformed("payload is not a CBOR map"));
    };
    let mut fields: BTreeMap<&'static str, Value> = BTreeMap::new();
    for (k, v) in entries {
        let Value::Text(k) = k else {
            return Err(malformed("payload key is not text"));
        };
        // AWS attestation process §3.2.2.1: only the allowed fields, each once.
        let name = FIELDS
            .into_iter()
            .find(|f| *f == k)
            .ok_or_else(|| malformed("payload has an unknown field"))?;
        if fields.insert(name, v).is_some() {
            return Err(malformed(format!("payload repeats {name}")));
        }
    }
    // AWS attestation process §3.2.2.2, field by field.
    let module_id = match required(fields.remove("module_id"), "module_id")? {
        Value::Text(s)
            if (1..=MAX_MODULE_ID_LEN).contains(&s.len())
                && s.bytes().all(|b| b.is_ascii_graphic()) =>
        {
            s
        }
        _ => return Err(malformed("module_id must be 1..=128 printable ASCII")),
    };
    let digest = match required(fields.remove("digest"), "digest")? {
        Value::Text(s) if s == "SHA384" => s,
        _ => return Err(malformed("digest must be \"SHA384\"")),
    };
    let timestamp_ms = match required(fields.remove("timestamp"), "timestamp")? {
        Value::Integer(i) => u64::try_from(i)
            .ok()
            .filter(|t| *t > 0)
            .ok_or_else(|| malformed("timestamp must be a positive uint64"))?,
        _ => return Err(malformed("timestamp is not an integer")),
    };
    let pcrs = parse_pcrs(required(fields.remove("pcrs"), "pcrs")?)?;
    let certificate = required(
        bytes_field(fields.remove("certificate"), "certificate", 1, MAX_CERT_LEN)?,
        "certificate",
    )?;
    // A missing, null or empty bundle cannot chain to the root: reported as Chain later.
    let cabundle = match fields.remove("cabundle") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(items)) if items.len() <= MAX_CABUNDLE_LEN => items
            .into_iter()
            .map(|c| match c {
                Value::Bytes(b) if (1..=MAX_CERT_LEN).contains(&b.len()) => Ok(b),
                _ => Err(malformed("cabundle entry must be 1..=1024 bytes")),
            })
            .collect::<Result<_, _>>()?,
        Some(_) => {
            return Err(malformed(
                "cabundle must be an array of at most 7 certificates",
            ));
        }
    };
    let public_key = bytes_field(
        fields.remove("public_key"),
        "public_key",
        1,
        MAX_USER_DATA_LEN,
    )?;
    // The CDDL of §2.2 allows 1024 bytes; §3.2.2.2 says 512, but AWS signs 1024-byte values (N1).
    bytes_field(
        fields.remove("user_data"),
        "user_data",
        0,
        MAX_USER_DATA_LEN,
    )?;
    let nonce = bytes_field(fields.remove("nonce"), "nonce", 0, MAX_USER_DATA_LEN)?;
    Ok(Document {
        module_id,
        digest,
        timestamp_ms,
        pcrs,
        certificate,
        cabundle,
        public_key,
        nonce,
    })
}

/// AWS attestation process §3.2.2.2 `pcrs`: 1..=32 entries, integer index 0..=31, and with
/// digest SHA384 every value is 48 bytes. PCR0–2 must be there (measurement and debug check).
fn parse_pcrs(value: Value) -> Result<BTreeMap<u8, Vec<u8>>, AttestError> {
    let Value::Map(entries) = value else {
        return Err(malformed("pcrs is not a map"));
    };
    if entries.is_empty() || entries.len() > MAX_PCRS {
        return Err(malformed("pcrs must have 1..=32 entries"));
    }
    let mut pcrs = BTreeMap::new();
    for (k, v) in entries {
        let index = match k {
            Value::Integer(i) => u8::try_from(i).ok().filter(|i| usize::from(*i) < MAX_PCRS),
            _ => None,
        }
        .ok_or_else(|| malformed("PCR index must be an integer 0..=31"))?;
        let value = match v {
            Value::Bytes(b) if b.len() == PCR_LEN => b,
            _ => return Err(malformed("PCR value must be 48 bytes")),
        };
        if pcrs.insert(index, value).is_some() {
            return Err(malformed("pcrs repeats an index"));
        }
    }
    if !(0..3).all(|i| pcrs.contains_key(&i)) {
        return Err(malformed("pcrs must include PCR0, PCR1 and PCR2"));
    }
    Ok(pcrs)
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    pub(in crate::attest::nitro) fn encode(v: &Value) -> Vec<u8> {
        let mut out = Vec::new();
        ciborium::ser::into_writer(v, &mut out).unwrap();
        out
    }

    fn text(s: &str) -> Value {
        Value::Text(s.into())
    }

    /// A syntactically valid payload map (not signed, not chained).
    fn payload_fields() -> Vec<(Value, Value)> {
        let pcrs = (0..16)
            .map(|i| {
                (
                    Value::Integer(i.into()),
                    Value::Bytes(vec![i as u8 + 1; 48]),
                )
            })
            .collect();
        vec![
            (text("module_id"), text("i-0123-enc0456")),
            (text("digest"), text("SHA384")),
            (
                text("timestamp"),
                Value::Integer(1_700_000_000_000u64.into()),
            ),
            (text("pcrs"), Value::Map(pcrs)),
            (text("certificate"), Value::Bytes(vec![0x30; 10])),
            (
                text("cabundle"),
                Value::Array(vec![Value::Bytes(vec![0x30; 10])]),
            ),
            (text("public_key"), Value::Bytes(vec![2; 32])),
            (text("user_data"), Value::Bytes(vec![])),
            (text("nonce"), Value::Bytes(vec![1; 32])),
        ]
    }

    fn with(field: &str, value: Option<Value>) -> Vec<u8> {
        let mut fields: Vec<_> = payload_fields()
            .into_iter()
            .filter(|(k, _)| *k != text(field))
            .collect();
        if let Some(v) = value {
            fields.push((text(field), v));
        }
        encode(&Value::Map(fields))
    }

    fn envelope(payload: &[u8]) -> Value {
        Value::Array(vec![
            Value::Bytes(ES384_PROTECTED.to_vec()),
            Value::Map(vec![]),
            Value::Bytes(payload.to_vec()),
            Value::Bytes(vec![7; 96]),
        ])
    }

    /// A well-formed (unsigned, unchained) COSE_Sign1 bundle.
    pub(in crate::attest::nitro) fn sample_bundle() -> Vec<u8> {
        encode(&envelope(&encode(&Value::Map(payload_fields()))))
    }

    pub(in crate::attest::nitro) fn is_malformed<T>(r: Result<T, AttestError>) -> bool {
        matches!(r, Err(AttestError::Malformed(_)))
    }

    #[test]
    fn valid_payload_parses() {
        let doc = parse_document(&encode(&Value::Map(payload_fields()))).unwrap();
        assert_eq!(doc.module_id, "i-0123-enc0456");
        assert_eq!(doc.pcrs.len(), 16);
        assert_eq!(doc.nonce.as_deref(), Some(&[1u8; 32][..]));
        let env = parse_envelope(&encode(&envelope(&with("nonce", None)))).unwrap();
        assert!(check_headers(&env).is_ok());
        assert!(parse_document(&env.payload).unwrap().nonce.is_none());
        // Tag 18 (AWS attestation process §3.1) is accepted too.
        let tagged = Value::Tag(18, Box::new(envelope(&with("nonce", None))));
        assert!(parse_envelope(&encode(&tagged)).is_ok());
    }

    #[test]
    fn truncated_garbage_and_oversized_are_malformed() {
        let good = sample_bundle();
        for cut in 0..good.len() {
            assert!(is_malformed(parse_envelope(&good[..cut])), "cut at {cut}");
        }
        let mut trailing = good.clone();
        trailing.push(0);
        assert!(is_malformed(parse_envelope(&trailing)));
        assert!(is_malformed(parse_envelope(b"\xff\x00garbage")));
        assert!(is_malformed(parse_envelope(&vec![
            0x84;
            MAX_DOCUMENT_LEN + 1
        ])));
        let big_payload = vec![0u8; MAX_PAYLOAD_LEN + 1];
        assert!(is_malformed(parse_envelope(&encode(&envelope(
            &big_payload
        )))));
        // Deep nesting stops at ciborium's recursion limit instead of overflowing the stack.
        let mut deep = vec![0x81u8; 10_000];
        deep.push(0);
        assert!(is_malformed(parse_envelope(&deep)));
    }

    #[test]
    fn envelope_shape_is_enforced() {
        let payload = encode(&Value::Map(payload_fields()));
        let Value::Array(items) = envelope(&payload) else {
            unreachable!()
        };
        let three = Value::Array(items[..3].to_vec());
        assert!(is_malformed(parse_envelope(&encode(&three))));
        let mut text_payload = items.clone();
        text_payload[2] = text("payload");
        assert!(is_malformed(parse_envelope(&encode(&Value::Array(
            text_payload
        )))));
        let mut short_sig = items.clone();
        short_sig[3] = Value::Bytes(vec![1; 64]);
        assert!(is_malformed(parse_envelope(&encode(&Value::Array(
            short_sig
        )))));
        let wrong_tag = Value::Tag(98, Box::new(Value::Array(items.clone())));
        assert!(is_malformed(parse_envelope(&encode(&wrong_tag))));
        for (protected, unprotected) in [
            (vec![0xa1, 0x01, 0x26], Value::Map(vec![])), // ES256
            (vec![0xa0], Value::Map(vec![])),
            (vec![0xa1, 0x01, 0x39, 0x00, 0x22], Value::Map(vec![])), // non-canonical -35
            (ES384_PROTECTED.to_vec(), Value::Null),
            (
                ES384_PROTECTED.to_vec(),
                Value::Map(vec![(Value::Integer(4.into()), Value::Bytes(vec![1]))]),
            ),
        ] {
            let mut v = items.clone();
            v[0] = Value::Bytes(protected);
            v[1] = unprotected;
            let env = parse_envelope(&encode(&Value::Array(v))).unwrap();
            assert!(is_malformed(check_headers(&env)));
        }
    }

    #[test]
    fn document_fields_are_checked_strictly() {
        let bad: Vec<(&str, Option<Value>)> = vec![
            ("module_id", None),
            ("module_id", Some(text(""))),
            ("module_id", Some(text("i-01\nforged"))),
            ("module_id", Some(Value::Bytes(b"i-0".to_vec()))),
            ("digest", Some(text("SHA256"))),
            ("digest", None),
            ("timestamp", Some(Value::Integer(0.into()))),
            ("timestamp", Some(Value::Integer((-5).into()))),
            ("timestamp", Some(text("1700000000000"))),
            ("timestamp", Some(Value::Float(1.7e12))),
            ("pcrs", Some(Value::Map(vec![]))),
            ("pcrs", Some(Value::Array(vec![]))),
            ("pcrs", None),
            ("certificate", Some(Value::Bytes(vec![]))),
            ("certificate", Some(Value::Bytes(vec![0x30; 1025]))),
            ("certificate", Some(Value::Null)),
            ("certificate", None),
            ("cabundle", Some(Value::Array(vec![Value::Bytes(vec![])]))),
            (
                "cabundle",
                Some(Value::Array(vec![Value::Bytes(vec![1]); 8])),
            ),
            ("cabundle", Some(Value::Bytes(vec![1]))),
            ("public_key", Some(Value::Bytes(vec![]))),
            ("public_key", Some(Value::Null)),
            ("user_data", Some(Value::Bytes(vec![0; 1025]))),
            ("nonce", Some(Value::Bytes(vec![0; 1025]))),
            ("nonce", Some(Value::Null)),
            ("unexpected", Some(Value::Bytes(vec![]))),
        ];
        for (field, value) in bad {
            let r = parse_document(&with(field, value.clone()));
            assert!(is_malformed(r), "{field} = {value:?}");
        }
        let pcr_maps = [
            vec![(Value::Integer(32.into()), Value::Bytes(vec![1; 48]))],
            vec![(Value::Integer((-1).into()), Value::Bytes(vec![1; 48]))],
            vec![(text("0"), Value::Bytes(vec![1; 48]))],
            (0..3)
                .map(|i| (Value::Integer(i.into()), Value::Bytes(vec![1; 32])))
                .collect(),
            // PCR2 missing.
            (0..2)
                .map(|i| (Value::Integer(i.into()), Value::Bytes(vec![1; 48])))
                .collect(),
            (0..33)
                .map(|i| (Value::Integer(i.into()), Value::Bytes(vec![1; 48])))
                .collect(),
            vec![
                (Value::Integer(0.into()), Value::Bytes(vec![1; 48])),
                (Value::Integer(1.into()), Value::Bytes(vec![1; 48])),
                (Value::Integer(2.into()), Value::Bytes(vec![1; 48])),
                (Value::Integer(2.into()), Value::Bytes(vec![2; 48])),
            ],
        ];
        for pcrs in pcr_maps {
            assert!(is_malformed(parse_document(&with(
                "pcrs",
                Some(Value::Map(pcrs))
            ))));
        }
        let mut dup = payload_fields();
        dup.push((text("nonce"), Value::Bytes(vec![3; 32])));
        assert!(is_malformed(parse_document(&encode(&Value::Map(dup)))));
        let mut int_key = payload_fields();
        int_key.push((Value::Integer(1.into()), Value::Bytes(vec![])));
        assert!(is_malformed(parse_document(&encode(&Value::Map(int_key)))));
        assert!(is_malformed(parse_document(&encode(&Value::Array(vec![])))));
        // A null or missing bundle parses and is reported by the chain check instead.
        for v in [None, Some(Value::Null), Some(Value::Array(vec![]))] {
            assert!(
                parse_document(&with("cabundle", v))
                    .unwrap()
                    .cabundle
                    .is_empty()
            );
        }
    }
}
