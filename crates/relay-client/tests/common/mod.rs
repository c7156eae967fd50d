//! What the client's end-to-end tests share.
// Helpers fail a test by panicking, as tests do.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::PathBuf;

/// The client binary is built for this test by cargo. The server binary belongs to another
/// package, which `cargo test -p relay-client` would not rebuild: build it once here (a no-op
/// when it is up to date) so the test never runs a stale server.
///
/// It is built as `cargo test --workspace --no-run` builds it, the README's test command:
/// `cargo build -p relay-server` resolves features differently (dev-dependencies are not
/// unified in), which rebuilt the TLS and NATS stack, a minute of CI, for one binary.
pub fn binary(name: &str) -> PathBuf {
    static SERVER_BUILT: std::sync::Once = std::sync::Once::new();
    let client = PathBuf::from(env!("CARGO_BIN_EXE_relay-client"));
    if name == "relay-client" {
        return client;
    }
    SERVER_BUILT.call_once(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut build = std::process::Command::new(cargo);
        build.args(["test", "--quiet", "--workspace", "--no-run"]);
        if !cfg!(debug_assertions) {
            build.arg("--release");
        }
        let status = build.status().expect("run cargo build");
        assert!(status.success(), "building {name} failed");
    });
    client.with_file_name(name)
}
