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
    let bytes = protox::prost::Message::encode_to_vec(&fds);
    std::fs::write(out.join("weightvault_descriptor.bin"), bytes)?;
    tonic_prost_build::configure()
        .bytes(".weightvault.v1.WeightChunk.ciphertext")
        .bytes(".weightvault.v1.PushModelRequest.data")
        // Messages carrying key shares get a redacting Debug (src/proto.rs), so no `{:?}`
        // anywhere can print a share.
        .skip_debug(SECRET_MESSAGES)
        .compile_fds(fds)?;
    Ok(())
}
