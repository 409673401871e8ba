//! AWS Nitro Enclaves attestation documents (docs/attestation/nitro.md).
//!
//! Evidence is the raw COSE_Sign1 (RFC 9052 §4.2) the Nitro Secure Module returns: an ES384
//! signature by a per-document leaf certificate over a CBOR attestation document that carries its
//! own CA bundle. The chain must start at the pinned AWS Nitro Enclaves Root-G1 (or an operator's
//! override roots); nothing is fetched. References below are to AWS's "Nitro Enclaves Attestation
//! Process" (aws-nitro-enclaves-nsm-api `docs/attestation_process.md`, cited as "AWS attestation
//! process §x").
//!
//! Check order (the first failure is reported; everything is checked before acceptance):
//! envelope and document syntax → certificate chain at the document time and at `now_ms` →
//! COSE headers and the ES384 signature → debug PCRs → nonce/key binding → freshness.
//! The chain comes first so a document that does not come from AWS is reported as such.

use std::collections::BTreeMap;
use std::sync::OnceLock;
use std::time::Duration;

use aws_lc_rs::digest;
use aws_lc_rs::signature::{ECDSA_P384_SHA384_FIXED, UnparsedPublicKey};
use base64::Engine;
use base64::alphabet;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use ciborium::Value;
use coset::{Algorithm, Header, ProtectedHeader, SignatureContext, iana, sig_structure_data};
use rustls::pki_types::{CertificateDer, TrustAnchor, UnixTime};
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;
use webpki::{EndEntityCert, ExtendedKeyUsageValidator, KeyPurposeIdIter};
use x509_parser::certificate::X509Certificate;
use x509_parser::oid_registry::{OID_KEY_TYPE_EC_PUBLIC_KEY, OID_NIST_EC_P384};
use x509_parser::time::ASN1Time;

use super::{
    AttestError, AttestationVerified, Claims, NODE_KEY_LEN, NONCE_LEN, REPORT_DATA_DOMAIN, TeeKind,
    Verifier,
};
use crate::time::UnixMs;

/// AWS Nitro Enclaves Root-G1 (DER of `root.pem` in AWS_NitroEnclaves_Root-G1.zip, zip SHA-256
/// 8cf60e2b…faff7c as AWS publishes it), valid 2019-10-28 → 2049-10-28.
pub const AWS_NITRO_ROOT_G1_DER: &[u8] =
    include_bytes!("roots/nitro/aws_nitro_enclaves_root_g1.der");
/// SHA-256 of [`AWS_NITRO_ROOT_G1_DER`] (vectors/attest/INDEX.md, trust anchors).
pub const AWS_NITRO_ROOT_G1_SHA256: &str =
    "641a0321a3e244efe456463195d606317ed7cdcc3c1756e09893f3c68f79bb5b";

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
const ES384_PROTECTED: [u8; 4] = [0xa1, 0x01, 0x38, 0x22];
/// RFC 9052 §4.2: tag of a tagged COSE_Sign1.
const COSE_SIGN1_TAG: u64 = 18;
/// Tolerated clock skew between the Nitro hypervisor and the vault.
pub const MAX_SKEW_MS: u64 = 60_000;
/// Default maximum age of a document.
pub const DEFAULT_MAX_AGE_MS: u64 = 5 * 60_000;
/// Upper bound on `max_age_ms`: signing certificates live about three hours.
pub const MAX_MAX_AGE_MS: u64 = 60 * 60_000;
/// Inputs to [`bundle_from_inputs`] larger than this are rejected (base64 of a maximal document).
const MAX_INPUT_LEN: usize = 4 * MAX_DOCUMENT_LEN;

/// What a Nitro document must satisfy beyond signature, chain and binding.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NitroPolicy {
    /// Maximum age of the document `timestamp` relative to the verification time (1..=1 h).
    pub max_age_ms: u64,
    /// PEM certificates that replace the pinned AWS Nitro Enclaves Root-G1. Empty: the pinned
    /// root only. `cabundle[0]` of a document must equal one of them byte for byte.
    pub roots_pem: Vec<String>,
    /// Require `nonce` and `public_key` to be exactly 32 bytes, as the weightvault protocol sends
    /// them. Only tests on third-party documents turn this off.
    pub require_protocol_field_sizes: bool,
}

impl Default for NitroPolicy {
    fn default() -> Self {
        Self {
            max_age_ms: DEFAULT_MAX_AGE_MS,
            roots_pem: Vec::new(),
            require_protocol_field_sizes: true,
        }
    }
}

struct Root {
    der: Vec<u8>,
    anchor: TrustAnchor<'static>,
}

/// Verifies Nitro attestation documents against pinned roots parsed once at construction.
pub struct NitroVerifier {
    roots: Vec<Root>,
    policy: NitroPolicy,
}

impl std::fmt::Debug for NitroVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NitroVerifier")
            .field("roots", &self.roots.len())
            .field("policy", &self.policy)
            .finish()
    }
}

fn policy_error(rule: &'static str, detail: impl Into<String>) -> AttestError {
    AttestError::Policy {
        rule,
        detail: detail.into(),
    }
}

impl NitroVerifier {
    pub fn new(policy: NitroPolicy) -> Result<Self, AttestError> {
        if policy.max_age_ms == 0 || policy.max_age_ms > MAX_MAX_AGE_MS {
            return Err(policy_error(
                "nitro.max_age_ms",
                format!("must be 1..={MAX_MAX_AGE_MS}"),
            ));
        }
        let ders = if policy.roots_pem.is_empty() {
            vec![AWS_NITRO_ROOT_G1_DER.to_vec()]
        } else {
            policy
                .roots_pem
                .iter()
                .map(|pem| root_der_from_pem(pem))
                .collect::<Result<Vec<_>, _>>()?
        };
        let roots = ders
            .into_iter()
            .map(|der| {
                let anchor =
                    webpki::anchor_from_trusted_cert(&CertificateDer::from(der.as_slice()))
                        .map_err(|e| policy_error("nitro.roots_pem", format!("root: {e}")))?
                        .to_owned();
                Ok(Root { der, anchor })
            })
            .collect::<Result<Vec<_>, AttestError>>()?;
        Ok(Self { roots, policy })
    }

    pub fn policy(&self) -> &NitroPolicy {
        &self.policy
    }
}

/// One PEM `CERTIFICATE` holding a self-issued CA certificate.
fn root_der_from_pem(pem: &str) -> Result<Vec<u8>, AttestError> {
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
    Ok(pem.contents)
}

fn malformed(detail: impl Into<String>) -> AttestError {
    AttestError::Malformed(detail.into())
}

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
struct Envelope {
    protected: Vec<u8>,
    unprotected: Value,
    payload: Vec<u8>,
    signature: Vec<u8>,
}

fn parse_envelope(bytes: &[u8]) -> Result<Envelope, AttestError> {
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

/// The attestation document, syntax-checked (AWS attestation process §3.2.2).
#[derive(Debug)]
struct Document {
    module_id: String,
    digest: String,
    timestamp_ms: u64,
    pcrs: BTreeMap<u8, Vec<u8>>,
    certificate: Vec<u8>,
    /// Empty when the field is absent, null or `[]`; reported as a chain failure.
    cabundle: Vec<Vec<u8>>,
    public_key: Option<Vec<u8>>,
    nonce: Option<Vec<u8>>,
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

fn parse_document(payload: &[u8]) -> Result<Document, AttestError> {
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
    let Value::Map(pcr_entries) = required(fields.remove("pcrs"), "pcrs")? else {
        return Err(malformed("pcrs is not a map"));
    };
    if pcr_entries.is_empty() || pcr_entries.len() > MAX_PCRS {
        return Err(malformed("pcrs must have 1..=32 entries"));
    }
    let mut pcrs = BTreeMap::new();
    for (k, v) in pcr_entries {
        let index = match k {
            Value::Integer(i) => u8::try_from(i).ok().filter(|i| usize::from(*i) < MAX_PCRS),
            _ => None,
        }
        .ok_or_else(|| malformed("PCR index must be an integer 0..=31"))?;
        // digest = "SHA384": every register is 48 bytes.
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

fn parse_cert(der: &[u8]) -> Result<X509Certificate<'_>, AttestError> {
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

/// webpki checks EKUs through this hook; the leaf profile check below requires there be none.
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

impl NitroVerifier {
    /// AWS attestation process §3.2.3–§3.2.4: the chain from the pinned root through the bundle
    /// to the leaf, and the leaf's P-384 public key (uncompressed point).
    fn verify_chain(&self, doc: &Document, now_ms: UnixMs) -> Result<Vec<u8>, AttestError> {
        // §3.2.3: cabundle = [ROOT_CERT, INTERM_1, ..., INTERM_N].
        let Some((root_der, intermediates)) = doc.cabundle.split_first() else {
            return Err(AttestError::Chain(
                "document has no CA bundle, so no path to the AWS root".into(),
            ));
        };
        // Pinning: the bundle's root must be one of ours, byte for byte.
        let root = self
            .roots
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
        let used: Vec<CertificateDer<'_>> =
            path.intermediate_certificates().map(|c| c.der()).collect();
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
        let now = asn1_time(now_ms)?;
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
            check_valid_now(&cert, now)?;
        }
        check_valid_now(&parse_cert(root_der)?, now)?;
        let leaf = parse_cert(&doc.certificate)?;
        check_valid_now(&leaf, now)?;
        leaf_p384_point(&leaf)
    }
}

/// Stricter than AWS's §3.2.3.1: certificates must also be valid when the vault verifies.
fn check_valid_now(cert: &X509Certificate<'_>, now: ASN1Time) -> Result<(), AttestError> {
    if cert.validity().is_valid_at(now) {
        Ok(())
    } else {
        Err(AttestError::Expired(
            "certificate not valid at the verification time".into(),
        ))
    }
}

/// §3.2.3.3: the signing certificate is an end entity with digitalSignature and a P-384 key.
fn leaf_p384_point(leaf: &X509Certificate<'_>) -> Result<Vec<u8>, AttestError> {
    let chain = |d: &str| AttestError::Chain(format!("leaf certificate: {d}"));
    if matches!(leaf.basic_constraints(), Ok(Some(bc)) if bc.value.ca)
        || leaf.basic_constraints().is_err()
    {
        return Err(chain("is a CA"));
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

/// RFC 9052 §3 and AWS attestation process §3.1: protected `{1: -35}` only, unprotected `{}`.
fn check_headers(env: &Envelope) -> Result<ProtectedHeader, AttestError> {
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

/// `SHA-512("weightvault/attest/v1" || nonce || public_key)` over the document's own fields:
/// what `expected_report_data` must equal for a Nitro document.
pub fn report_data_for_fields(nonce: &[u8], public_key: &[u8]) -> [u8; 64] {
    let mut ctx = digest::Context::new(&digest::SHA512);
    ctx.update(REPORT_DATA_DOMAIN);
    ctx.update(nonce);
    ctx.update(public_key);
    let mut out = [0u8; 64];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

impl Verifier for NitroVerifier {
    fn tee(&self) -> TeeKind {
        TeeKind::Nitro
    }

    fn verify(
        &self,
        evidence: &[u8],
        expected_report_data: &[u8; 64],
        now_ms: UnixMs,
    ) -> Result<AttestationVerified, AttestError> {
        let env = parse_envelope(evidence)?;
        let doc = parse_document(&env.payload)?;
        let leaf_point = self.verify_chain(&doc, now_ms)?;
        let protected = check_headers(&env)?;
        // RFC 9052 §4.4: Sig_structure = ["Signature1", protected, external_aad = h'', payload];
        // AWS attestation process §3.2.1: verified with the leaf certificate's key.
        let tbs = sig_structure_data(
            SignatureContext::CoseSign1,
            protected,
            None,
            &[],
            &env.payload,
        );
        UnparsedPublicKey::new(&ECDSA_P384_SHA384_FIXED, &leaf_point)
            .verify(&tbs, &env.signature)
            .map_err(|_| AttestError::BadSignature)?;
        // AWS Nitro Enclaves User Guide, "nitro-cli run-enclave --debug-mode": a debug enclave's
        // attestation documents carry all-zero PCRs 0–2. A zero in any of them is refused.
        if (0..3).any(|i| doc.pcrs.get(&i).is_none_or(|p| p.iter().all(|b| *b == 0))) {
            return Err(AttestError::DebugMode);
        }
        // Binding (DESIGN.md boot step 2): the enclave put the vault's nonce and its node key in
        // the signed `nonce` and `public_key` fields.
        let (Some(nonce), Some(public_key)) = (&doc.nonce, &doc.public_key) else {
            return Err(AttestError::BindingMismatch);
        };
        if self.policy.require_protocol_field_sizes
            && (nonce.len() != NONCE_LEN || public_key.len() != NODE_KEY_LEN)
        {
            return Err(AttestError::BindingMismatch);
        }
        let bound = report_data_for_fields(nonce, public_key);
        if !bool::from(bound.as_slice().ct_eq(expected_report_data.as_slice())) {
            return Err(AttestError::BindingMismatch);
        }
        // Freshness: AWS attestation process §2.2, `timestamp` is the creation time in ms.
        if doc.timestamp_ms > now_ms.saturating_add(MAX_SKEW_MS) {
            return Err(AttestError::FromFuture {
                ahead_ms: doc.timestamp_ms - now_ms,
            });
        }
        let age_ms = now_ms.saturating_sub(doc.timestamp_ms);
        if age_ms > self.policy.max_age_ms {
            return Err(AttestError::Stale {
                age_ms,
                max_ms: self.policy.max_age_ms,
            });
        }
        let mut details = BTreeMap::new();
        for i in [0u8, 1, 2, 3, 4, 8] {
            if let Some(v) = doc.pcrs.get(&i) {
                details.insert(format!("pcr{i}"), hex::encode(v));
            }
        }
        details.insert("module_id".into(), doc.module_id.clone());
        details.insert("digest".into(), doc.digest.clone());
        let measurement = details.get("pcr0").cloned().unwrap_or_default();
        let claims = Claims {
            tee: TeeKind::Nitro,
            measurement,
            instance_id: doc.module_id,
            debug: false,
            evidence_time_ms: doc.timestamp_ms,
            simulated: false,
            details,
        };
        Ok(AttestationVerified::new(claims, evidence))
    }
}

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

/// Fuzz entry point: every parser on arbitrary bytes; results are ignored, panics are bugs.
pub fn fuzz_parse(data: &[u8]) {
    static VERIFIER: OnceLock<Option<NitroVerifier>> = OnceLock::new();
    let _ = bundle_from_inputs(data, &[], None);
    let _ = parse_document(data);
    if let Ok(env) = parse_envelope(data) {
        let _ = check_headers(&env);
        if let Ok(doc) = parse_document(&env.payload) {
            for der in doc.cabundle.iter().chain([&doc.certificate]) {
                if let Ok(cert) = parse_cert(der) {
                    let _ = leaf_p384_point(&cert);
                }
            }
        }
    }
    if let Some(v) = VERIFIER.get_or_init(|| NitroVerifier::new(NitroPolicy::default()).ok()) {
        let _ = v.verify(data, &[0u8; 64], 1_725_719_859_545);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encode(v: &Value) -> Vec<u8> {
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

    fn is_malformed<T>(r: Result<T, AttestError>) -> bool {
        matches!(r, Err(AttestError::Malformed(_)))
    }

    #[test]
    fn pinned_root_is_aws_nitro_root_g1() {
        let d = digest::digest(&digest::SHA256, AWS_NITRO_ROOT_G1_DER);
        assert_eq!(hex::encode(d.as_ref()), AWS_NITRO_ROOT_G1_SHA256);
        let cert = parse_cert(AWS_NITRO_ROOT_G1_DER).unwrap();
        assert_eq!(
            cert.subject().to_string(),
            "C=US, O=Amazon, OU=AWS, CN=aws.nitro-enclaves"
        );
        let pem = include_str!("roots/nitro/aws_nitro_enclaves_root_g1.pem");
        assert_eq!(root_der_from_pem(pem).unwrap(), AWS_NITRO_ROOT_G1_DER);
    }

    #[test]
    fn policy_defaults_are_strict_and_unknown_fields_rejected() {
        let p = NitroPolicy::default();
        assert_eq!(p.max_age_ms, DEFAULT_MAX_AGE_MS);
        assert!(p.require_protocol_field_sizes && p.roots_pem.is_empty());
        let parsed: NitroPolicy = serde_json::from_str("{}").unwrap();
        assert_eq!(parsed, p);
        assert!(serde_json::from_str::<NitroPolicy>(r#"{"allow_debug":true}"#).is_err());
        for max_age_ms in [0, MAX_MAX_AGE_MS + 1] {
            let p = NitroPolicy {
                max_age_ms,
                ..NitroPolicy::default()
            };
            assert!(matches!(
                NitroVerifier::new(p),
                Err(AttestError::Policy { .. })
            ));
        }
        let bad_root = NitroPolicy {
            roots_pem: vec![
                "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n".into(),
            ],
            ..NitroPolicy::default()
        };
        assert!(matches!(
            NitroVerifier::new(bad_root),
            Err(AttestError::Policy { .. })
        ));
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
        let good = encode(&envelope(&encode(&Value::Map(payload_fields()))));
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
        let verifier = NitroVerifier::new(NitroPolicy::default()).unwrap();
        for input in [&good[..good.len() / 2], b"", b"\x84"] {
            assert!(is_malformed(verifier.verify(input, &[0; 64], 0)));
        }
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

    #[test]
    fn bundle_from_inputs_detects_forms() {
        let raw = encode(&envelope(&encode(&Value::Map(payload_fields()))));
        let b64 = base64::engine::general_purpose::STANDARD.encode(&raw);
        let wrapped = format!(
            "{}\n",
            b64.as_bytes()
                .chunks(76)
                .map(|c| std::str::from_utf8(c).unwrap())
                .collect::<Vec<_>>()
                .join("\n")
        );
        let url = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&raw);
        let json = serde_json::json!({ "attestation_document": b64 }).to_string();
        let inputs = [
            raw.clone(),
            b64.clone().into_bytes(),
            wrapped.into_bytes(),
            url.into_bytes(),
            hex::encode(&raw).into_bytes(),
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
        assert!(is_malformed(bundle_from_inputs(
            &vec![b'A'; MAX_INPUT_LEN + 1],
            &[],
            None
        )));
    }

    #[test]
    fn fuzz_parse_survives_edge_inputs() {
        let good = encode(&envelope(&encode(&Value::Map(payload_fields()))));
        for input in [
            &[][..],
            b"\x84",
            b"\xd2\x84\x40\xa0\x40\x40",
            &good[..],
            &good[..good.len() - 3],
        ] {
            fuzz_parse(input);
        }
    }
}
