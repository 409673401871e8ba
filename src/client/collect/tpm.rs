//! TPM 2.0 quotes through the kernel's resource manager (`/dev/tpmrm0`), for `tpm` and for the
//! Azure confidential VMs (`az-snp-vtpm`, `az-tdx-vtpm`), whose vTPM also holds the paravisor's
//! HCL report in NV index 0x01400001. Commands are marshalled and responses checked with
//! `tpm2-protocol` (TPM 2.0 Library Part 3 for the commands used: §12.4 TPM2_ReadPublic, §18.4
//! TPM2_Quote, §22.4 TPM2_PCR_Read, §31.6 TPM2_NV_ReadPublic, §31.13 TPM2_NV_Read); the device is
//! the [`TpmTransport`] trait so tests answer with a fake TPM.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use aws_lc_rs::digest;
use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::signature::RsaPublicKeyComponents;
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use tpm2_protocol::data::{
    Tpm2bAuth, Tpm2bData, Tpm2bNonce, TpmAlgId, TpmEccCurve, TpmSt, TpmaSession, TpmlPcrSelection,
    TpmsAttest, TpmsAuthCommand, TpmsPcrSelect, TpmsPcrSelection, TpmtPublic, TpmtSigScheme,
    TpmtSignature, TpmuAttest, TpmuPublicId, TpmuPublicParms,
};
use tpm2_protocol::frame::{
    TpmFrame, TpmNvReadCommand, TpmNvReadPublicCommand, TpmNvReadPublicResponse, TpmNvReadResponse,
    TpmPcrReadCommand, TpmPcrReadResponse, TpmQuoteCommand, TpmQuoteResponse, TpmReadPublicCommand,
    TpmReadPublicResponse, TpmResponse, TpmUnmarshalBody, tpm_marshal_command,
};
use tpm2_protocol::{TpmUnmarshal, TpmWriter};

use super::CollectError;
use crate::attest::{TeeKind, azure, tpm as tpm_verifier};
use crate::client::ClientError;
use crate::client::node::Attester;

/// NV index where the Azure paravisor (HCL) stores its attestation report.
pub const AZURE_HCL_NV_INDEX: u32 = 0x0140_0001;
/// `TPM_RS_PW` (TPM 2.0 Part 2, TPM_RH permanent handles): the password session, with
/// the empty authValue of the AK and of the HCL NV index.
const TPM_RS_PW: u32 = 0x4000_0009;
/// Largest command or response of a TPM 2.0 (`TPM_MAX_COMMAND_SIZE` of the PC Client profile).
const MAX_RESPONSE: usize = 4096;
/// `MAX_NV_BUFFER_SIZE` of the PC Client profile: the largest NV_Read chunk.
const NV_CHUNK: u16 = 1024;
/// Tries when a PCR changes between reading it and quoting it.
const QUOTE_ATTEMPTS: u32 = 3;
/// RFC 5480 §2: DER prefix of a P-256 SubjectPublicKeyInfo with an uncompressed point.
const P256_SPKI_PREFIX: [u8; 26] = [
    0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a,
    0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
];
pub(crate) const HINT: &str = "needs a TPM 2.0 with the kernel resource manager (tpm_tis/tpm_crb, \
                    /dev/tpmrm0) and read-write access to it; see --tpm-device";

/// One command/response exchange with a TPM.
pub trait TpmTransport: Send {
    fn transact(&mut self, command: &[u8]) -> Result<Vec<u8>, CollectError>;
}

/// A TPM character device: one `write` of a command, one `read` of its response (the Linux TPM
/// driver's interface); opened on first use and kept for the attester's lifetime.
pub struct DeviceTransport {
    path: PathBuf,
    file: Option<std::fs::File>,
}

impl DeviceTransport {
    pub fn new(path: &Path) -> Self {
        Self {
            path: path.to_path_buf(),
            file: None,
        }
    }
}

impl TpmTransport for DeviceTransport {
    fn transact(&mut self, command: &[u8]) -> Result<Vec<u8>, CollectError> {
        let path = self.path.clone();
        let err = |e| CollectError::io(&path, e, HINT);
        if self.file.is_none() {
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&self.path)
                .map_err(err)?;
            self.file = Some(f);
        }
        let file = self.file.as_mut().expect("opened above");
        file.write_all(command).map_err(err)?;
        let mut buf = vec![0u8; MAX_RESPONSE];
        let n = file.read(&mut buf).map_err(err)?;
        buf.truncate(n);
        Ok(buf)
    }
}

/// A validated PCR selection of the SHA-256 bank: ascending, distinct, 0..=23.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PcrSelection(Vec<u8>);

impl PcrSelection {
    pub fn new(pcrs: &[u8]) -> Result<Self, CollectError> {
        let mut v = pcrs.to_vec();
        v.sort_unstable();
        v.dedup();
        if v.is_empty() || v.len() != pcrs.len() || v.iter().any(|p| *p > 23) {
            return Err(CollectError::Usage(
                "PCR selection must name distinct PCRs 0..=23, at least one".into(),
            ));
        }
        Ok(Self(v))
    }

    pub fn indices(&self) -> &[u8] {
        &self.0
    }

    /// TPM 2.0 Part 2 §10.6.1: bit `i` of octet `j` selects PCR `8j + i`.
    fn bitmap(pcrs: &[u8]) -> [u8; 3] {
        let mut b = [0u8; 3];
        for p in pcrs {
            b[usize::from(p / 8)] |= 1 << (p % 8);
        }
        b
    }

    fn list(pcrs: &[u8]) -> Result<TpmlPcrSelection, CollectError> {
        let select = TpmsPcrSelect::try_from(&Self::bitmap(pcrs)[..]).map_err(tpm_err)?;
        let mut l = TpmlPcrSelection::new();
        l.try_push(TpmsPcrSelection {
            hash: TpmAlgId::Sha256,
            pcr_select: select,
        })
        .map_err(tpm_err)?;
        Ok(l)
    }
}

fn tpm_err(e: tpm2_protocol::TpmError) -> CollectError {
    CollectError::Device(format!("TPM structure: {e:?}"))
}

fn password_session() -> TpmsAuthCommand {
    TpmsAuthCommand {
        session_handle: tpm2_protocol::basic::TpmHandle::new(TPM_RS_PW),
        nonce: Tpm2bNonce::default(),
        session_attributes: TpmaSession::default(),
        hmac: Tpm2bAuth::default(),
    }
}

/// Sends `command` and returns its typed response and the raw parameter area.
fn run<C: TpmFrame, R: TpmUnmarshalBody>(
    t: &mut dyn TpmTransport,
    name: &'static str,
    command: &C,
    authorized: bool,
) -> Result<(R, Vec<u8>), CollectError> {
    let mut buf = [0u8; MAX_RESPONSE];
    let mut w = TpmWriter::new(&mut buf);
    let (tag, sessions) = if authorized {
        (TpmSt::Sessions, vec![password_session()])
    } else {
        (TpmSt::NoSessions, Vec::new())
    };
    tpm_marshal_command(command, tag, &sessions, &mut w).map_err(tpm_err)?;
    let response = t.transact(w.as_bytes())?;
    let bad = |d: &str| CollectError::Device(format!("TPM2_{name}: {d}"));
    // TPM 2.0 Part 1 §18.7: tag, size, responseCode; a failure is the bare 10-byte header.
    let header = response
        .get(..10)
        .ok_or_else(|| bad("response shorter than its header"))?;
    let size = u32::from_be_bytes(header[2..6].try_into().expect("4 bytes")) as usize;
    if size != response.len() {
        return Err(bad("response size field does not match the response"));
    }
    let rc = u32::from_be_bytes(header[6..10].try_into().expect("4 bytes"));
    if rc != 0 {
        return Err(CollectError::Tpm { command: name, rc });
    }
    let view = TpmResponse::cast(&response).map_err(|e| bad(&format!("{e:?}")))?;
    let typed: R = view.unmarshal().map_err(|e| bad(&format!("{e:?}")))?;
    // None of the responses used has handles; with sessions, parameterSize leads the area.
    let body = view.body();
    let params = if authorized {
        let n = u32::from_be_bytes(
            body.get(..4)
                .ok_or_else(|| bad("no parameterSize"))?
                .try_into()
                .expect("4 bytes"),
        ) as usize;
        body.get(4..4 + n)
            .ok_or_else(|| bad("parameters truncated"))?
    } else {
        body
    };
    Ok((typed, params.to_vec()))
}

/// The first `TPM2B` of a parameter area and what follows it.
fn split_tpm2b(params: &[u8]) -> Option<(&[u8], &[u8])> {
    let n = usize::from(u16::from_be_bytes(params.get(..2)?.try_into().ok()?));
    Some((params.get(2..2 + n)?, &params[2 + n..]))
}

/// The AK's `TPMT_PUBLIC` exactly as the TPM returned it, and its key as a DER
/// SubjectPublicKeyInfo (what the vault's TPM verifier takes as `ak_public`).
pub fn read_ak_public(
    t: &mut dyn TpmTransport,
    handle: u32,
) -> Result<(Vec<u8>, Vec<u8>), CollectError> {
    let cmd = TpmReadPublicCommand {
        handles: [tpm2_protocol::basic::TpmHandle::new(handle)],
    };
    let (_, params): (TpmReadPublicResponse, _) = run(t, "ReadPublic", &cmd, false)?;
    let (public, _) = split_tpm2b(&params)
        .ok_or_else(|| CollectError::Device("TPM2_ReadPublic: no outPublic".into()))?;
    Ok((public.to_vec(), spki(public)?))
}

/// TPM 2.0 Part 2 §12.2.4 TPMT_PUBLIC → RFC 5280 SubjectPublicKeyInfo (RSA, or ECC P-256).
fn spki(tpmt_public: &[u8]) -> Result<Vec<u8>, CollectError> {
    let bad = |d: &str| CollectError::Device(format!("AK public area: {d}"));
    let (public, rest) = TpmtPublic::unmarshal(tpmt_public).map_err(tpm_err)?;
    if !rest.is_empty() {
        return Err(bad("trailing bytes"));
    }
    match (&public.parameters, &public.unique) {
        (TpmuPublicParms::Rsa(parms), TpmuPublicId::Rsa(n)) => {
            // Part 2 §12.2.3.5: exponent 0 means 65537.
            let e = match parms.exponent.value() {
                0 => 65_537u32,
                e => e,
            }
            .to_be_bytes();
            let e = &e[e.iter().position(|b| *b != 0).unwrap_or(3)..];
            let n = &n[n.iter().position(|b| *b != 0).unwrap_or(0)..];
            Ok(RsaPublicKeyComponents { n, e }
                .as_der()
                .map_err(|_| bad("invalid RSA key"))?
                .as_ref()
                .to_vec())
        }
        (TpmuPublicParms::Ecc(parms), TpmuPublicId::Ecc(point))
            if parms.curve_id == TpmEccCurve::NistP256
                && point.x.len() <= 32
                && point.y.len() <= 32 =>
        {
            let mut out = P256_SPKI_PREFIX.to_vec();
            out.push(0x04);
            for c in [&point.x[..], &point.y[..]] {
                out.extend(std::iter::repeat_n(0u8, 32 - c.len()));
                out.extend_from_slice(c);
            }
            Ok(out)
        }
        _ => Err(bad("not an RSA or ECC P-256 key")),
    }
}

/// The SHA-256 bank values of `pcrs`, ascending, and the PCR update counter they were read at.
pub fn read_pcrs(
    t: &mut dyn TpmTransport,
    pcrs: &PcrSelection,
) -> Result<Vec<[u8; 32]>, CollectError> {
    let mut values = BTreeMap::new();
    let mut counter = None;
    // A TPM returns at most eight digests per call (TPML_DIGEST); ask again for the rest.
    while values.len() < pcrs.0.len() {
        let missing: Vec<u8> = pcrs
            .0
            .iter()
            .copied()
            .filter(|p| !values.contains_key(p))
            .collect();
        let cmd = TpmPcrReadCommand {
            handles: [],
            pcr_selection_in: PcrSelection::list(&missing)?,
        };
        let (r, _): (TpmPcrReadResponse, _) = run(t, "PCR_Read", &cmd, false)?;
        let c = r.pcr_update_counter.value();
        if counter.is_some_and(|old| old != c) {
            // A PCR was extended between calls: start over so all values are from one state.
            values.clear();
        }
        counter = Some(c);
        let mut got = Vec::new();
        for sel in r.pcr_selection_out.iter() {
            if sel.hash != TpmAlgId::Sha256 {
                return Err(CollectError::Device(
                    "TPM2_PCR_Read answered another bank".into(),
                ));
            }
            for (j, byte) in sel.pcr_select.iter().enumerate() {
                for i in 0..8u8 {
                    if byte & (1 << i) != 0 {
                        got.push(u8::try_from(j * 8).unwrap_or(u8::MAX).saturating_add(i));
                    }
                }
            }
        }
        if got.is_empty() || got.len() != r.pcr_values.len() {
            return Err(CollectError::Device(
                "TPM2_PCR_Read returned no SHA-256 values for the selection (is the SHA-256 bank allocated?)"
                    .into(),
            ));
        }
        for (p, v) in got.into_iter().zip(r.pcr_values.iter()) {
            let v: [u8; 32] = v[..].try_into().map_err(|_| {
                CollectError::Device("TPM2_PCR_Read: a SHA-256 value is not 32 bytes".into())
            })?;
            if !missing.contains(&p) {
                return Err(CollectError::Device(
                    "TPM2_PCR_Read returned a PCR that was not asked for".into(),
                ));
            }
            values.insert(p, v);
        }
    }
    Ok(values.into_values().collect())
}

/// `TPM2_Quote` with the AK at `handle` over `pcrs`, with `qualifying` as qualifyingData:
/// the `TPMS_ATTEST` and `TPMT_SIGNATURE` exactly as the TPM returned them.
pub fn quote(
    t: &mut dyn TpmTransport,
    handle: u32,
    qualifying: &[u8],
    pcrs: &PcrSelection,
) -> Result<(Vec<u8>, Vec<u8>), CollectError> {
    let cmd = TpmQuoteCommand {
        handles: [tpm2_protocol::basic::TpmHandle::new(handle)],
        qualifying_data: Tpm2bData::try_from(qualifying).map_err(tpm_err)?,
        // TPM_ALG_NULL: the AK's own scheme.
        in_scheme: TpmtSigScheme::default(),
        pcr_select: PcrSelection::list(&pcrs.0)?,
    };
    let (_, params): (TpmQuoteResponse, _) = run(t, "Quote", &cmd, true)?;
    let (message, signature) =
        split_tpm2b(&params).ok_or_else(|| CollectError::Device("TPM2_Quote: no quoted".into()))?;
    let (_, rest) = TpmtSignature::unmarshal(signature).map_err(tpm_err)?;
    if !rest.is_empty() {
        return Err(CollectError::Device(
            "TPM2_Quote: trailing bytes after the signature".into(),
        ));
    }
    Ok((message.to_vec(), signature.to_vec()))
}

/// `extraData` and `pcrDigest` of a quote's TPMS_ATTEST (TPM 2.0 Part 2 §10.12).
fn quote_fields(message: &[u8]) -> Result<(Vec<u8>, Vec<u8>), CollectError> {
    let (attest, rest) = TpmsAttest::unmarshal(message).map_err(tpm_err)?;
    let TpmuAttest::Quote(info) = attest.attested else {
        return Err(CollectError::Device(
            "TPM2_Quote did not return a quote".into(),
        ));
    };
    if !rest.is_empty() || attest.attest_type != TpmSt::AttestQuote {
        return Err(CollectError::Device(
            "TPM2_Quote did not return a quote".into(),
        ));
    }
    Ok((attest.extra_data.to_vec(), info.pcr_digest.to_vec()))
}

/// A quote as the TPM returned it, with the PCR values it covers (ascending PCR index).
pub struct PcrQuote {
    /// `TPMS_ATTEST`.
    pub message: Vec<u8>,
    /// `TPMT_SIGNATURE`.
    pub signature: Vec<u8>,
    pub pcr_values: Vec<[u8; 32]>,
}

/// A quote whose PCR values are known: read the PCRs, quote, and check that the quote's
/// `pcrDigest` is the SHA-256 of the values read (TPM 2.0 Part 3 §18.4); if a PCR was extended
/// in between, try again.
pub fn quote_with_pcrs(
    t: &mut dyn TpmTransport,
    handle: u32,
    qualifying: &[u8],
    pcrs: &PcrSelection,
) -> Result<PcrQuote, CollectError> {
    for _ in 0..QUOTE_ATTEMPTS {
        let values = read_pcrs(t, pcrs)?;
        let (message, signature) = quote(t, handle, qualifying, pcrs)?;
        let (extra, pcr_digest) = quote_fields(&message)?;
        if extra != qualifying {
            return Err(CollectError::Device(
                "the quote does not carry the qualifying data asked for".into(),
            ));
        }
        let cat: Vec<u8> = values.iter().flatten().copied().collect();
        if digest::digest(&digest::SHA256, &cat).as_ref() == pcr_digest.as_slice() {
            return Ok(PcrQuote {
                message,
                signature,
                pcr_values: values,
            });
        }
    }
    Err(CollectError::Device(format!(
        "the PCRs changed between reading and quoting them on each of {QUOTE_ATTEMPTS} attempts"
    )))
}

/// The whole content of an NV index (authorized by the index itself, empty password).
pub fn nv_read(t: &mut dyn TpmTransport, index: u32) -> Result<Vec<u8>, CollectError> {
    let h = tpm2_protocol::basic::TpmHandle::new(index);
    let (public, _): (TpmNvReadPublicResponse, _) = run(
        t,
        "NV_ReadPublic",
        &TpmNvReadPublicCommand { handles: [h] },
        false,
    )?;
    let size = public.nv_public.inner.data_size.value();
    let mut out = Vec::with_capacity(usize::from(size));
    while out.len() < usize::from(size) {
        let offset = u16::try_from(out.len()).expect("below a u16 size");
        let chunk = NV_CHUNK.min(size - offset);
        let cmd = TpmNvReadCommand {
            handles: [h, h],
            size: chunk.into(),
            offset: offset.into(),
        };
        let (r, _): (TpmNvReadResponse, _) = run(t, "NV_Read", &cmd, true)?;
        if r.data.len() != usize::from(chunk) {
            return Err(CollectError::Device(
                "TPM2_NV_Read returned another length than asked".into(),
            ));
        }
        out.extend_from_slice(&r.data);
    }
    Ok(out)
}

/// The hardware part of Azure evidence that does not come from the vTPM.
pub enum AzureHardware {
    /// VCEK/VLEK and optional chain (DER), from the node's files.
    Snp { vcek: Vec<u8>, chain: Vec<Vec<u8>> },
    /// The TD quote of the HCL report and its DCAP collateral JSON.
    Tdx { quote: Vec<u8>, collateral: Vec<u8> },
}

impl AzureHardware {
    /// `certs`: the VCEK or VLEK (exactly one end-entity certificate) and optionally its CAs.
    pub fn snp(certs: Vec<Vec<u8>>) -> Result<Self, CollectError> {
        let mut vcek = Vec::new();
        let mut chain = Vec::new();
        for der in certs {
            let (_, cert) = x509_parser::parse_x509_certificate(&der).map_err(|e| {
                CollectError::Usage(format!("az-snp-vtpm certificate does not parse: {e}"))
            })?;
            if cert.is_ca() {
                chain.push(der);
            } else {
                vcek.push(der);
            }
        }
        let [vcek] = <[Vec<u8>; 1]>::try_from(vcek).map_err(|_| {
            CollectError::Usage(
                "az-snp-vtpm needs exactly one VCEK/VLEK certificate (--certs FILE; on Azure from \
                 the instance's THIM endpoint or AMD's KDS)"
                    .into(),
            )
        })?;
        Ok(AzureHardware::Snp { vcek, chain })
    }

    pub fn tdx(quote: Vec<u8>, collateral: Vec<u8>) -> Self {
        AzureHardware::Tdx { quote, collateral }
    }
}

enum Mode {
    Tpm { ak_certs: Vec<Vec<u8>> },
    Azure(AzureHardware),
}

/// TPM or Azure vTPM evidence in the bundle form of the vault's verifier for that TEE.
pub struct TpmAttester {
    tee: TeeKind,
    transport: Mutex<Box<dyn TpmTransport>>,
    ak_handle: u32,
    pcrs: PcrSelection,
    mode: Mode,
}

impl TpmAttester {
    /// `ak_certs`: the AK certificate, then its intermediates (may be empty when the vault pins
    /// the AK).
    pub fn tpm(
        transport: Box<dyn TpmTransport>,
        ak_handle: u32,
        pcrs: PcrSelection,
        ak_certs: Vec<Vec<u8>>,
    ) -> Result<Self, CollectError> {
        Ok(Self {
            tee: TeeKind::Tpm,
            transport: Mutex::new(transport),
            ak_handle,
            pcrs,
            mode: Mode::Tpm { ak_certs },
        })
    }

    pub fn azure(
        tee: TeeKind,
        transport: Box<dyn TpmTransport>,
        ak_handle: u32,
        pcrs: PcrSelection,
        hardware: AzureHardware,
    ) -> Result<Self, CollectError> {
        let fits = matches!(
            (tee, &hardware),
            (TeeKind::AzSnpVtpm, AzureHardware::Snp { .. })
                | (TeeKind::AzTdxVtpm, AzureHardware::Tdx { .. })
        );
        if !fits {
            return Err(CollectError::Usage(format!(
                "{tee} does not go with this hardware evidence"
            )));
        }
        Ok(Self {
            tee,
            transport: Mutex::new(transport),
            ak_handle,
            pcrs,
            mode: Mode::Azure(hardware),
        })
    }

    /// Collects the evidence bundle for `report_data`. The quote's qualifyingData is its first
    /// 32 bytes: a TPM caps qualifying data at its largest digest, and every TPM has SHA-256
    /// (docs/attestation/tpm.md, binding).
    pub fn collect(&self, report_data: &[u8; 64]) -> Result<Vec<u8>, CollectError> {
        let mut guard = self
            .transport
            .lock()
            .map_err(|_| CollectError::Device("TPM transport poisoned".into()))?;
        let t: &mut dyn TpmTransport = guard.as_mut();
        let qualifying = &report_data[..32];
        match &self.mode {
            Mode::Tpm { ak_certs } => {
                let (tpm_public, ak_public) = read_ak_public(t, self.ak_handle)?;
                let PcrQuote {
                    message,
                    signature,
                    pcr_values: values,
                } = quote_with_pcrs(t, self.ak_handle, qualifying, &self.pcrs)?;
                let bundle = serde_json::json!({
                    "format": tpm_verifier::FORMAT,
                    "ak_public": STANDARD.encode(&ak_public),
                    "ak_tpm_public": STANDARD.encode(&tpm_public),
                    "ak_cert_chain": ak_certs.iter().map(|c| STANDARD.encode(c)).collect::<Vec<_>>(),
                    "quote": {"message": STANDARD.encode(&message), "signature": STANDARD.encode(&signature)},
                    "pcrs": self.pcr_map(&values),
                });
                Ok(serde_json::to_vec(&bundle).expect("JSON value serializes"))
            }
            Mode::Azure(hw) => {
                let hcl_report = nv_read(t, AZURE_HCL_NV_INDEX)?;
                let PcrQuote {
                    message,
                    signature,
                    pcr_values: values,
                } = quote_with_pcrs(t, self.ak_handle, qualifying, &self.pcrs)?;
                // The Azure bundle carries the bare RSASSA signature: TPMT_SIGNATURE is sigAlg
                // (TPM_ALG_RSASSA 0x0014), hash, then a TPM2B (Part 2 §11.3.1, §11.3.4).
                let raw = match signature.get(..4) {
                    Some([0x00, 0x14, 0x00, 0x0b]) => split_tpm2b(&signature[4..])
                        .filter(|(_, rest)| rest.is_empty())
                        .map(|(s, _)| s.to_vec()),
                    _ => None,
                }
                .ok_or_else(|| {
                    CollectError::Device(
                        "the vTPM quote is not an RSASSA-SHA256 signature (the HCL AK is RSA)"
                            .into(),
                    )
                })?;
                let (vcek, chain, td_quote, collateral) = match hw {
                    AzureHardware::Snp { vcek, chain } => {
                        (Some(vcek.clone()), chain.clone(), None, None)
                    }
                    AzureHardware::Tdx { quote, collateral } => (
                        None,
                        Vec::new(),
                        Some(quote.clone()),
                        Some(collateral.clone()),
                    ),
                };
                azure::Bundle {
                    hcl_report,
                    vcek,
                    chain,
                    td_quote,
                    collateral,
                    message,
                    signature: raw,
                    pcrs: self.pcr_map(&values),
                }
                .encode()
                .map_err(|e| CollectError::Device(format!("Azure evidence: {e}")))
            }
        }
    }

    fn pcr_map(&self, values: &[[u8; 32]]) -> BTreeMap<String, String> {
        self.pcrs
            .0
            .iter()
            .zip(values)
            .map(|(i, v)| (i.to_string(), hex::encode(v)))
            .collect()
    }
}

impl Attester for TpmAttester {
    fn tee(&self) -> &str {
        self.tee.as_str()
    }

    fn evidence(&self, report_data: &[u8; 64]) -> Result<Vec<u8>, ClientError> {
        Ok(self.collect(report_data)?)
    }
}
