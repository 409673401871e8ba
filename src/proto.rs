//! Generated gRPC types and services (`proto/weightvault/v1/*.proto`, compiled by `build.rs`).

/// Version 1 of the API.
#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod v1 {
    tonic::include_proto!("weightvault.v1");
}

/// The encoded `FileDescriptorSet` of the API, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/weightvault_descriptor.bin"));
