//! What the client's end-to-end tests share.
// Helpers fail a test by panicking, as tests do.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::time::SystemTime;

/// The client binary is built for this test by cargo. The server binary belongs to another
/// package, which `cargo test -p relay-client` would not rebuild: build it here when any of
/// its sources is newer than it, so the test never runs a stale server.
///
/// Under the README's test command (`cargo test --workspace`) it is already fresh, and no
/// cargo runs: a nested `cargo build -p relay-server` resolves features differently from
/// the outer build and rebuilt the TLS and NATS stack, about a minute of CI, for nothing.
pub fn binary(name: &str) -> PathBuf {
    static SERVER_BUILT: std::sync::Once = std::sync::Once::new();
    let client = PathBuf::from(env!("CARGO_BIN_EXE_relay-client"));
    if name == "relay-client" {
        return client;
    }
    let server = client.with_file_name(name);
    SERVER_BUILT.call_once(|| {
        if !stale(&server) {
            return;
        }
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut build = std::process::Command::new(cargo);
        build.args(["build", "--quiet", "-p", name, "--bin", name]);
        if !cfg!(debug_assertions) {
            build.arg("--release");
        }
        let status = build.status().expect("run cargo build");
        assert!(status.success(), "building {name} failed");
    });
    server
}

/// Whether `binary` is missing or older than a source it is built from (the server's and the
/// protocol crate's sources and manifests, and the lock file).
fn stale(binary: &Path) -> bool {
    let Ok(built) = std::fs::metadata(binary).and_then(|m| m.modified()) else { return true };
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let sources = [
        "Cargo.toml",
        "Cargo.lock",
        "crates/relay-server/Cargo.toml",
        "crates/relay-server/src",
        "crates/proto/Cargo.toml",
        "crates/proto/src",
    ];
    sources.iter().any(|source| newer_than(&root.join(source), built))
}

/// Whether `path` (a file, or any file under a directory) was modified after `time`.
fn newer_than(path: &Path, time: SystemTime) -> bool {
    let Ok(meta) = std::fs::metadata(path) else { return false };
    if meta.is_dir() {
        let Ok(entries) = std::fs::read_dir(path) else { return true };
        entries.flatten().any(|entry| newer_than(&entry.path(), time))
    } else {
        meta.modified().map_or(true, |modified| modified > time)
    }
}
