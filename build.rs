//! Generates the gRPC code from `proto/` with protox (a pure-Rust protobuf compiler), so no
//! `protoc` is needed anywhere.

use std::path::PathBuf;

/// Keep in step with the `Debug` impls in src/proto.rs.
const SECRET_MESSAGES: [&str; 5] = [
    ".weightvault.v1.InitResponse",
    ".weightvault.v1.UnsealRequest",
    ".weightvault.v1.RekeyRequest",
    ".weightvault.v1.RekeyCommitRequest",
    ".weightvault.v1.RekeyResponse",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "proto/weightvault/v1/node.proto",
        "proto/weightvault/v1/admin.proto",
        "proto/weightvault/v1/audit.proto",
        "proto/weightvault/v1/operator.proto",
    ];
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let fds = protox::compile(protos, ["proto"])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::create_dir_all(out.join("node_server"))?;
    let bytes = protox::prost::Message::encode_to_vec(&fds);
    std::fs::write(out.join("weightvault_descriptor.bin"), bytes)?;
    tonic_prost_build::configure()
        .bytes(".weightvault.v1.WeightChunk.ciphertext")
        .bytes(".weightvault.v1.PushModelRequest.data")
        // Messages carrying key shares get a redacting Debug (src/proto.rs), so no `{:?}`
        // anywhere can print a share.
        .skip_debug(SECRET_MESSAGES)
        .compile_fds(fds)?;
    node_server(&out);
    Ok(())
}

/// The vault's `NodeService` server for the unary methods. `FetchWeights` is not generated: the
/// vault answers it itself (`crate::server::wire::serve_fetch`, routed by
/// `crate::server::node::NodeServer`), writing each chunk message straight from the blob file
/// into a reused send buffer; the bytes on the wire are those of `WeightChunk`, and clients use
/// the generated code from node.proto.
fn node_server(out: &std::path::Path) {
    use tonic_build::manual::{Builder, Method, Service};
    let unary = |name: &str, route: &str, input: &str, output: &str| {
        Method::builder()
            .name(name)
            .route_name(route)
            .input_type(format!("crate::proto::v1::{input}"))
            .output_type(format!("crate::proto::v1::{output}"))
            .codec_path("tonic_prost::ProstCodec")
            .build()
    };
    let service = Service::builder()
        .name("NodeService")
        .package("weightvault.v1")
        .method(unary(
            "get_challenge",
            "GetChallenge",
            "GetChallengeRequest",
            "GetChallengeResponse",
        ))
        .method(unary("attest", "Attest", "AttestRequest", "AttestResponse"))
        .method(unary(
            "request_grant",
            "RequestGrant",
            "RequestGrantRequest",
            "RequestGrantResponse",
        ))
        .build();
    Builder::new()
        .build_client(false)
        .build_server(true)
        .out_dir(out.join("node_server"))
        .compile(&[service]);
}
