//! The AMD key hierarchy: ARK (self-signed root, one per product) → ASK (signs VCEKs) or ASVK
//! (signs VLEKs) → VCEK/VLEK (ECDSA P-384, signs reports). AMD Versioned Chip Endorsement Key
//! (VCEK) Certificate and KDS Interface Specification (57230), "Certificate Chain" and "VCEK
//! Certificate Extensions"; VLEK: 57230, "VLEK Certificate".
//!
//! Roots and intermediates are parsed and verified once, when the verifier is built; each
//! verification then checks only the leaf (and any intermediate the bundle brings that is not
//! already pinned).

use x509_parser::certificate::X509Certificate;
use x509_parser::der_parser::der::{parse_der_ia5string, parse_der_integer, parse_der_octetstring};
use x509_parser::oid_registry::{
    OID_KEY_TYPE_EC_PUBLIC_KEY, OID_NIST_EC_P384, OID_NIST_HASH_SHA384, OID_PKCS1_RSASSAPSS,
    OID_SIG_ECDSA_WITH_SHA384, OID_X509_EXT_BASIC_CONSTRAINTS, OID_X509_EXT_KEY_USAGE,
};
use x509_parser::pem::Pem;
use x509_parser::prelude::FromDer;
use x509_parser::signature_algorithm::RsaSsaPssParams;
use x509_parser::x509::{AlgorithmIdentifier, SubjectPublicKeyInfo};

use super::SnpProduct;
use super::report::SigningKey;
use crate::attest::AttestError;

/// Upper bound on one certificate; AMD's are under 2 KiB.
pub const MAX_CERT_LEN: usize = 8 * 1024;

/// A CA certificate kept in parsed-out, owned form.
#[derive(Clone, Debug)]
struct Ca {
    product: SnpProduct,
    der: Vec<u8>,
    subject: Vec<u8>,
    spki: Vec<u8>,
    not_before: i64,
    not_after: i64,
}

/// An ASK or ASVK, already verified under `anchor`.
#[derive(Clone, Debug)]
struct Intermediate {
    ca: Ca,
    signs: SigningKey,
    anchor: usize,
}

/// The pinned ARKs and the intermediates verified under them.
#[derive(Debug)]
pub struct TrustStore {
    anchors: Vec<Ca>,
    intermediates: Vec<Intermediate>,
}

/// The TCB a VCEK/VLEK certifies (57230, "VCEK Certificate Extensions").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CertTcb {
    pub bootloader: u8,
    pub tee: u8,
    pub snp: u8,
    pub microcode: u8,
    pub fmc: Option<u8>,
}

/// A VCEK or VLEK whose chain to a pinned ARK has been verified.
#[derive(Clone, Debug)]
pub struct EndorsementKey {
    pub product: SnpProduct,
    pub kind: SigningKey,
    /// SEC1 uncompressed P-384 point.
    pub point: Vec<u8>,
    pub tcb: CertTcb,
    /// hwID extension: 64 bytes (Milan, Genoa) or 8 (Turin); VCEK only.
    pub hwid: Option<Vec<u8>>,
    /// productName extension, e.g. `Milan-B0`.
    pub product_name: Option<String>,
}

fn chain_err(detail: impl Into<String>) -> AttestError {
    AttestError::Chain(detail.into())
}

pub fn parse_cert(der: &[u8]) -> Result<X509Certificate<'_>, AttestError> {
    if der.len() > MAX_CERT_LEN {
        return Err(AttestError::Malformed("certificate too large".into()));
    }
    match X509Certificate::from_der(der) {
        Ok((&[], cert)) => Ok(cert),
        _ => Err(AttestError::Malformed(
            "certificate is not DER X.509".into(),
        )),
    }
}

/// Every certificate in a PEM text, as DER.
pub fn pem_certs(pem: &[u8]) -> Result<Vec<Vec<u8>>, AttestError> {
    let mut out = Vec::new();
    for item in Pem::iter_from_buffer(pem) {
        let item = item.map_err(|_| AttestError::Malformed("bad PEM".into()))?;
        if item.label == "CERTIFICATE" {
            out.push(item.contents);
        }
    }
    Ok(out)
}

fn common_name(name: &x509_parser::x509::X509Name<'_>) -> Option<String> {
    name.iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .map(str::to_owned)
}

/// Signature algorithms accepted in the chain: RSASSA-PSS with SHA-384 (what AMD uses, 57230
/// "Certificate Chain") and ECDSA with SHA-384 (for operator roots); never SHA-1, SHA-256 or
/// PKCS#1 v1.5.
fn allowed_algorithm(alg: &AlgorithmIdentifier<'_>) -> bool {
    if alg.algorithm == OID_PKCS1_RSASSAPSS {
        alg.parameters
            .as_ref()
            .and_then(|p| RsaSsaPssParams::try_from(p).ok())
            .is_some_and(|p| *p.hash_algorithm_oid() == OID_NIST_HASH_SHA384)
    } else {
        alg.algorithm == OID_SIG_ECDSA_WITH_SHA384 && alg.parameters.is_none()
    }
}

/// Verifies `cert`'s signature with `issuer_spki` (DER SubjectPublicKeyInfo).
fn signed_by(cert: &X509Certificate<'_>, issuer_spki: &[u8]) -> bool {
    // RFC 5280 §4.1.1.2: the outer signatureAlgorithm must equal tbsCertificate.signature.
    if cert.signature_algorithm != cert.tbs_certificate.signature
        || !allowed_algorithm(&cert.signature_algorithm)
    {
        return false;
    }
    let Ok((_, spki)) = SubjectPublicKeyInfo::from_der(issuer_spki) else {
        return false;
    };
    x509_parser::verify::verify_signature(
        &spki,
        &cert.signature_algorithm,
        &cert.signature_value,
        cert.tbs_certificate.as_ref(),
    )
    .is_ok()
}

/// RFC 5280 §4.2: unknown critical extensions make a certificate unusable; AMD marks only basic
/// constraints and key usage critical.
fn known_critical_only(cert: &X509Certificate<'_>) -> bool {
    cert.extensions().iter().all(|e| {
        !e.critical || e.oid == OID_X509_EXT_BASIC_CONSTRAINTS || e.oid == OID_X509_EXT_KEY_USAGE
    })
}

/// RFC 5280 §4.2.1.9 and §4.2.1.3: a CA that signs certificates has cA=TRUE and keyCertSign.
fn is_signing_ca(cert: &X509Certificate<'_>) -> bool {
    let ca = matches!(cert.basic_constraints(), Ok(Some(bc)) if bc.value.ca);
    let ku = matches!(cert.key_usage(), Ok(Some(ku)) if ku.value.key_cert_sign());
    ca && ku && known_critical_only(cert)
}

fn to_ca(cert: &X509Certificate<'_>, der: &[u8], product: SnpProduct) -> Ca {
    Ca {
        product,
        der: der.to_vec(),
        subject: cert.subject().as_raw().to_vec(),
        spki: cert.public_key().raw.to_vec(),
        not_before: cert.validity().not_before.timestamp(),
        not_after: cert.validity().not_after.timestamp(),
    }
}

fn check_time(ca: &Ca, what: &str, now_s: i64) -> Result<(), AttestError> {
    // RFC 5280 §4.1.2.5: the verification time must lie within notBefore..=notAfter.
    if now_s < ca.not_before || now_s > ca.not_after {
        return Err(AttestError::Expired(format!(
            "{what} {}",
            validity_text(ca.not_before, ca.not_after)
        )));
    }
    Ok(())
}

fn validity_text(not_before: i64, not_after: i64) -> String {
    format!("valid {not_before}..={not_after} (Unix seconds)")
}

/// Which intermediate role a subject common name names for `product` (AMD's naming: `SEV-Milan`
/// signs VCEKs, `SEV-VLEK-Milan` signs VLEKs).
fn intermediate_role(cn: &str, product: SnpProduct) -> Option<SigningKey> {
    let name = product.amd_name();
    if cn == format!("SEV-{name}") {
        Some(SigningKey::Vcek)
    } else if cn == format!("SEV-VLEK-{name}") {
        Some(SigningKey::Vlek)
    } else {
        None
    }
}

impl TrustStore {
    /// Builds the store from PEM texts, each holding one product's ARK and any of its ASK/ASVK.
    pub fn new(sets: &[(SnpProduct, Vec<u8>)]) -> Result<Self, AttestError> {
        let mut store = TrustStore {
            anchors: Vec::new(),
            intermediates: Vec::new(),
        };
        for (product, pem) in sets {
            let ders = pem_certs(pem)?;
            let mut arks = Vec::new();
            let mut others = Vec::new();
            for der in &ders {
                let cert = parse_cert(der)?;
                if cert.subject().as_raw() == cert.issuer().as_raw() {
                    arks.push(der);
                } else {
                    others.push(der);
                }
            }
            let [ark_der] = arks.as_slice() else {
                return Err(chain_err(format!(
                    "root set for {product} must hold exactly one self-signed ARK"
                )));
            };
            let ark = parse_cert(ark_der)?;
            let ark_ca = to_ca(&ark, ark_der, *product);
            // 57230 "Certificate Chain": the ARK is self-signed.
            if !is_signing_ca(&ark) || !signed_by(&ark, &ark_ca.spki) {
                return Err(chain_err(format!(
                    "{product} ARK is not a valid self-signed CA"
                )));
            }
            if common_name(ark.subject()).as_deref()
                != Some(format!("ARK-{}", product.amd_name()).as_str())
            {
                return Err(chain_err(format!("{product} ARK has an unexpected name")));
            }
            store.anchors.push(ark_ca);
            let anchor = store.anchors.len() - 1;
            for der in others {
                let inter = store.verify_intermediate(der, anchor)?;
                store.intermediates.push(inter);
            }
        }
        if store.anchors.is_empty() {
            return Err(chain_err("no AMD root configured"));
        }
        Ok(store)
    }

    /// SHA-256 fingerprints of the pinned ARKs.
    pub fn anchor_fingerprints(&self) -> Vec<(SnpProduct, [u8; 32])> {
        self.anchors
            .iter()
            .map(|a| {
                let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &a.der);
                let mut out = [0u8; 32];
                out.copy_from_slice(d.as_ref());
                (a.product, out)
            })
            .collect()
    }

    fn verify_intermediate(&self, der: &[u8], anchor: usize) -> Result<Intermediate, AttestError> {
        let ark = &self.anchors[anchor];
        let cert = parse_cert(der)?;
        let role = common_name(cert.subject())
            .and_then(|cn| intermediate_role(&cn, ark.product))
            .ok_or_else(|| chain_err(format!("certificate is not a {} ASK/ASVK", ark.product)))?;
        // 57230 "Certificate Chain": the ASK/ASVK is signed by the ARK.
        if cert.issuer().as_raw() != ark.subject.as_slice()
            || !is_signing_ca(&cert)
            || !signed_by(&cert, &ark.spki)
        {
            return Err(chain_err(format!(
                "{} intermediate is not signed by ARK-{}",
                ark.product,
                ark.product.amd_name()
            )));
        }
        Ok(Intermediate {
            ca: to_ca(&cert, der, ark.product),
            signs: role,
            anchor,
        })
    }

    /// Verifies the bundle's extra certificates: each must be a pinned certificate or an
    /// intermediate that chains to a pinned ARK. Returns the intermediates not already pinned.
    fn extra_intermediates(&self, chain: &[Vec<u8>]) -> Result<Vec<Intermediate>, AttestError> {
        let mut out = Vec::new();
        for der in chain {
            let pinned = self.anchors.iter().any(|a| &a.der == der)
                || self.intermediates.iter().any(|i| &i.ca.der == der);
            if pinned {
                continue;
            }
            let cert = parse_cert(der)?;
            if cert.subject().as_raw() == cert.issuer().as_raw() {
                return Err(chain_err(
                    "bundle holds a root that is not a pinned AMD ARK",
                ));
            }
            let anchor = self
                .anchors
                .iter()
                .position(|a| a.subject.as_slice() == cert.issuer().as_raw())
                .ok_or_else(|| chain_err("bundle certificate is not issued by a pinned ARK"))?;
            out.push(self.verify_intermediate(der, anchor)?);
        }
        Ok(out)
    }

    /// Verifies a VCEK/VLEK: signed by a pinned (or bundle-supplied, ARK-verified) intermediate,
    /// every certificate on the path valid at `now_s`, and its key and extensions well formed.
    pub fn verify_leaf(
        &self,
        leaf_der: &[u8],
        chain: &[Vec<u8>],
        now_s: i64,
    ) -> Result<EndorsementKey, AttestError> {
        let leaf = parse_cert(leaf_der)?;
        let extra = self.extra_intermediates(chain)?;
        let issuer = leaf.issuer().as_raw();
        let mut named = false;
        let mut found = None;
        for inter in self.intermediates.iter().chain(extra.iter()) {
            if inter.ca.subject.as_slice() != issuer {
                continue;
            }
            named = true;
            // 57230 "Certificate Chain": the VCEK is signed by the ASK (VLEK by the ASVK).
            if signed_by(&leaf, &inter.ca.spki) {
                found = Some(inter);
                break;
            }
        }
        let inter = match found {
            Some(i) => i,
            None if named => {
                return Err(chain_err(
                    "endorsement key is not signed by the AMD ASK/ASVK it names",
                ));
            }
            None => {
                return Err(chain_err(
                    "endorsement key issuer is not a known AMD ASK/ASVK",
                ));
            }
        };
        let ark = &self.anchors[inter.anchor];
        let product = ark.product;
        // RFC 5280 §4.1.2.5: every certificate on the path is valid at the verification time.
        check_time(ark, &format!("ARK-{}", product.amd_name()), now_s)?;
        check_time(&inter.ca, "ASK/ASVK", now_s)?;
        let (nb, na) = (
            leaf.validity().not_before.timestamp(),
            leaf.validity().not_after.timestamp(),
        );
        if now_s < nb || now_s > na {
            return Err(AttestError::Expired(format!(
                "{} {}",
                inter.signs.as_str().to_uppercase(),
                validity_text(nb, na)
            )));
        }
        if leaf.is_ca() || !known_critical_only(&leaf) {
            return Err(chain_err(
                "endorsement key certificate is a CA or has unknown critical extensions",
            ));
        }
        let point = ec_p384_point(leaf.public_key())?;
        let ext = read_extensions(&leaf, product)?;
        if inter.signs == SigningKey::Vcek && ext.hwid.is_none() {
            return Err(chain_err("VCEK lacks the hwID extension"));
        }
        Ok(EndorsementKey {
            product,
            kind: inter.signs,
            point,
            tcb: ext.tcb,
            hwid: ext.hwid,
            product_name: ext.product_name,
        })
    }
}

/// 57230 "VCEK Certificate": the key is ECDSA on secp384r1.
fn ec_p384_point(spki: &SubjectPublicKeyInfo<'_>) -> Result<Vec<u8>, AttestError> {
    let curve = spki
        .algorithm
        .parameters
        .as_ref()
        .and_then(|p| p.as_oid().ok());
    let point = spki.subject_public_key.data.as_ref();
    if spki.algorithm.algorithm != OID_KEY_TYPE_EC_PUBLIC_KEY
        || curve != Some(OID_NIST_EC_P384)
        || point.len() != 97
        || point[0] != 0x04
    {
        return Err(chain_err(
            "endorsement key is not an uncompressed P-384 key",
        ));
    }
    Ok(point.to_vec())
}

struct Extensions {
    tcb: CertTcb,
    hwid: Option<Vec<u8>>,
    product_name: Option<String>,
}

const OID_PRODUCT_NAME: &str = "1.3.6.1.4.1.3704.1.2";
const OID_BL_SPL: &str = "1.3.6.1.4.1.3704.1.3.1";
const OID_TEE_SPL: &str = "1.3.6.1.4.1.3704.1.3.2";
const OID_SNP_SPL: &str = "1.3.6.1.4.1.3704.1.3.3";
const OID_UCODE_SPL: &str = "1.3.6.1.4.1.3704.1.3.8";
const OID_FMC_SPL: &str = "1.3.6.1.4.1.3704.1.3.9";
const OID_HWID: &str = "1.3.6.1.4.1.3704.1.4";

/// An SPL extension is a DER INTEGER 0..=255.
fn spl(value: &[u8]) -> Result<u8, AttestError> {
    match parse_der_integer(value) {
        Ok((&[], obj)) => obj
            .as_u32()
            .ok()
            .and_then(|v| u8::try_from(v).ok())
            .ok_or_else(|| chain_err("SPL extension out of range")),
        _ => Err(chain_err("SPL extension is not a DER INTEGER")),
    }
}

/// hwID is the raw chip id, or (newer KDS certificates) a DER OCTET STRING wrapping it.
fn hwid(value: &[u8], product: SnpProduct) -> Result<Vec<u8>, AttestError> {
    let want = product.hwid_len();
    if value.len() == want {
        return Ok(value.to_vec());
    }
    match parse_der_octetstring(value) {
        Ok((&[], obj)) => match obj.as_slice() {
            Ok(inner) if inner.len() == want => Ok(inner.to_vec()),
            _ => Err(chain_err("hwID extension has the wrong length")),
        },
        _ => Err(chain_err("hwID extension has the wrong length")),
    }
}

fn read_extensions(
    cert: &X509Certificate<'_>,
    product: SnpProduct,
) -> Result<Extensions, AttestError> {
    let mut values: [Option<u8>; 5] = [None; 5];
    let mut hw = None;
    let mut name = None;
    for ext in cert.extensions() {
        let oid = ext.oid.to_id_string();
        let slot = match oid.as_str() {
            OID_BL_SPL => 0,
            OID_TEE_SPL => 1,
            OID_SNP_SPL => 2,
            OID_UCODE_SPL => 3,
            OID_FMC_SPL => 4,
            OID_HWID => {
                if hw.replace(hwid(ext.value, product)?).is_some() {
                    return Err(chain_err("duplicate hwID extension"));
                }
                continue;
            }
            OID_PRODUCT_NAME => {
                let s = match parse_der_ia5string(ext.value) {
                    Ok((&[], obj)) => obj.as_str().ok().map(str::to_owned),
                    _ => None,
                }
                .ok_or_else(|| chain_err("productName extension is not an IA5String"))?;
                name = Some(s);
                continue;
            }
            _ => continue,
        };
        if values[slot].replace(spl(ext.value)?).is_some() {
            return Err(chain_err("duplicate SPL extension"));
        }
    }
    let [Some(bootloader), Some(tee), Some(snp), Some(microcode), fmc] = values else {
        return Err(chain_err("endorsement key lacks a TCB SPL extension"));
    };
    // 57230 "VCEK Certificate Extensions": fmcSPL exists from Turin on.
    if (product == SnpProduct::Turin) != fmc.is_some() {
        return Err(chain_err(
            "fmcSPL extension presence does not fit the product",
        ));
    }
    // productName starts with the product family, e.g. "Milan-B0", "Turin".
    if let Some(n) = &name
        && n.split('-').next() != Some(product.amd_name())
    {
        return Err(chain_err(format!(
            "productName does not name {}",
            product.amd_name()
        )));
    }
    Ok(Extensions {
        tcb: CertTcb {
            bootloader,
            tee,
            snp,
            microcode,
            fmc,
        },
        hwid: hw,
        product_name: name,
    })
}
