//! Compiles the Workload API and CA API protos with protox (pure Rust; no system `protoc`).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["proto/workload.proto", "proto/ca.proto"];
    for proto in protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    let descriptors = protox::compile(protos, ["proto"])?;
    tonic_prost_build::configure()
        // Maps as BTreeMaps: encoded in key order, so the same content is the same bytes (the
        // agent's Workload API streams compare digests of what they send).
        .btree_map(".")
        .build_client(true)
        .build_server(true)
        .compile_fds(descriptors)?;
    Ok(())
}
