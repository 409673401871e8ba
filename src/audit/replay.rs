//! Replay: the auditor's check of a log, pure. Given the entries, the signed checkpoint, the
//! log's verifier key and the last trusted checkpoint, it recomputes the Merkle root, checks the
//! signature and consistency (rollback, fork), decodes every entry canonically, runs the
//! semantic checks, and hands each accepted attestation to a caller-supplied evidence check (the
//! audit core does not depend on the verifiers). Every problem is a [`Finding`]; a replay passes
//! only with no findings and at least one entry checked.

use std::collections::HashMap;

use serde::Serialize;

use super::checkpoint::{Checkpoint, open_checkpoint};
use super::entry::{Action, AuditEntry, Decision};
use super::merkle::{self, Hash};
use super::note::NoteVerifier;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FindingKind {
    /// The checkpoint's signature does not verify with the log key.
    BadSignature,
    /// Fewer entries than the checkpoint covers.
    Truncated,
    /// An entry's bytes differ from the leaf hash the export recorded.
    EntryModified,
    /// The entries do not hash to the signed root.
    RootMismatch,
    /// The checkpoint is smaller than the trusted one.
    Rollback,
    /// Same size as the trusted checkpoint with another root, or the trusted prefix changed.
    Fork,
    /// An entry is not canonical JSON of the documented schema.
    NotCanonical,
    /// An access without its justification (fetch without grant, grant without attestation).
    Semantic,
    /// Stored evidence is missing or no longer verifies.
    Evidence,
    /// Nothing to check.
    Empty,
}

#[derive(Debug, Clone, Serialize)]
pub struct Finding {
    pub kind: FindingKind,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub index: Option<u64>,
    pub detail: String,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub ok: bool,
    pub entries_checked: u64,
    pub checkpoint_size: u64,
    pub checkpoint_root: String,
    pub attestations_reverified: u64,
    pub grants: u64,
    pub fetches: u64,
    pub findings: Vec<Finding>,
    /// The verified checkpoint, to store as the new trusted one when `ok`.
    #[serde(skip)]
    pub checkpoint: Option<Checkpoint>,
}

/// What to replay.
pub struct Input<'a> {
    /// Entries from index 0 (at least the checkpoint's size of them).
    pub entries: &'a [Vec<u8>],
    /// Leaf hashes recorded alongside the entries (an export), to name a modified entry.
    pub recorded_leaf_hashes: Option<&'a [Hash]>,
    /// The signed checkpoint note.
    pub checkpoint_note: &'a str,
    pub verifier: &'a NoteVerifier,
    /// The last checkpoint this auditor trusted.
    pub trusted: Option<&'a Checkpoint>,
}

fn finding(kind: FindingKind, index: Option<u64>, detail: impl Into<String>) -> Finding {
    Finding {
        kind,
        index,
        detail: detail.into(),
    }
}

/// Replays a log. `check_evidence` is called for every accepted attestation entry and returns
/// whether it re-verified the evidence (`Ok(false)`: skipped) or why it failed.
pub fn replay(
    input: &Input<'_>,
    check_evidence: &mut dyn FnMut(u64, &AuditEntry) -> Result<bool, String>,
) -> Report {
    let mut report = Report {
        ok: false,
        entries_checked: 0,
        checkpoint_size: 0,
        checkpoint_root: String::new(),
        attestations_reverified: 0,
        grants: 0,
        fetches: 0,
        findings: Vec::new(),
        checkpoint: None,
    };
    let cp = match open_checkpoint(input.checkpoint_note, std::slice::from_ref(input.verifier)) {
        Ok(cp) => cp,
        Err(e) => {
            report.findings.push(finding(
                FindingKind::BadSignature,
                None,
                format!("checkpoint: {e}"),
            ));
            return report;
        }
    };
    report.checkpoint_size = cp.size;
    report.checkpoint_root = hex::encode(cp.root);

    let Ok(size) = usize::try_from(cp.size) else {
        report.findings.push(finding(
            FindingKind::Truncated,
            None,
            "checkpoint size exceeds memory",
        ));
        return report;
    };
    if input.entries.len() < size {
        report.findings.push(finding(
            FindingKind::Truncated,
            Some(input.entries.len() as u64),
            format!(
                "the checkpoint covers {} entries but only {} are present",
                cp.size,
                input.entries.len()
            ),
        ));
        return report;
    }
    let entries = &input.entries[..size];
    let leaves: Vec<Hash> = entries.iter().map(|e| merkle::leaf_hash(e)).collect();
    if let Some(recorded) = input.recorded_leaf_hashes {
        for (i, (got, want)) in leaves.iter().zip(recorded).enumerate() {
            if got != want {
                report.findings.push(finding(
                    FindingKind::EntryModified,
                    Some(i as u64),
                    format!("entry {i} does not match its recorded leaf hash"),
                ));
            }
        }
    }
    // RFC 9162 §2.1.1: recompute the tree head from every entry.
    if merkle::root(&leaves) != cp.root {
        report.findings.push(finding(
            FindingKind::RootMismatch,
            None,
            format!("the {} entries do not hash to the signed root", cp.size),
        ));
    }
    if let Some(t) = input.trusted {
        if t.size > cp.size {
            report.findings.push(finding(
                FindingKind::Rollback,
                None,
                format!(
                    "checkpoint size {} is smaller than the trusted size {} (trusted root {}, new root {})",
                    cp.size,
                    t.size,
                    hex::encode(t.root),
                    hex::encode(cp.root)
                ),
            ));
        } else if t.size == cp.size && t.root != cp.root {
            report.findings.push(finding(
                FindingKind::Fork,
                None,
                format!(
                    "two checkpoints of size {}: trusted root {}, new root {}",
                    cp.size,
                    hex::encode(t.root),
                    hex::encode(cp.root)
                ),
            ));
        } else if t.size < cp.size {
            // Consistency (RFC 9162 §2.1.4) checked directly: the trusted prefix is unchanged.
            let prefix = usize::try_from(t.size).expect("smaller than a usize size");
            if merkle::root(&leaves[..prefix]) != t.root {
                report.findings.push(finding(
                    FindingKind::Fork,
                    None,
                    format!(
                        "the first {} entries no longer hash to the trusted root {}",
                        t.size,
                        hex::encode(t.root)
                    ),
                ));
            }
        }
    }

    semantic(entries, &mut report, check_evidence);
    report.entries_checked = cp.size;
    if cp.size == 0 {
        report.findings.push(finding(
            FindingKind::Empty,
            None,
            "the log has no entries to check",
        ));
    }
    report.ok = report.findings.is_empty();
    report.checkpoint = Some(cp);
    report
}

struct GrantSeen {
    actor: Option<String>,
    not_after_ms: u64,
}

fn semantic(
    entries: &[Vec<u8>],
    report: &mut Report,
    check_evidence: &mut dyn FnMut(u64, &AuditEntry) -> Result<bool, String>,
) {
    let mut attested: HashMap<String, u64> = HashMap::new();
    let mut grants: HashMap<String, GrantSeen> = HashMap::new();
    for (i, bytes) in entries.iter().enumerate() {
        let i = i as u64;
        let e = match AuditEntry::decode(bytes) {
            Ok(e) => e,
            Err(err) => {
                report.findings.push(finding(
                    FindingKind::NotCanonical,
                    Some(i),
                    format!("entry {i}: {err}"),
                ));
                continue;
            }
        };
        let actor = e.actor.id.clone();
        match (e.action, e.decision) {
            (Action::Attest, Decision::Allow) => {
                if let Some(a) = &actor {
                    attested.insert(a.clone(), i);
                }
                match check_evidence(i, &e) {
                    Ok(true) => report.attestations_reverified += 1,
                    Ok(false) => {}
                    Err(why) => report.findings.push(finding(
                        FindingKind::Evidence,
                        Some(i),
                        format!("entry {i}: evidence {why}"),
                    )),
                }
            }
            (Action::Grant, Decision::Allow) => {
                report.grants += 1;
                if actor.as_ref().is_none_or(|a| !attested.contains_key(a)) {
                    report.findings.push(finding(
                        FindingKind::Semantic,
                        Some(i),
                        format!(
                            "entry {i}: grant without an accepted attestation by the same node"
                        ),
                    ));
                }
                match (&e.grant_id, e.not_after_ms) {
                    (Some(g), Some(not_after_ms)) => {
                        grants.insert(
                            g.clone(),
                            GrantSeen {
                                actor,
                                not_after_ms,
                            },
                        );
                    }
                    _ => report.findings.push(finding(
                        FindingKind::Semantic,
                        Some(i),
                        format!("entry {i}: grant without grant id or expiry"),
                    )),
                }
            }
            (Action::FetchStart, Decision::Allow) => {
                report.fetches += 1;
                let justified = e
                    .grant_id
                    .as_ref()
                    .and_then(|g| grants.get(g))
                    .is_some_and(|g| {
                        g.actor.is_some() && g.actor == actor && e.time_ms < g.not_after_ms
                    });
                if !justified {
                    report.findings.push(finding(
                        FindingKind::Semantic,
                        Some(i),
                        format!(
                            "entry {i}: fetch without a valid, unexpired grant for the same node"
                        ),
                    ));
                }
            }
            _ => {}
        }
    }
}
