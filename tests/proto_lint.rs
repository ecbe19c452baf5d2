//! Lints the API protos with buf (STANDARD + COMMENTS, see `proto/buf.yaml`).
//!
//! buf cannot compile `proto/` by itself (google/rpc/status.proto is resolved from
//! tonic-types at build time, not kept in the repository), so the lint runs on the image
//! that build.rs produced: the crate's own `FILE_DESCRIPTOR_SET`, which carries source
//! info, comments included. buf is installed project-locally by `scripts/buf-lint.sh`.

use std::path::{Path, PathBuf};
use std::process::Command;

use instance_manager::proto::{FILE_DESCRIPTOR_SET, GOOGLE_RPC_FILE_DESCRIPTOR_SET};
use prost::Message as _;

const API_FILES: &[&str] = &[
    "bbws/instance/v1/instance_service.proto",
    "bbws/instance/v1/operations.proto",
    "bbws/instance/v1/resources.proto",
];

fn manifest_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn buf_path() -> PathBuf {
    let buf = manifest_dir().join(".tools/node_modules/.bin/buf");
    assert!(
        buf.exists(),
        "buf is not installed at {}; run `scripts/buf-lint.sh install` (or `make test`) first",
        buf.display()
    );
    buf
}

/// Guards against a lint that passes because it saw nothing: the image must hold the API
/// files, with the comments the COMMENTS rules check.
#[test]
fn image_holds_the_api_files_with_their_comments() {
    let set =
        prost_types::FileDescriptorSet::decode(FILE_DESCRIPTOR_SET).expect("valid descriptor set");
    for name in API_FILES {
        let file = set
            .file
            .iter()
            .find(|file| file.name() == *name)
            .unwrap_or_else(|| panic!("{name} is missing from the descriptor set"));
        let commented = file
            .source_code_info
            .as_ref()
            .map(|info| {
                info.location
                    .iter()
                    .filter(|l| l.leading_comments.is_some())
                    .count()
            })
            .unwrap_or(0);
        assert!(commented > 0, "{name} has no source info with comments");
    }
    assert!(
        set.file
            .iter()
            .any(|file| file.name() == "google/rpc/status.proto"),
        "google/rpc/status.proto should be resolved under its canonical path"
    );
}

/// build.rs moves tonic-types' google.rpc files under `google/rpc/`, where imports (and
/// reflection clients) expect them.
#[test]
fn google_rpc_files_have_canonical_names() {
    let set = prost_types::FileDescriptorSet::decode(GOOGLE_RPC_FILE_DESCRIPTOR_SET)
        .expect("valid descriptor set");
    let names: Vec<&str> = set.file.iter().map(|file| file.name()).collect();
    for expected in ["google/rpc/status.proto", "google/rpc/error_details.proto"] {
        assert!(
            names.contains(&expected),
            "{expected} missing from {names:?}"
        );
    }
}

#[test]
fn api_protos_pass_buf_lint() {
    let buf = buf_path();
    let dir = tempfile::tempdir().expect("temp dir");
    let image = dir.path().join("api.binpb");
    std::fs::write(&image, FILE_DESCRIPTOR_SET).expect("write image");
    let config = manifest_dir().join("proto/buf.yaml");

    let output = run_buf_lint(&buf, &image, &config);
    assert!(
        output.status.success(),
        "buf lint failed ({}):\n{}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

fn run_buf_lint(buf: &Path, image: &Path, config: &Path) -> std::process::Output {
    Command::new(buf)
        .arg("lint")
        .arg(format!("{}#format=binpb", image.display()))
        .arg("--config")
        .arg(config)
        // buf keeps a cache; keep it out of the user's home and the repository.
        .env(
            "BUF_CACHE_DIR",
            std::env::temp_dir().join("instance-manager-buf-cache"),
        )
        .output()
        .expect("run buf")
}
