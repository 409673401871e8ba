//! What an SEV-SNP report must meet beyond a valid signature: VMPL, report version, guest policy
//! bits and a minimum TCB per product. Defaults are strict; every field is documented in
//! docs/attestation/snp.md.

use serde::{Deserialize, Serialize};

use super::SnpProduct;
use super::report::{MAX_KNOWN_VERSION, Tcb};
use crate::attest::AttestError;

/// A minimum TCB. Each reported component must be at or above its floor (SVNs are compared per
/// component, never as one packed integer: AMD SVNs are independent counters).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnpTcbFloor {
    pub bootloader: u8,
    pub tee: u8,
    pub snp: u8,
    pub microcode: u8,
    /// Turin and later; must be 0 (or absent) for Milan and Genoa.
    #[serde(default)]
    pub fmc: u8,
}

/// Floors per product. A product without a floor is rejected: the vault does not accept a
/// generation nobody has decided a minimum for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnpTcbFloors {
    #[serde(default)]
    pub milan: Option<SnpTcbFloor>,
    #[serde(default)]
    pub genoa: Option<SnpTcbFloor>,
    #[serde(default)]
    pub turin: Option<SnpTcbFloor>,
}

impl Default for SnpTcbFloors {
    fn default() -> Self {
        Self {
            // AMD-SB-3019 (CVE-2024-56161): SNP SVN 0x18 is the Milan floor microsoft/CCF#6812
            // cites; boot loader 4 and microcode 0xDB as in Microsoft's Milan minimum-TCB example
            // (04000000000018db). See docs/attestation/snp.md.
            milan: Some(SnpTcbFloor {
                bootloader: 4,
                tee: 0,
                snp: 0x18,
                microcode: 0xDB,
                fmc: 0,
            }),
            // No floor is pinned for Genoa or Turin in this build: an operator sets one from
            // AMD's current security bulletins before such nodes can attest.
            genoa: None,
            turin: None,
        }
    }
}

impl SnpTcbFloors {
    pub fn get(&self, product: SnpProduct) -> Option<&SnpTcbFloor> {
        match product {
            SnpProduct::Milan => self.milan.as_ref(),
            SnpProduct::Genoa => self.genoa.as_ref(),
            SnpProduct::Turin => self.turin.as_ref(),
        }
    }
}

/// An operator-supplied root set for one product: PEM text with the self-signed ARK and,
/// optionally, the ASK and ASVK it signed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnpRootOverride {
    pub product: SnpProduct,
    pub pem: String,
}

/// SEV-SNP verifier policy.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SnpPolicy {
    /// VMPLs a report may come from. Default `[0]`: only the most privileged level, which a
    /// paravisor or SVSM cannot impersonate.
    pub allowed_vmpls: Vec<u32>,
    /// Lowest accepted report VERSION. Default 2 (every released firmware). Trustee requires 3
    /// (the first with CPUID fields, so the CPU generation is in the signed report); set 3 to
    /// match it.
    pub min_report_version: u32,
    /// Accept reports signed with a VLEK (cloud-provider key, chains to the ASVK). Default true.
    pub allow_vlek: bool,
    /// Accept guests whose policy allows a migration agent (GUEST_POLICY.MIGRATE_MA). Default
    /// false: a migration agent can export the guest's memory.
    pub allow_migration_agent: bool,
    /// Accept reports whose CHIP_ID is all zero (MASK_CHIP_ID set on the host). Default false: a
    /// VCEK report then cannot be tied to a chip, and claims would carry no instance id.
    pub allow_masked_chip_id: bool,
    /// Minimum reported TCB per product.
    pub min_tcb: SnpTcbFloors,
    /// Replaces the pinned AMD roots when non-empty.
    pub roots: Vec<SnpRootOverride>,
}

impl Default for SnpPolicy {
    fn default() -> Self {
        Self {
            allowed_vmpls: vec![0],
            min_report_version: 2,
            allow_vlek: true,
            allow_migration_agent: false,
            allow_masked_chip_id: false,
            min_tcb: SnpTcbFloors::default(),
            roots: Vec::new(),
        }
    }
}

fn config_err(detail: impl Into<String>) -> AttestError {
    AttestError::Policy {
        rule: "invalid snp policy",
        detail: detail.into(),
    }
}

impl SnpPolicy {
    /// Rejects settings that cannot be meant.
    pub fn validate(&self) -> Result<(), AttestError> {
        if self.allowed_vmpls.iter().any(|v| *v > 3) {
            return Err(config_err("allowed_vmpls holds a value above 3"));
        }
        if !(2..=MAX_KNOWN_VERSION).contains(&self.min_report_version) {
            return Err(config_err(format!(
                "min_report_version must be 2..={MAX_KNOWN_VERSION}"
            )));
        }
        for (product, floor) in [
            (SnpProduct::Milan, &self.min_tcb.milan),
            (SnpProduct::Genoa, &self.min_tcb.genoa),
        ] {
            if floor.is_some_and(|f| f.fmc != 0) {
                return Err(config_err(format!(
                    "{product} has no FMC; its fmc floor must be 0"
                )));
            }
        }
        Ok(())
    }

    /// The reported TCB meets the product's floor, component by component.
    pub fn check_tcb(&self, product: SnpProduct, tcb: &Tcb) -> Result<(), AttestError> {
        let Some(floor) = self.min_tcb.get(product) else {
            return Err(AttestError::Policy {
                rule: "no minimum tcb configured for this cpu",
                detail: format!("min_tcb.{product} is not set"),
            });
        };
        let checks = [
            ("bootloader", tcb.bootloader, floor.bootloader),
            ("tee", tcb.tee, floor.tee),
            ("snp", tcb.snp, floor.snp),
            ("microcode", tcb.microcode, floor.microcode),
            ("fmc", tcb.fmc.unwrap_or(0), floor.fmc),
        ];
        for (name, got, min) in checks {
            if got < min {
                return Err(AttestError::Policy {
                    rule: "tcb below minimum",
                    detail: format!("{product} {name} {got} < {min}"),
                });
            }
        }
        Ok(())
    }
}
