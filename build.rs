//! Generates the gRPC code from `proto/` with protox (a pure-Rust protobuf compiler), so no
//! `protoc` is needed anywhere.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "proto/weightvault/v1/node.proto",
        "proto/weightvault/v1/admin.proto",
        "proto/weightvault/v1/audit.proto",
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
        .compile_fds(fds)?;
    Ok(())
}
