//! AWS Nitro Enclaves evidence from the Nitro Secure Module. A request is one CBOR message
//! (RFC 8949) that the NSM driver's ioctl carries to the module and one CBOR answer back, in the
//! layout of AWS's NSM API (`aws-nitro-enclaves-nsm-api`, `api::Request::Attestation` and
//! `api::Response`): externally tagged, `{"Attestation": {"user_data": …, "nonce": …,
//! "public_key": …}}` → `{"Attestation": {"document": h'…'}}` or `{"Error": "<code>"}`.
//!
//! The message handling is here; the transport is the [`NsmTransport`] trait, so tests answer
//! with a fake module. [`NsmDevice`] is the real one: the ioctl itself is AWS's driver binding,
//! because this crate has no unsafe code.

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use ciborium::Value;

use super::CollectError;
use crate::attest::{nitro, report_data};
use crate::client::ClientError;
use crate::client::node::Attester;

pub(crate) const HINT: &str = "the Nitro Secure Module exists only inside a Nitro enclave (nsm driver); \
                    see --nsm-device";

/// One exchange with a Nitro Secure Module: a CBOR request in, its CBOR response out.
pub trait NsmTransport: Send + Sync {
    fn exchange(&self, request: &[u8]) -> Result<Vec<u8>, CollectError>;
}

/// The enclave's `/dev/nsm` (or another path).
pub struct NsmDevice {
    path: PathBuf,
}

impl NsmDevice {
    pub fn new(path: &Path) -> Self {
        Self {
            path: path.to_path_buf(),
        }
    }
}

impl NsmTransport for NsmDevice {
    fn exchange(&self, request: &[u8]) -> Result<Vec<u8>, CollectError> {
        use aws_nitro_enclaves_nsm_api::{api, driver};
        // Opened here rather than with the driver's own open so that a missing device is
        // reported with its path and reason.
        let dev = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&self.path)
            .map_err(|e| CollectError::io(&self.path, e, HINT))?;
        let request: api::Request = ciborium::de::from_reader(request)
            .map_err(|e| CollectError::Device(format!("NSM request does not decode: {e}")))?;
        let response = driver::nsm_process_request(dev.as_raw_fd(), request);
        let mut out = Vec::new();
        ciborium::ser::into_writer(&response, &mut out)
            .map_err(|e| CollectError::Device(format!("NSM response does not encode: {e}")))?;
        Ok(out)
    }
}

/// The CBOR of an NSM `Attestation` request carrying the vault's nonce and the node key in the
/// document's own `nonce` and `public_key` fields (AWS attestation process §2.2), where the
/// Nitro verifier looks for them. `user_data` carries `attest::report_data(nonce, key)`: the
/// verifier does not need it, but an absent field would be `null` in the document, which the
/// verifier refuses (AWS §3.2.2.1).
pub fn attestation_request(nonce: &[u8; 32], public_key: &[u8; 32]) -> Vec<u8> {
    let t = |s: &str| Value::Text(s.into());
    let request = Value::Map(vec![(
        t("Attestation"),
        Value::Map(vec![
            (
                t("user_data"),
                Value::Bytes(report_data(nonce, public_key).to_vec()),
            ),
            (t("nonce"), Value::Bytes(nonce.to_vec())),
            (t("public_key"), Value::Bytes(public_key.to_vec())),
        ]),
    )]);
    let mut out = Vec::new();
    ciborium::ser::into_writer(&request, &mut out).expect("CBOR into a Vec");
    out
}

/// The attestation document of an NSM response, or the module's error code.
pub fn attestation_document(response: &[u8]) -> Result<Vec<u8>, CollectError> {
    let bad = |d: &str| CollectError::Device(format!("NSM response: {d}"));
    if response.len() > nitro::MAX_DOCUMENT_LEN + 1024 {
        return Err(bad("too large"));
    }
    let value: Value = ciborium::de::from_reader(response).map_err(|_| bad("not one CBOR item"))?;
    let Value::Map(outer) = value else {
        return Err(bad("not a map"));
    };
    let [(Value::Text(kind), body)] = outer.as_slice() else {
        return Err(bad("not a single tagged response"));
    };
    match (kind.as_str(), body) {
        ("Attestation", Value::Map(fields)) => {
            let mut docs = fields.iter().filter_map(|(k, v)| match (k, v) {
                (Value::Text(k), Value::Bytes(d)) if k == "document" => Some(d),
                _ => None,
            });
            match (docs.next(), docs.next()) {
                (Some(d), None) => Ok(d.clone()),
                _ => Err(bad("Attestation without exactly one document")),
            }
        }
        ("Error", Value::Text(code)) => Err(CollectError::Device(format!(
            "the Nitro Secure Module refused the attestation request: {}",
            code.chars().take(64).collect::<String>()
        ))),
        _ => Err(bad("neither Attestation nor Error")),
    }
}

/// Nitro evidence: the raw COSE_Sign1 attestation document.
pub struct NsmAttester {
    transport: Box<dyn NsmTransport>,
}

impl NsmAttester {
    pub fn new(transport: Box<dyn NsmTransport>) -> Self {
        Self { transport }
    }

    /// The real module at `path`.
    pub fn device(path: &Path) -> Self {
        Self::new(Box::new(NsmDevice::new(path)))
    }

    /// An attestation document binding `nonce` and `public_key`.
    pub fn collect(
        &self,
        nonce: &[u8; 32],
        public_key: &[u8; 32],
    ) -> Result<Vec<u8>, CollectError> {
        let response = self
            .transport
            .exchange(&attestation_request(nonce, public_key))?;
        let document = attestation_document(&response)?;
        // Only a well-formed COSE_Sign1 goes to the vault.
        nitro::bundle_from_inputs(&document, &[], None)
            .map_err(|e| CollectError::Device(format!("NSM attestation document: {e}")))
    }
}

impl Attester for NsmAttester {
    fn tee(&self) -> &str {
        "nitro"
    }

    /// Nitro documents carry the nonce and the node key themselves, so 64 bytes of report data
    /// cannot be turned into a bound document; the node protocol calls `evidence_for`.
    fn evidence(&self, _report_data: &[u8; 64]) -> Result<Vec<u8>, ClientError> {
        Err(CollectError::Usage(
            "nitro evidence binds the nonce and the node key in the document's own fields; \
             ask with Attester::evidence_for"
                .into(),
        )
        .into())
    }

    fn evidence_for(
        &self,
        nonce: &[u8; 32],
        node_public_key: &[u8; 32],
    ) -> Result<Vec<u8>, ClientError> {
        Ok(self.collect(nonce, node_public_key)?)
    }
}
