//! The audit log. [`entry`] is the pure core: the canonical encoding of one entry. [`sequencer`]
//! makes entries durable in order (group commit) and hands out [`sequencer::AuditDurable`], the
//! proof a grant needs. The Merkle tree, checkpoints and proofs build on this sequence.

pub mod checkpoint;
pub mod entry;
pub mod merkle;
pub mod note;
pub mod proof;
pub mod replay;
pub mod sequencer;

pub use entry::{Action, Actor, AuditEntry, Decision};
pub use sequencer::{AuditDurable, AuditError, Sequencer};
