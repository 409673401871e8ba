//! SEV-SNP and TDX evidence through Linux configfs-tsm (kernel 6.7+,
//! Documentation/ABI/testing/configfs-tsm-report): make a report instance directory, write the
//! 64-byte binding to `inblob` (and the VMPL to `privlevel`), read `outblob` (the SEV-SNP
//! ATTESTATION_REPORT or the TDX quote) and `auxblob` (SEV-SNP: the host's certificate table),
//! check `generation` to detect another writer, remove the directory.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::CollectError;
use crate::attest::{snp, tdx};
use crate::client::ClientError;
use crate::client::node::Attester;

/// `provider` of the SEV-SNP guest driver (drivers/virt/coco/sev-guest).
pub const SNP_PROVIDER: &str = "sev_guest";
/// `provider` of the TDX guest driver (drivers/virt/coco/tdx-guest).
pub const TDX_PROVIDER: &str = "tdx_guest";
/// Attempts before a concurrent writer is reported.
pub const ATTEMPTS: u32 = 3;
/// configfs creates the attributes with the directory and counts writes synchronously; this
/// bounds the wait on a filesystem that does either later, then the attempt fails.
const SETTLE: Duration = Duration::from_secs(5);
const POLL: Duration = Duration::from_millis(1);
pub(crate) const HINT: &str = "configfs-tsm needs Linux 6.7 or later inside an SEV-SNP or TDX guest, with \
                    configfs mounted on /sys/kernel/config; see --tsm-dir";

/// What one report instance produced.
pub struct TsmReport {
    pub outblob: Vec<u8>,
    /// Empty when the provider emits none.
    pub auxblob: Vec<u8>,
}

/// Removes the report instance whatever happens; configfs frees it with the directory.
struct Instance(PathBuf);

impl Drop for Instance {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir(&self.0) {
            tracing::warn!(path = %self.0.display(), error = %e, "could not remove the configfs-tsm report instance");
        }
    }
}

fn read_generation(path: &Path) -> Result<u64, CollectError> {
    let text = std::fs::read_to_string(path).map_err(|e| CollectError::io(path, e, HINT))?;
    text.trim().parse().map_err(|_| {
        CollectError::Device(format!(
            "{}: {:?} is not a generation number",
            path.display(),
            text.trim()
        ))
    })
}

/// Writes an attribute in place: configfs attributes exist already and are never truncated.
fn write_attr(path: &Path, value: &[u8]) -> Result<(), CollectError> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(|e| CollectError::io(path, e, HINT))?;
    f.write_all(value)
        .map_err(|e| CollectError::io(path, e, HINT))
}

/// Polls `generation` until it is at least `at_least` or [`SETTLE`] passed; returns the last
/// value read.
fn settle_generation(path: &Path, at_least: u64) -> Result<u64, CollectError> {
    let start = Instant::now();
    loop {
        let g = match read_generation(path) {
            Err(CollectError::Missing { .. }) if start.elapsed() < SETTLE => None,
            other => Some(other?),
        };
        match g {
            Some(g) if g >= at_least || start.elapsed() >= SETTLE => return Ok(g),
            _ => std::thread::sleep(POLL),
        }
    }
}

/// Runs one configfs-tsm report request for `inblob` and returns its blobs.
pub fn generate(
    root: &Path,
    provider: &'static str,
    inblob: &[u8; 64],
    privlevel: Option<u8>,
) -> Result<TsmReport, CollectError> {
    let meta = std::fs::metadata(root).map_err(|e| CollectError::io(root, e, HINT))?;
    if !meta.is_dir() {
        return Err(CollectError::Usage(format!(
            "{}: not a directory ({HINT})",
            root.display()
        )));
    }
    let tag = crate::grant::random::<8>()
        .map_err(|_| CollectError::Device("no randomness for the instance name".into()))?;
    // One instance per request: the ABI's way to avoid sharing it with another requester.
    let dir = root.join(format!(
        "weightvault-{}-{}",
        std::process::id(),
        hex::encode(tag)
    ));
    std::fs::create_dir(&dir).map_err(|e| CollectError::io(&dir, e, HINT))?;
    let _instance = Instance(dir.clone());
    let generation = dir.join("generation");
    settle_generation(&generation, 0)?;
    let provider_path = dir.join("provider");
    let found = std::fs::read_to_string(&provider_path)
        .map_err(|e| CollectError::io(&provider_path, e, HINT))?;
    if found.trim() != provider {
        return Err(CollectError::Provider {
            path: provider_path.display().to_string(),
            found: found.trim().chars().take(64).collect(),
            expected: provider,
        });
    }
    let mut last = (0, 0);
    for _ in 0..ATTEMPTS {
        // configfs-tsm-report, generation: read it before writing, and after reading outblob
        // it must have grown by exactly our writes; otherwise someone else wrote in between.
        let before = read_generation(&generation)?;
        let mut writes = 0;
        if let Some(level) = privlevel {
            write_attr(&dir.join("privlevel"), format!("{level}\n").as_bytes())?;
            writes += 1;
        }
        write_attr(&dir.join("inblob"), inblob)?;
        writes += 1;
        let expected = before + writes;
        let seen = settle_generation(&generation, expected)?;
        if seen != expected {
            last = (seen, expected);
            continue;
        }
        let out_path = dir.join("outblob");
        let outblob = std::fs::read(&out_path).map_err(|e| CollectError::io(&out_path, e, HINT))?;
        let aux_path = dir.join("auxblob");
        let auxblob = match std::fs::read(&aux_path) {
            Ok(b) => b,
            // Only some providers have the attribute.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(CollectError::io(&aux_path, e, HINT)),
        };
        let after = read_generation(&generation)?;
        if after != expected {
            last = (after, expected);
            continue;
        }
        return Ok(TsmReport { outblob, auxblob });
    }
    Err(CollectError::Race {
        path: dir.display().to_string(),
        found: last.0,
        expected: last.1,
        attempts: ATTEMPTS,
    })
}

/// GUIDs of the SEV-SNP certificate table (GHCB specification 56421, "SNP Extended Guest
/// Request", certificate table; the GUID values are AMD's).
const GUID_VCEK: &str = "63da758d-e664-4564-adc5-f4b93be8accd";
const GUID_VLEK: &str = "a8074bc2-a25a-483e-aae6-39c045a0b8a1";
const GUID_ASK: &str = "4ab7b379-bbac-4fe4-a02f-05aef327c782";
const GUID_ARK: &str = "c0b406a4-a803-4952-9743-3fb6014cd0ae";
const TABLE_ENTRY_LEN: usize = 24;
/// More entries than any host sends (VCEK, VLEK, ASK, ARK, ASVK, CRL and a few vendor ones).
const MAX_TABLE_ENTRIES: usize = 32;

/// The GUID in both byte orders hosts write it in: RFC 9562 order and the little-endian first
/// three fields of Microsoft/UEFI GUIDs.
fn guid_names(raw: &[u8; 16]) -> [String; 2] {
    let fmt = |b: &[u8]| {
        format!(
            "{}-{}-{}-{}-{}",
            hex::encode(&b[0..4]),
            hex::encode(&b[4..6]),
            hex::encode(&b[6..8]),
            hex::encode(&b[8..10]),
            hex::encode(&b[10..16])
        )
    };
    let mut mixed = *raw;
    mixed[0..4].reverse();
    mixed[4..6].reverse();
    mixed[6..8].reverse();
    [fmt(raw), fmt(&mixed)]
}

/// The certificates of an SEV-SNP certificate table, by kind.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct CertTable {
    pub vcek: Option<Vec<u8>>,
    pub vlek: Option<Vec<u8>>,
    /// ASK and ARK, in table order.
    pub chain: Vec<Vec<u8>>,
}

/// The certificates of a certificate table by kind. Entries are
/// `GUID (16) ‖ offset (u32 LE) ‖ length (u32 LE)`, offsets from the start of the table, ended by
/// an all-zero entry; unknown GUIDs (ASVK, CRLs) are skipped.
pub fn parse_cert_table(table: &[u8]) -> Result<CertTable, CollectError> {
    let bad = |d: &str| CollectError::Device(format!("auxblob certificate table: {d}"));
    let mut out = CertTable::default();
    for i in 0.. {
        if i == MAX_TABLE_ENTRIES {
            return Err(bad("too many entries"));
        }
        let entry = table
            .get(i * TABLE_ENTRY_LEN..(i + 1) * TABLE_ENTRY_LEN)
            .ok_or_else(|| bad("no terminating entry"))?;
        if entry.iter().all(|b| *b == 0) {
            break;
        }
        let guid: [u8; 16] = entry[..16].try_into().expect("16 bytes");
        let offset = u32::from_le_bytes(entry[16..20].try_into().expect("4 bytes")) as usize;
        let len = u32::from_le_bytes(entry[20..24].try_into().expect("4 bytes")) as usize;
        let cert = offset
            .checked_add(len)
            .and_then(|end| table.get(offset..end))
            .ok_or_else(|| bad("entry points outside the table"))?
            .to_vec();
        let names = guid_names(&guid);
        let is = |g: &str| names.iter().any(|n| n == g);
        if is(GUID_VCEK) {
            out.vcek = Some(cert);
        } else if is(GUID_VLEK) {
            out.vlek = Some(cert);
        } else if is(GUID_ASK) || is(GUID_ARK) {
            out.chain.push(cert);
        }
    }
    Ok(out)
}

enum Kind {
    Snp {
        privlevel: Option<u8>,
        certs: Vec<Vec<u8>>,
    },
    Tdx {
        collateral: Vec<u8>,
    },
}

/// SEV-SNP or TDX evidence from configfs-tsm, in the vault's bundle form.
pub struct TsmAttester {
    root: PathBuf,
    kind: Kind,
}

impl TsmAttester {
    /// `certs`: VCEK/VLEK (and optionally ASK/ARK) to use when the host's certificate table
    /// has none.
    pub fn snp(
        root: &Path,
        privlevel: Option<u8>,
        certs: Vec<Vec<u8>>,
    ) -> Result<Self, CollectError> {
        if privlevel.is_some_and(|p| p > 3) {
            return Err(CollectError::Usage(
                "privlevel (SEV-SNP VMPL) must be 0..=3".into(),
            ));
        }
        Ok(Self {
            root: root.to_path_buf(),
            kind: Kind::Snp { privlevel, certs },
        })
    }

    /// `collateral`: dcap-qvl collateral JSON for this platform's FMSPC.
    pub fn tdx(root: &Path, collateral: Vec<u8>) -> Result<Self, CollectError> {
        // Refuse a collateral file the verifier would not read before any quote is made.
        serde_json::from_slice::<serde_json::Value>(&collateral)
            .ok()
            .filter(serde_json::Value::is_object)
            .ok_or_else(|| CollectError::Usage("collateral is not a JSON object".into()))?;
        Ok(Self {
            root: root.to_path_buf(),
            kind: Kind::Tdx { collateral },
        })
    }

    /// The evidence bundle for `report_data`.
    pub fn collect(&self, report_data: &[u8; 64]) -> Result<Vec<u8>, CollectError> {
        match &self.kind {
            Kind::Snp { privlevel, certs } => {
                let r = generate(&self.root, SNP_PROVIDER, report_data, *privlevel)?;
                snp_bundle(&r, report_data, certs)
            }
            Kind::Tdx { collateral } => {
                let r = generate(&self.root, TDX_PROVIDER, report_data, None)?;
                tdx_bundle(&r.outblob, report_data, collateral)
            }
        }
    }
}

fn snp_bundle(
    r: &TsmReport,
    report_data: &[u8; 64],
    files: &[Vec<u8>],
) -> Result<Vec<u8>, CollectError> {
    let n = snp::REPORT_LEN;
    if r.outblob.len() < n || r.outblob[n..].iter().any(|b| *b != 0) {
        return Err(CollectError::Device(format!(
            "outblob is {} bytes, not a {n}-byte SEV-SNP ATTESTATION_REPORT",
            r.outblob.len()
        )));
    }
    let report = &r.outblob[..n];
    // AMD SEV-SNP ABI 56860, ATTESTATION_REPORT: REPORT_DATA at 50h..90h.
    if report[0x50..0x90] != report_data[..] {
        return Err(CollectError::Device(
            "the SEV-SNP report does not carry the requested report data".into(),
        ));
    }
    let parsed = snp::Report::parse(report)
        .map_err(|e| CollectError::Device(format!("SEV-SNP report: {e}")))?;
    let signer = parsed
        .signing_key()
        .map_err(|e| CollectError::Device(format!("SEV-SNP report: {e}")))?;
    let CertTable { vcek, vlek, chain } = if r.auxblob.is_empty() {
        CertTable::default()
    } else {
        parse_cert_table(&r.auxblob)?
    };
    let key = match signer {
        snp::SigningKey::Vcek => vcek,
        snp::SigningKey::Vlek => vlek,
    };
    let mut certs: Vec<Vec<u8>> = match key {
        Some(k) => std::iter::once(k).chain(chain).collect(),
        None if !files.is_empty() => files.to_vec(),
        None => {
            return Err(CollectError::Usage(format!(
                "the host supplied no {} certificate (auxblob) and none was given \
                 (--certs FILE, from AMD's KDS for this chip and TCB)",
                signer.as_str().to_uppercase()
            )));
        }
    };
    certs.dedup();
    snp::bundle_from_inputs(report, &certs, None)
        .map_err(|e| CollectError::Device(format!("SEV-SNP evidence: {e}")))
}

/// Intel TDX DCAP Quoting Library API §A.3: a 48-byte header, then (v5) a 6-byte body
/// descriptor, then the TD report body whose REPORTDATA is its last 64 of 584 bytes.
fn tdx_report_data(quote: &[u8]) -> Option<&[u8]> {
    let version = u16::from_le_bytes(quote.get(0..2)?.try_into().ok()?);
    let body = match version {
        4 => 48,
        5 => 48 + 6,
        _ => return None,
    };
    quote.get(body + 520..body + 584)
}

fn tdx_bundle(
    quote: &[u8],
    report_data: &[u8; 64],
    collateral: &[u8],
) -> Result<Vec<u8>, CollectError> {
    let rd = tdx_report_data(quote).ok_or_else(|| {
        CollectError::Device(format!(
            "outblob is {} bytes, not a TDX quote (version 4 or 5)",
            quote.len()
        ))
    })?;
    if rd != report_data {
        return Err(CollectError::Device(
            "the TDX quote does not carry the requested report data".into(),
        ));
    }
    tdx::bundle_from_inputs(quote, &[], Some(collateral))
        .map_err(|e| CollectError::Device(format!("TDX evidence: {e}")))
}

impl Attester for TsmAttester {
    fn tee(&self) -> &str {
        match self.kind {
            Kind::Snp { .. } => "snp",
            Kind::Tdx { .. } => "tdx",
        }
    }

    fn evidence(&self, report_data: &[u8; 64]) -> Result<Vec<u8>, ClientError> {
        Ok(self.collect(report_data)?)
    }
}
