//! The NATS targets against a real nats-server on a free loopback port: relay-bench's minimal
//! client and async-nats both deliver every message of a small flow, in order. Like the
//! cluster tests, these need `nats-server` on the PATH (`.ci/run` installs it) and fail,
//! saying so, without it.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use relay_bench::target::Target;
use relay_bench::workloads::{self, FlowOptions};

/// A nats-server (core NATS only), stopped when dropped.
struct Nats(Child);

impl Drop for Nats {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn nats_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("RELAY_NATS_SERVER") {
        return path.into();
    }
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .chain(["/usr/sbin".into()])
                .map(|dir| dir.join("nats-server"))
                .find(|path| path.is_file())
        })
        .unwrap_or_else(|| {
            panic!(
                "these tests need nats-server, which is not on the PATH: install it (Debian: \
                 apt-get install -y nats-server) or set RELAY_NATS_SERVER to its path"
            )
        })
}

/// Starts a nats-server and returns it with its `host:port` once it accepts connections.
async fn nats() -> (Nats, String) {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let child = Command::new(nats_binary())
        .args(["-a", "127.0.0.1", "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("could not start nats-server: {e}"));
    let server = Nats(child);
    let addr = format!("127.0.0.1:{port}");
    tokio::time::timeout(Duration::from_secs(20), async {
        while tokio::net::TcpStream::connect(&addr).await.is_err() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("nats-server did not start listening");
    (server, addr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_nats_clients_deliver_every_message_in_order() {
    let (_server, addr) = nats().await;
    let stall = Duration::from_secs(20);
    // Few enough that async-nats's subscription queue (65,536 messages) never overflows on
    // a loaded machine: it drops what does not fit, as NATS does for slow consumers.
    let pairs = FlowOptions::new(4, 4, 4_001, 64, stall);
    for target in [Target::Nats(addr.clone()), Target::AsyncNats(addr.clone())] {
        let report = workloads::flow(&target, &target, "pairs", &pairs).await.unwrap();
        assert_eq!(
            (report.delivered, report.lost, report.out_of_order),
            (4_001, 0, 0),
            "through {target}"
        );
    }
}
