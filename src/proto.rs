//! Generated gRPC types and services (`proto/weightvault/v1/*.proto`, compiled by `build.rs`).

/// Version 1 of the API.
#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod v1 {
    tonic::include_proto!("weightvault.v1");
}

/// The vault's `NodeService` server for the unary methods (build.rs `node_server`);
/// `FetchWeights` is answered by [`crate::server::wire::serve_fetch`], routed by
/// [`crate::server::node::NodeServer`]. Nodes use the generated client in [`v1`].
#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod node_server {
    include!(concat!(
        env!("OUT_DIR"),
        "/node_server/weightvault.v1.NodeService.rs"
    ));
}

/// The encoded `FileDescriptorSet` of the API, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/weightvault_descriptor.bin"));

/// Messages that carry Shamir key shares print as their type name only (build.rs skips their
/// derived `Debug`).
macro_rules! redacted_debug {
    ($($t:ident),*) => {$(
        impl std::fmt::Debug for v1::$t {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(concat!(stringify!($t), " { <key shares redacted> }"))
            }
        }
    )*};
}
redacted_debug!(
    InitResponse,
    UnsealRequest,
    RekeyRequest,
    RekeyCommitRequest,
    RekeyResponse
);

#[cfg(test)]
mod tests {
    #[test]
    fn share_carrying_messages_do_not_print_their_shares() {
        let req = super::v1::UnsealRequest {
            share: "wvs1-secret-share-text".into(),
            ..Default::default()
        };
        let text = format!("{req:?}");
        assert!(!text.contains("secret"), "{text}");
        let resp = super::v1::InitResponse {
            shares: vec!["wvs1-another-secret".into()],
            ..Default::default()
        };
        assert!(!format!("{resp:?}").contains("secret"));
    }
}
