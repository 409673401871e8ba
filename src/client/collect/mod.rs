//! Evidence collection on the node for hardware TEEs, behind the [`Attester`] trait: SEV-SNP and
//! TDX through Linux configfs-tsm ([`tsm`]), AWS Nitro Enclaves through `/dev/nsm` ([`nsm`]), and
//! TPM 2.0 quotes through `/dev/tpmrm0`, alone or with an Azure HCL report ([`tpm`]). Each
//! collector produces exactly the evidence form the vault's verifier for that TEE accepts
//! (docs/attestation.md, "Collecting evidence on the node"). Device paths are options so that
//! tests can point them at fakes.

pub mod nsm;
pub mod tpm;
pub mod tsm;

use std::path::{Path, PathBuf};

use super::ClientError;
use super::node::Attester;
use crate::attest::TeeKind;

/// Where configfs-tsm creates report instances (Documentation/ABI/testing/configfs-tsm-report).
pub const DEFAULT_TSM_REPORT_DIR: &str = "/sys/kernel/config/tsm/report";
/// The Nitro Secure Module device inside an enclave.
pub const DEFAULT_NSM_DEVICE: &str = "/dev/nsm";
/// The TPM 2.0 device behind the kernel's resource manager.
pub const DEFAULT_TPM_DEVICE: &str = "/dev/tpmrm0";
/// Persistent handle of the attestation key the Azure paravisor provisions in the vTPM.
pub const AZURE_AK_HANDLE: u32 = 0x8100_0003;
/// PCRs quoted when no selection is given: the firmware, boot loader and Secure Boot PCRs that
/// the vault's TPM and Azure policies require by default.
pub const DEFAULT_PCRS: [u8; 8] = [0, 1, 2, 3, 4, 5, 6, 7];

/// Why evidence could not be collected. Nothing is sent to the vault in any of these cases.
#[derive(Debug, thiserror::Error)]
pub enum CollectError {
    /// The device or directory does not exist: wrong machine, module not loaded, or not inside
    /// the TEE.
    #[error("{path}: not found ({hint})")]
    Missing { path: String, hint: &'static str },
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    /// configfs-tsm is served by another TEE than the one asked for.
    #[error("{path}: provider is {found:?}, expected {expected:?}")]
    Provider {
        path: String,
        found: String,
        expected: &'static str,
    },
    /// Another writer changed the report instance while we used it, on every attempt.
    #[error(
        "{path}: another writer changed the report request (generation {found}, expected {expected}) on each of {attempts} attempts"
    )]
    Race {
        path: String,
        found: u64,
        expected: u64,
        attempts: u32,
    },
    /// The device answered with something that is not the evidence we asked for.
    #[error("{0}")]
    Device(String),
    /// A TPM command failed with a TPM response code (TPM 2.0 Part 2 §6.6).
    #[error("TPM2_{command} failed with response code {rc:#06x}")]
    Tpm { command: &'static str, rc: u32 },
    /// Missing or invalid options or input files.
    #[error("{0}")]
    Usage(String),
}

impl CollectError {
    pub(crate) fn io(path: &Path, source: std::io::Error, hint: &'static str) -> Self {
        if source.kind() == std::io::ErrorKind::NotFound {
            CollectError::Missing {
                path: path.display().to_string(),
                hint,
            }
        } else {
            CollectError::Io {
                path: path.display().to_string(),
                source,
            }
        }
    }
}

impl From<CollectError> for ClientError {
    fn from(e: CollectError) -> Self {
        match e {
            CollectError::Io { path, source } => ClientError::Io { path, source },
            other => ClientError::Usage(format!("collecting evidence: {other}")),
        }
    }
}

/// Options of the hardware collectors; defaults are the real device paths.
#[derive(Clone, Debug)]
pub struct CollectOptions {
    /// configfs-tsm report directory (SEV-SNP, TDX).
    pub tsm_dir: PathBuf,
    /// SEV-SNP VMPL to request through `privlevel` (the vault accepts VMPL 0 only); `None`
    /// leaves the kernel's default.
    pub privlevel: Option<u8>,
    /// Nitro Secure Module device.
    pub nsm_device: PathBuf,
    /// TPM device (TPM, Azure vTPM).
    pub tpm_device: PathBuf,
    /// Persistent handle of the attestation key; required for `tpm`, Azure's by default for the
    /// Azure kinds.
    pub ak_handle: Option<u32>,
    /// Files with the AK certificate and its intermediates (DER or PEM), for `tpm`.
    pub ak_certs: Vec<PathBuf>,
    /// SHA-256 bank PCRs to quote.
    pub pcrs: Vec<u8>,
    /// Certificate files (DER or PEM): the VCEK/VLEK and optionally ASK/ARK for `snp` when the
    /// host supplies no certificate table, and for `az-snp-vtpm`.
    pub certs: Vec<PathBuf>,
    /// dcap-qvl collateral JSON for `tdx` and `az-tdx-vtpm`.
    pub collateral: Option<PathBuf>,
    /// The TD quote of the HCL report (from Azure's quoting service), for `az-tdx-vtpm`.
    pub td_quote: Option<PathBuf>,
}

impl Default for CollectOptions {
    fn default() -> Self {
        Self {
            tsm_dir: PathBuf::from(DEFAULT_TSM_REPORT_DIR),
            privlevel: None,
            nsm_device: PathBuf::from(DEFAULT_NSM_DEVICE),
            tpm_device: PathBuf::from(DEFAULT_TPM_DEVICE),
            ak_handle: None,
            ak_certs: Vec::new(),
            pcrs: DEFAULT_PCRS.to_vec(),
            certs: Vec::new(),
            collateral: None,
            td_quote: None,
        }
    }
}

pub(crate) fn read_input(path: &Path, what: &str) -> Result<Vec<u8>, CollectError> {
    std::fs::read(path).map_err(|e| CollectError::Usage(format!("{what} {}: {e}", path.display())))
}

/// Certificates from files holding DER or PEM (one or more certificates each), in order.
pub(crate) fn read_certs(paths: &[PathBuf]) -> Result<Vec<Vec<u8>>, CollectError> {
    let mut out = Vec::new();
    for p in paths {
        let bytes = read_input(p, "certificate file")?;
        if bytes.windows(11).any(|w| w == b"-----BEGIN ") {
            let before = out.len();
            for pem in x509_parser::pem::Pem::iter_from_buffer(&bytes) {
                let pem = pem.map_err(|e| {
                    CollectError::Usage(format!("certificate file {}: {e}", p.display()))
                })?;
                if pem.label == "CERTIFICATE" {
                    out.push(pem.contents);
                }
            }
            if out.len() == before {
                return Err(CollectError::Usage(format!(
                    "certificate file {}: no CERTIFICATE in the PEM",
                    p.display()
                )));
            }
        } else {
            out.push(bytes);
        }
    }
    Ok(out)
}

/// The attester for a hardware TEE. Input files are read and checked here, before anything is
/// sent to the vault; devices are opened when evidence is asked for. `sim` is built elsewhere
/// (it needs a signing key, not a device).
pub fn attester(tee: TeeKind, opts: &CollectOptions) -> Result<Box<dyn Attester>, ClientError> {
    // A missing device is reported here, before the node asks the vault for a challenge.
    let (device, hint) = match tee {
        TeeKind::Snp | TeeKind::Tdx => (&opts.tsm_dir, tsm::HINT),
        TeeKind::Nitro => (&opts.nsm_device, nsm::HINT),
        _ => (&opts.tpm_device, tpm::HINT),
    };
    if tee != TeeKind::Sim && !device.exists() {
        return Err(CollectError::Missing {
            path: device.display().to_string(),
            hint,
        }
        .into());
    }
    let pcrs = tpm::PcrSelection::new(&opts.pcrs)?;
    let attester: Box<dyn Attester> = match tee {
        TeeKind::Snp => Box::new(tsm::TsmAttester::snp(
            &opts.tsm_dir,
            opts.privlevel,
            read_certs(&opts.certs)?,
        )?),
        TeeKind::Tdx => {
            let collateral = opts.collateral.as_deref().ok_or_else(|| {
                CollectError::Usage(
                    "tdx evidence needs the DCAP collateral of this platform (--collateral FILE, \
                     dcap-qvl JSON): the vault verifies offline"
                        .into(),
                )
            })?;
            Box::new(tsm::TsmAttester::tdx(
                &opts.tsm_dir,
                read_input(collateral, "collateral")?,
            )?)
        }
        TeeKind::Nitro => Box::new(nsm::NsmAttester::device(&opts.nsm_device)),
        TeeKind::Tpm => {
            let handle = opts.ak_handle.ok_or_else(|| {
                CollectError::Usage(
                    "tpm evidence needs the persistent handle of the attestation key \
                     (--ak-handle 0x81......)"
                        .into(),
                )
            })?;
            Box::new(tpm::TpmAttester::tpm(
                Box::new(tpm::DeviceTransport::new(&opts.tpm_device)),
                handle,
                pcrs,
                read_certs(&opts.ak_certs)?,
            )?)
        }
        TeeKind::AzSnpVtpm | TeeKind::AzTdxVtpm => {
            let handle = opts.ak_handle.unwrap_or(AZURE_AK_HANDLE);
            let hardware = if tee == TeeKind::AzSnpVtpm {
                tpm::AzureHardware::snp(read_certs(&opts.certs)?)?
            } else {
                let quote = opts.td_quote.as_deref().ok_or_else(|| {
                    CollectError::Usage(
                        "az-tdx-vtpm evidence needs the TD quote of the HCL report \
                         (--td-quote FILE, from Azure's quoting service)"
                            .into(),
                    )
                })?;
                let collateral = opts.collateral.as_deref().ok_or_else(|| {
                    CollectError::Usage(
                        "az-tdx-vtpm evidence needs DCAP collateral (--collateral FILE)".into(),
                    )
                })?;
                tpm::AzureHardware::tdx(
                    read_input(quote, "TD quote")?,
                    read_input(collateral, "collateral")?,
                )
            };
            Box::new(tpm::TpmAttester::azure(
                tee,
                Box::new(tpm::DeviceTransport::new(&opts.tpm_device)),
                handle,
                pcrs,
                hardware,
            )?)
        }
        TeeKind::Sim => {
            return Err(CollectError::Usage(
                "the sim TEE signs with a key, it has no device to collect from".into(),
            )
            .into());
        }
    };
    Ok(attester)
}
