//! Generates the Rust code of the API from `proto/` with the vendored protoc, so no system
//! protoc is needed.
//!
//! `google/rpc/status.proto` (imported by our `google.longrunning` declaration) is not in
//! this repository: we do not copy third-party protos. protoc resolves it from the
//! descriptor set that the `tonic-types` crate ships, written to OUT_DIR and passed with
//! `--descriptor_set_in` (protoc accepts it together with `-I`). The generated code then
//! uses tonic-types' own `google.rpc` types through `extern_path`.

use std::error::Error;
use std::path::{Path, PathBuf};

use prost::Message as _;
use prost_types::FileDescriptorSet;

const PROTOS: &[&str] = &[
    "proto/bbws/instance/v1/resources.proto",
    "proto/bbws/instance/v1/operations.proto",
    "proto/bbws/instance/v1/instance_service.proto",
    "proto/google/longrunning/operations.proto",
];

fn main() -> Result<(), Box<dyn Error>> {
    println!("cargo:rerun-if-changed=proto");
    println!("cargo:rerun-if-changed=build.rs");

    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    let google_rpc_set = write_google_rpc_descriptor_set(&out_dir)?;

    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    let protoc_include = protoc_bin_vendored::include_path()?;

    let mut config = tonic_prost_build::Config::new();
    // Set on the config rather than through the PROTOC environment variable: changing the
    // environment of a running process is `unsafe` in edition 2024, and this is the same
    // setting prost-build reads PROTOC into.
    config.protoc_executable(protoc);
    // Deterministic ordering of map fields (labels, resources): stable etags, stable output.
    config.btree_map(["."]);
    // Implements `prost::Name`, so messages can be packed with `prost_types::Any::from_msg`.
    config.enable_type_names();

    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .extern_path(".google.rpc", "::tonic_types::pb")
        // prost's codec with a smaller first encode buffer (see `proto::Codec`).
        .codec_path("crate::proto::Codec")
        .protoc_arg(format!("--descriptor_set_in={}", google_rpc_set.display()))
        .file_descriptor_set_path(out_dir.join("descriptor.bin"))
        .compile_with_config(config, PROTOS, &["proto", path_str(&protoc_include)?])?;
    Ok(())
}

/// Writes tonic-types' descriptor set (google.rpc Status and error details, with their
/// google.protobuf dependencies) where protoc can read it, and returns its path.
///
/// tonic-types names its files `status.proto` and `error_details.proto`, without the
/// `google/rpc/` directory that `import "google/rpc/status.proto"` expects, so the file
/// names (and the imports between them) are moved under `google/rpc/` first. Only names
/// change; the messages are tonic-types' own.
fn write_google_rpc_descriptor_set(out_dir: &Path) -> Result<PathBuf, Box<dyn Error>> {
    let mut set = FileDescriptorSet::decode(tonic_types::pb::FILE_DESCRIPTOR_SET)?;
    let canonical = |name: &str| -> String {
        if name.contains('/') {
            name.to_owned()
        } else {
            format!("google/rpc/{name}")
        }
    };
    for file in &mut set.file {
        if file.package() == "google.rpc" {
            file.name = Some(canonical(file.name()));
        }
    }
    let renamed: Vec<String> = set
        .file
        .iter()
        .filter(|file| file.package() == "google.rpc")
        .map(|file| file.name().to_owned())
        .collect();
    for file in &mut set.file {
        for dependency in &mut file.dependency {
            let candidate = canonical(dependency);
            if renamed.contains(&candidate) {
                *dependency = candidate;
            }
        }
    }
    if !renamed.iter().any(|name| name == "google/rpc/status.proto") {
        return Err("tonic-types' descriptor set has no google.rpc status.proto".into());
    }
    let path = out_dir.join("google_rpc_descriptor_set.bin");
    std::fs::write(&path, set.encode_to_vec())?;
    Ok(path)
}

fn path_str(path: &Path) -> Result<&str, Box<dyn Error>> {
    path.to_str()
        .ok_or_else(|| format!("path is not UTF-8: {}", path.display()).into())
}
