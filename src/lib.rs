//! weightvault: model weights encrypted at rest, released only to inference nodes that prove with
//! hardware attestation what they run, with an append-only audit log of every access.
//!
//! Module map (see `docs/architecture.md`):
//! - [`envelope`]: pure at-rest format: file header, chunked AES-256-GCM stream, signed manifest.
//! - [`keys`]: key hierarchy: sealed root key, KEK ring, DEK wrapping, the vault signing key.
//! - [`attest`]: pure evidence verification: evidence bytes → verified claims, one file per TEE.
//! - [`grant`]: challenges, the access decision, HPKE sealing of the DEK, grant lifecycle.
//! - [`audit`]: canonical audit entries (pure) and the durable sequencer.
//! - [`store`]: metadata and blob storage traits with their contracts; the embedded backends.
//! - [`server`]: tonic services, authentication by role, the one error → `Status` mapping.
//! - [`client`]: the Rust client the CLI is built on.
//! - [`cli`]: the `weightvault` command line.
//! - [`config`]: the typed configuration and the dev-mode bootstrap.
#![forbid(unsafe_code)]

pub mod attest;
pub mod audit;
pub mod cli;
pub mod client;
pub mod config;
pub mod envelope;
pub mod grant;
pub mod keys;
pub mod proto;
pub mod server;
pub mod store;
pub mod time;
