//! Resource faults against the real server binary: sockets that only send a length header,
//! running out of file descriptors, and (ignored, for measuring) memory per idle client.

// Helpers here fail the test by panicking, like the tests themselves.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use common::process::ServerProcess;
use common::within;
use relay_client::{Client, Event};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[tokio::test]
async fn a_thousand_sockets_that_send_one_header_each_cost_little_memory() {
    let server = ServerProcess::spawn(&["--register-timeout", "3s"], None).await;
    let before = server.rss_kib();
    let mut sockets = Vec::new();
    for i in 0..1000u32 {
        let mut socket = within(TcpStream::connect(server.addr)).await.unwrap();
        // Half claim a frame just under the 1 KiB pre-registration limit and never send it;
        // half claim 2 GiB and must be refused from the header alone.
        let claim: u32 = if i % 2 == 0 { 1000 } else { 0x7fff_ffff };
        socket.write_all(&claim.to_be_bytes()).await.unwrap();
        sockets.push(socket);
    }
    // Every socket is closed by the server: the refused ones at once, the rest when their
    // registration time runs out. Wait for all of them.
    let closes: Vec<_> = sockets
        .into_iter()
        .map(|mut socket| {
            tokio::spawn(async move {
                let mut sink = Vec::new();
                within(socket.read_to_end(&mut sink)).await.is_ok()
            })
        })
        .collect();
    for close in closes {
        close.await.unwrap();
    }
    let peak = server.peak_rss_kib();
    let growth = peak.saturating_sub(before);
    println!("RSS before {before} KiB, peak with 1,000 header-only sockets {peak} KiB");
    // About 1 KiB of buffer each plus a task: allow far more, but not a full frame each.
    assert!(growth < 1000 * 32, "peak grew by {growth} KiB for 1,000 sockets");

    // Still serving.
    let (client, _events) =
        within(Client::connect(&server.addr.to_string(), "after")).await.unwrap();
    within(client.offline()).await.unwrap();
}

/// The server raises its soft open-file limit to the hard one, so a low soft limit does not
/// leave clients unanswered; and if `--max-clients` needs more than even the hard limit
/// allows, it says so at start.
#[tokio::test]
async fn a_low_soft_file_limit_is_raised_and_a_too_low_hard_one_is_reported() {
    let binary = env!("CARGO_BIN_EXE_relay-server");
    let data = tempfile::tempdir().unwrap();
    let spawn = |ulimit: &str| {
        tokio::process::Command::new("sh")
            .arg("-c")
            .arg(format!("{ulimit} && exec \"$0\" \"$@\""))
            .arg(binary)
            .args(["--host", "127.0.0.1", "--port", "0", "--max-clients", "300", "--data-dir"])
            .arg(data.path())
            .env("RUST_LOG", "info")
            .stdin(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap()
    };
    let first_lines = |child: &mut tokio::process::Child| {
        let stderr = child.stderr.take().unwrap();
        async move {
            use tokio::io::AsyncBufReadExt;
            let mut lines = tokio::io::BufReader::new(stderr).lines();
            let mut seen = Vec::new();
            while let Some(line) = within(lines.next_line()).await.unwrap() {
                let done = line.contains("listening on");
                seen.push(line);
                if done {
                    break;
                }
            }
            seen
        }
    };
    // Hard limit 256 too: 300 clients cannot fit, and the server says so.
    let mut low = spawn("ulimit -n 256");
    let lines = first_lines(&mut low).await;
    assert!(
        lines.iter().any(|l| l.contains("--max-clients 300") && l.contains("limit of 256")),
        "{lines:#?}"
    );
    drop(low);
    // Soft limit 256 under this machine's hard one: raised, and no warning when it fits.
    let hard: u64 = String::from_utf8(
        std::process::Command::new("sh").args(["-c", "ulimit -Hn"]).output().unwrap().stdout,
    )
    .unwrap()
    .trim()
    .parse()
    .unwrap_or(u64::MAX);
    let mut raised = spawn("ulimit -Sn 256");
    let lines = first_lines(&mut raised).await;
    let warned = lines.iter().any(|l| l.contains("--max-clients 300"));
    assert_eq!(warned, hard < 364, "hard limit {hard}: {lines:#?}");
}

#[tokio::test]
async fn the_accept_loop_survives_running_out_of_file_descriptors_and_recovers() {
    let mut server = ServerProcess::spawn(&["--register-timeout", "60s"], Some(40)).await;
    // Far more connections than the server has descriptors for. The kernel completes the
    // handshakes (backlog), so these all succeed; the server's accept fails with EMFILE.
    let mut sockets = Vec::new();
    for _ in 0..60 {
        sockets.push(within(TcpStream::connect(server.addr)).await.unwrap());
    }
    server.expect_log("accept failed").await;
    // Release descriptors: the server sees these close and frees theirs.
    sockets.truncate(5);
    let url = server.addr.to_string();
    let (client, mut events) = within(async {
        loop {
            match Client::connect(&url, "survivor").await {
                Ok(connected) => return connected,
                // Until the server has caught up with the backlog, it may still be full.
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    })
    .await;
    client.send("survivor", "hello me").await.unwrap();
    match within(events.next()).await {
        Some(Event::Message { content, .. }) => assert_eq!(&content[..], b"hello me"),
        other => panic!("{other:?}"),
    }
    assert!(server.child.try_wait().unwrap().is_none(), "server exited");
}

/// Measures server memory per idle registered client. Not a pass/fail test: run with
/// `cargo test --release -p relay-server --test footprint -- --ignored --nocapture`
/// (`RELAY_IDLE_CLIENTS` sets the count, default 1,000).
#[tokio::test]
#[ignore = "measurement; run explicitly"]
async fn measure_rss_per_idle_client() {
    let count: usize =
        std::env::var("RELAY_IDLE_CLIENTS").ok().and_then(|v| v.parse().ok()).unwrap_or(1000);
    // One listing shows everyone (the default page is 1,000 users).
    let server =
        ServerProcess::spawn(&["--max-clients", "100000", "--list-page", "1000000"], None).await;
    let url = server.addr.to_string();
    // One client first, so the runtime's threads and buffers are in the baseline.
    let (probe, mut probe_events) = within(Client::connect(&url, "probe")).await.unwrap();
    let before = server.rss_kib();
    let started = std::time::Instant::now();
    let mut clients = Vec::with_capacity(count);
    for i in 0..count {
        clients.push(within(Client::connect(&url, &format!("idle{i}"))).await.unwrap());
    }
    let connect_time = started.elapsed();
    probe.list_users().await.unwrap();
    match within(probe_events.next()).await {
        Some(Event::Users { users, .. }) => assert_eq!(users.len(), count + 1),
        other => panic!("{other:?}"),
    }
    let after = server.rss_kib();
    let per_client = (after.saturating_sub(before)) as f64 * 1024.0 / count as f64;
    println!(
        "{count} idle clients: connected in {connect_time:.2?}; server RSS {before} KiB -> \
         {after} KiB; {per_client:.0} bytes ({:.2} KiB) per client",
        per_client / 1024.0
    );
}

/// Logging never stops the server: with its stderr a pipe nobody reads (full after 64 KiB),
/// it keeps registering and routing, and SIGTERM still stops it.
#[tokio::test]
async fn a_stderr_nobody_reads_does_not_stop_the_server() {
    use tokio::io::AsyncBufReadExt;
    let data = tempfile::tempdir().unwrap();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_relay-server"))
        .args(["--host", "127.0.0.1", "--port", "0", "--data-dir"])
        .arg(data.path())
        // Every message logged: the pipe fills within the first few hundred.
        .env("RUST_LOG", "trace")
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stderr = tokio::io::BufReader::new(child.stderr.take().unwrap());
    let addr = within(async {
        let mut line = String::new();
        loop {
            line.clear();
            stderr.read_line(&mut line).await.unwrap();
            if let Some(addr) = line.split("listening on ").nth(1) {
                return addr.trim().to_string();
            }
        }
    })
    .await;
    // From here on nobody reads the server's stderr, and it is kept open.
    let (alice, mut events) = within(Client::connect(&addr, "alice")).await.unwrap();
    for i in 0..3000u32 {
        alice.send("alice", i.to_string()).await.unwrap();
    }
    for _ in 0..3000 {
        assert!(matches!(within(events.next()).await, Some(Event::Message { .. })));
    }
    // Still registering and serving.
    let (bob, mut bob_events) = within(Client::connect(&addr, "bob")).await.unwrap();
    bob.send("bob", "still here").await.unwrap();
    assert!(matches!(within(bob_events.next()).await, Some(Event::Message { .. })));
    // And SIGTERM still stops it.
    let pid = child.id().unwrap().to_string();
    assert!(std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let status = within(child.wait()).await.unwrap();
    assert!(status.success(), "{status:?}");
    drop(stderr);
}
