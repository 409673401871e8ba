//! The SEV-SNP `ATTESTATION_REPORT` as the AMD Secure Processor signs it: a fixed 1184-byte
//! little-endian layout, parsed here by offset (AMD SEV-SNP ABI spec (56860), table
//! "ATTESTATION_REPORT Structure"). Nothing here is trusted until the signature over
//! `[0, SIGNED_LEN)` has been checked with a key that chains to a pinned AMD root.

use super::SnpProduct;
use crate::attest::AttestError;

/// Length of a report (56860, "ATTESTATION_REPORT Structure": 0h..49Fh).
pub const REPORT_LEN: usize = 0x4A0;
/// The signature covers bytes `0h..29Fh` (56860, "ATTESTATION_REPORT Structure", SIGNATURE).
pub const SIGNED_LEN: usize = 0x2A0;
/// Report versions whose layout this parser knows (2: original; 3/4: CPUID fields; 5: mitigation
/// vectors). Fields past 0x1F8 differ between them but lie outside what we read.
pub const MAX_KNOWN_VERSION: u32 = 5;

/// GUEST_POLICY bit 19: DEBUG (56860, "GUEST_POLICY Structure").
pub const POLICY_DEBUG: u64 = 1 << 19;
/// GUEST_POLICY bit 18: MIGRATE_MA, a migration agent may be associated with the guest.
pub const POLICY_MIGRATE_MA: u64 = 1 << 18;

/// Which key the firmware signed with (56860, "ATTESTATION_REPORT Structure", SIGNING_KEY, bits 4:2
/// at 48h).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SigningKey {
    Vcek,
    Vlek,
}

impl SigningKey {
    pub fn as_str(self) -> &'static str {
        match self {
            SigningKey::Vcek => "vcek",
            SigningKey::Vlek => "vlek",
        }
    }
}

/// A decoded TCB_VERSION (56860, "TCB_VERSION Structure"; the Turin layout adds FMC and moves
/// the fields).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tcb {
    pub bootloader: u8,
    pub tee: u8,
    pub snp: u8,
    pub microcode: u8,
    /// Turin and later only.
    pub fmc: Option<u8>,
}

impl Tcb {
    /// Decodes the raw 8 bytes for `product`. Reserved bytes must be zero: they are not covered by
    /// the VCEK's TCB extensions, so a non-zero value would be an uncertified claim.
    pub fn decode(raw: [u8; 8], product: SnpProduct) -> Result<Tcb, AttestError> {
        let (tcb, reserved) = match product {
            // Milan and Genoa: BOOT_LOADER, TEE, 4 reserved, SNP, MICROCODE.
            SnpProduct::Milan | SnpProduct::Genoa => (
                Tcb {
                    bootloader: raw[0],
                    tee: raw[1],
                    snp: raw[6],
                    microcode: raw[7],
                    fmc: None,
                },
                &raw[2..6],
            ),
            // Turin: FMC, BOOT_LOADER, TEE, SNP, 3 reserved, MICROCODE.
            SnpProduct::Turin => (
                Tcb {
                    fmc: Some(raw[0]),
                    bootloader: raw[1],
                    tee: raw[2],
                    snp: raw[3],
                    microcode: raw[7],
                },
                &raw[4..7],
            ),
        };
        if reserved.iter().any(|b| *b != 0) {
            return Err(AttestError::Malformed(
                "reserved TCB_VERSION bytes are not zero".into(),
            ));
        }
        Ok(tcb)
    }
}

/// The fields of a report that the verifier uses. TCB values stay raw until the product is known
/// from the certificate chain.
#[derive(Clone, Debug)]
pub struct Report {
    pub version: u32,
    pub guest_svn: u32,
    pub policy: u64,
    pub family_id: [u8; 16],
    pub image_id: [u8; 16],
    pub vmpl: u32,
    pub sig_algo: u32,
    pub platform_info: u64,
    pub key_info: u32,
    pub report_data: [u8; 64],
    pub measurement: [u8; 48],
    pub host_data: [u8; 32],
    pub id_key_digest: [u8; 48],
    pub author_key_digest: [u8; 48],
    pub reported_tcb: [u8; 8],
    /// (family, model, stepping), version 3 and later.
    pub cpuid: Option<(u8, u8, u8)>,
    pub chip_id: [u8; 64],
    /// CURRENT_MAJOR.CURRENT_MINOR.CURRENT_BUILD of the SNP firmware.
    pub current_version: (u8, u8, u8),
    /// ECDSA P-384 r and s, each as 72 little-endian bytes (56860, "ECDSA P-384 with SHA-384
    /// Signature Format").
    pub sig_r: [u8; 72],
    pub sig_s: [u8; 72],
}

fn take<const N: usize>(b: &[u8; REPORT_LEN], off: usize) -> [u8; N] {
    let mut out = [0u8; N];
    out.copy_from_slice(&b[off..off + N]);
    out
}

fn u32_at(b: &[u8; REPORT_LEN], off: usize) -> u32 {
    u32::from_le_bytes(take(b, off))
}

fn u64_at(b: &[u8; REPORT_LEN], off: usize) -> u64 {
    u64::from_le_bytes(take(b, off))
}

impl Report {
    /// Parses the fixed layout. Checks only structure: length, known version, signature algorithm,
    /// VMPL range, canonical signature padding.
    pub fn parse(bytes: &[u8]) -> Result<Report, AttestError> {
        let b: &[u8; REPORT_LEN] = bytes.try_into().map_err(|_| {
            AttestError::Malformed(format!(
                "report is {} bytes, expected {REPORT_LEN}",
                bytes.len()
            ))
        })?;
        let version = u32_at(b, 0x00);
        // 56860, "ATTESTATION_REPORT Structure": VERSION is 2 or later; older layouts were never
        // released and later ones are unknown to this parser.
        if !(2..=MAX_KNOWN_VERSION).contains(&version) {
            return Err(AttestError::Malformed(format!(
                "unsupported report version {version}"
            )));
        }
        let vmpl = u32_at(b, 0x30);
        // VMPL is 0..=3 (56860, "ATTESTATION_REPORT Structure", VMPL).
        if vmpl > 3 {
            return Err(AttestError::Malformed(format!("VMPL {vmpl} out of range")));
        }
        let sig_algo = u32_at(b, 0x34);
        // 56860, "Signature Algorithm Encodings": 1 = ECDSA P-384 with SHA-384, the only one.
        if sig_algo != 1 {
            return Err(AttestError::Malformed(format!(
                "unsupported signature algorithm {sig_algo}"
            )));
        }
        let sig_r: [u8; 72] = take(b, 0x2A0);
        let sig_s: [u8; 72] = take(b, 0x2E8);
        // The rest of the 512-byte signature field is reserved and unsigned: demand zeros so that
        // one signed report has exactly one accepted encoding (and one evidence hash).
        if b[0x330..].iter().any(|x| *x != 0) {
            return Err(AttestError::Malformed(
                "reserved signature bytes are not zero".into(),
            ));
        }
        let cpuid = (version >= 3).then(|| (b[0x188], b[0x189], b[0x18A]));
        Ok(Report {
            version,
            guest_svn: u32_at(b, 0x04),
            policy: u64_at(b, 0x08),
            family_id: take(b, 0x10),
            image_id: take(b, 0x20),
            vmpl,
            sig_algo,
            platform_info: u64_at(b, 0x40),
            key_info: u32_at(b, 0x48),
            report_data: take(b, 0x50),
            measurement: take(b, 0x90),
            host_data: take(b, 0xC0),
            id_key_digest: take(b, 0xE0),
            author_key_digest: take(b, 0x110),
            reported_tcb: take(b, 0x180),
            cpuid,
            chip_id: take(b, 0x1A0),
            current_version: (b[0x1EA], b[0x1E9], b[0x1E8]),
            sig_r,
            sig_s,
        })
    }

    /// SIGNING_KEY (bits 4:2 at 48h): 0 VCEK, 1 VLEK, 7 none; MASK_CHIP_KEY (bit 1) zeroes the
    /// signature (56860, "ATTESTATION_REPORT Structure").
    pub fn signing_key(&self) -> Result<SigningKey, AttestError> {
        if self.key_info & 0b10 != 0 {
            return Err(AttestError::UntrustedKey);
        }
        match (self.key_info >> 2) & 0b111 {
            0 => Ok(SigningKey::Vcek),
            1 => Ok(SigningKey::Vlek),
            7 => Err(AttestError::UntrustedKey),
            other => Err(AttestError::Malformed(format!(
                "unknown SIGNING_KEY value {other}"
            ))),
        }
    }

    /// The signature as the fixed 96-byte big-endian `r || s` that
    /// `ECDSA_P384_SHA384_FIXED` takes. r and s are 72-byte little-endian fields of which only the
    /// low 48 bytes may be non-zero for P-384 (56860, "ECDSA P-384 with SHA-384 Signature
    /// Format").
    pub fn signature_fixed(&self) -> Result<[u8; 96], AttestError> {
        let mut out = [0u8; 96];
        for (half, field) in [&self.sig_r, &self.sig_s].into_iter().enumerate() {
            if field[48..].iter().any(|x| *x != 0) {
                return Err(AttestError::BadSignature);
            }
            for i in 0..48 {
                out[half * 48 + i] = field[47 - i];
            }
        }
        Ok(out)
    }

    /// The product the CPUID fields name (version 3 and later), as AMD's family/model ranges.
    pub fn cpuid_product(&self) -> Option<Result<SnpProduct, (u8, u8)>> {
        let (family, model, _) = self.cpuid?;
        Some(match (family, model) {
            (0x19, 0x00..=0x0F) => Ok(SnpProduct::Milan),
            (0x19, 0x10..=0x1F | 0xA0..=0xAF) => Ok(SnpProduct::Genoa),
            (0x1A, 0x00..=0x11) => Ok(SnpProduct::Turin),
            other => Err(other),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn template() -> Vec<u8> {
        let mut b = vec![0u8; REPORT_LEN];
        b[0] = 2;
        b[0x34] = 1;
        b
    }

    #[test]
    fn parses_minimal_report() {
        let r = Report::parse(&template()).unwrap();
        assert_eq!(r.version, 2);
        assert_eq!(r.cpuid, None);
        assert_eq!(r.signing_key().unwrap(), SigningKey::Vcek);
    }

    #[test]
    fn rejects_wrong_lengths_and_layouts() {
        for len in [0, 1, REPORT_LEN - 1, REPORT_LEN + 1, 4096] {
            assert!(matches!(
                Report::parse(&vec![0u8; len]),
                Err(AttestError::Malformed(_))
            ));
        }
        for (off, val) in [(0usize, 1u8), (0, 6), (0x30, 4), (0x34, 2), (0x400, 1)] {
            let mut b = template();
            b[off] = val;
            assert!(
                matches!(Report::parse(&b), Err(AttestError::Malformed(_))),
                "offset {off:#x} value {val}"
            );
        }
    }

    #[test]
    fn signing_key_field() {
        let mut b = template();
        b[0x48] = 1 << 2;
        assert_eq!(
            Report::parse(&b).unwrap().signing_key().unwrap(),
            SigningKey::Vlek
        );
        b[0x48] = 7 << 2;
        assert_eq!(
            Report::parse(&b).unwrap().signing_key(),
            Err(AttestError::UntrustedKey)
        );
        b[0x48] = 0b10;
        assert_eq!(
            Report::parse(&b).unwrap().signing_key(),
            Err(AttestError::UntrustedKey)
        );
        b[0x48] = 3 << 2;
        assert!(matches!(
            Report::parse(&b).unwrap().signing_key(),
            Err(AttestError::Malformed(_))
        ));
    }

    #[test]
    fn signature_is_reversed_and_padding_checked() {
        let mut b = template();
        b[0x2A0] = 0xAA; // least significant byte of r
        b[0x2A0 + 47] = 0xBB; // most significant byte of r
        b[0x2E8] = 0xCC;
        let sig = Report::parse(&b).unwrap().signature_fixed().unwrap();
        assert_eq!((sig[0], sig[47], sig[95]), (0xBB, 0xAA, 0xCC));
        b[0x2A0 + 48] = 1;
        assert_eq!(
            Report::parse(&b).unwrap().signature_fixed(),
            Err(AttestError::BadSignature)
        );
    }

    #[test]
    fn tcb_layouts() {
        let raw = [3, 0, 0, 0, 0, 0, 8, 115];
        assert_eq!(
            Tcb::decode(raw, SnpProduct::Milan).unwrap(),
            Tcb {
                bootloader: 3,
                tee: 0,
                snp: 8,
                microcode: 115,
                fmc: None
            }
        );
        assert!(Tcb::decode(raw, SnpProduct::Turin).is_err());
        let turin = [1, 2, 3, 4, 0, 0, 0, 9];
        assert_eq!(
            Tcb::decode(turin, SnpProduct::Turin).unwrap(),
            Tcb {
                fmc: Some(1),
                bootloader: 2,
                tee: 3,
                snp: 4,
                microcode: 9
            }
        );
        assert!(Tcb::decode([0, 0, 1, 0, 0, 0, 0, 0], SnpProduct::Genoa).is_err());
    }

    #[test]
    fn cpuid_products() {
        let mut b = template();
        b[0] = 3;
        for (fam, model, want) in [
            (0x19, 0x01, Some(SnpProduct::Milan)),
            (0x19, 0x11, Some(SnpProduct::Genoa)),
            (0x19, 0xA0, Some(SnpProduct::Genoa)),
            (0x1A, 0x02, Some(SnpProduct::Turin)),
            (0x17, 0x31, None),
        ] {
            b[0x188] = fam;
            b[0x189] = model;
            let got = Report::parse(&b).unwrap().cpuid_product().unwrap().ok();
            assert_eq!(got, want);
        }
    }
}
