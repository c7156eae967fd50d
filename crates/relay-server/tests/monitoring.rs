//! What an operator sees: the metrics endpoint, scraped while traffic flows and checked
//! against what was sent, and the console's `stats`, `who` and `kick`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;

use common::{TestServer, next_event, next_message, wait_until, within};
use relay_client::{Client, Event};
use relay_proto::Status;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Serves the server's metrics on a port of their own; the address.
async fn serve_metrics(server: &TestServer) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(relay_server::serve_metrics(
        listener,
        server.handle.clone(),
        server.shutdown.clone(),
    ));
    addr
}

/// `GET path` over HTTP/1.1: the status line and the body.
async fn get(addr: SocketAddr, path: &str) -> (String, String) {
    within(async {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let request = format!("GET {path} HTTP/1.1\r\nHost: relay\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).await.unwrap();
        let (head, body) = response.split_once("\r\n\r\n").unwrap();
        (head.lines().next().unwrap().to_string(), body.to_string())
    })
    .await
}

/// A scrape, as `metric{labels}` → value.
async fn scrape(addr: SocketAddr) -> HashMap<String, f64> {
    let (status, body) = get(addr, "/metrics").await;
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert!(body.ends_with("# EOF\n"), "{body}");
    body.lines()
        .filter(|line| !line.starts_with('#'))
        .map(|line| {
            let (name, value) = line.rsplit_once(' ').unwrap();
            (name.to_string(), value.parse().unwrap())
        })
        .collect()
}

/// Scrapes until `metric` reads `value` (counters are added to once per socket read, so a
/// scrape may come a moment before the last read's count).
async fn until_metric(addr: SocketAddr, metric: &str, value: f64) -> HashMap<String, f64> {
    let waited = tokio::time::timeout(common::WAIT, async {
        loop {
            let now = scrape(addr).await;
            if now.get(metric) == Some(&value) {
                return now;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    })
    .await;
    match waited {
        Ok(now) => now,
        Err(_) => panic!("{metric} never read {value}: {:#?}", scrape(addr).await),
    }
}

#[tokio::test]
async fn the_metrics_count_what_was_sent_while_it_flows() {
    let server = TestServer::start().await;
    let metrics = serve_metrics(&server).await;
    let (alice, _alice_events) = server.connect("alice").await;
    let (_bob, mut bob_events) = server.connect("bob").await;
    // A registration refused: the name is taken.
    assert!(Client::connect(&server.url(), "bob").await.is_err());

    // Traffic flows while the endpoint is scraped: the counts only grow, within what was sent.
    const SENT: usize = 3000;
    let sender = alice.clone();
    let flood = tokio::spawn(async move {
        for i in 0..SENT {
            sender.send("bob", format!("message {i}")).await.unwrap();
        }
    });
    let mut last = 0.0;
    for _ in 0..3 {
        let now = scrape(metrics).await;
        let routed = now["relay_messages_routed_total"];
        assert!(routed >= last && routed <= SENT as f64, "{routed} after {last}");
        last = routed;
    }
    within(flood).await.unwrap();
    for i in 0..SENT {
        assert_eq!(next_message(&mut bob_events).await.1, format!("message {i}"));
    }
    alice.send("nobody", "hello?").await.unwrap();

    let now = until_metric(metrics, "relay_messages_routed_total", SENT as f64).await;
    let now = if now.get("relay_messages_refused_total{reason=\"not_found\"}") == Some(&1.0) {
        now
    } else {
        until_metric(metrics, "relay_messages_refused_total{reason=\"not_found\"}", 1.0).await
    };
    assert_eq!(now["relay_registrations_total{outcome=\"registered\"}"], 2.0);
    assert_eq!(now["relay_registrations_total{outcome=\"taken\"}"], 1.0);
    assert_eq!(now["relay_users_online"], 2.0);
    assert_eq!(now["relay_messages_refused_total{reason=\"not_delivered\"}"], 0.0);
    assert_eq!(now["relay_slow_consumers_total"], 0.0);
    // Every message is at least its content on the wire, both ways.
    let content: usize = (0..SENT).map(|i| format!("message {i}").len()).sum();
    assert!(now["relay_received_bytes_total"] > content as f64);
    assert!(now["relay_sent_bytes_total"] > content as f64);
    // Three connections were made; the refused one is gone.
    assert_eq!(now["relay_connections_total"], 3.0);
    until_metric(metrics, "relay_connections_open", 2.0).await;

    // Anything but GET /metrics is a 404.
    assert_eq!(get(metrics, "/").await.0, "HTTP/1.1 404 Not Found");
    server.stop().await;
}

#[tokio::test]
async fn stored_messages_and_the_inboxes_show_in_the_metrics() {
    let server = TestServer::start().await;
    let metrics = serve_metrics(&server).await;
    let key = relay_proto::Identity::generate().unwrap();
    // bob binds his name to a key, then leaves.
    let config = relay_client::ClientConfig { identity: Some(key), ..Default::default() };
    let (bob, _) = server.connect_with("bob", config).await;
    bob.offline().await.unwrap();
    server.wait_until_gone("bob").await;
    let (alice, mut alice_events) = server.connect("alice").await;
    for i in 0..5 {
        alice.send("bob", format!("for later {i}")).await.unwrap();
    }
    for _ in 0..5 {
        assert!(matches!(next_event(&mut alice_events).await, Event::Stored { .. }));
    }
    let now = until_metric(metrics, "relay_messages_stored_total", 5.0).await;
    assert_eq!(now["relay_inbox_messages"], 5.0);
    assert_eq!(now["relay_inbox_recipients"], 1.0);
    assert!(now["relay_inbox_bytes"] > 0.0 && now["relay_store_bytes"] > 0.0);
    server.stop().await;
}

/// Runs the console over `input`; what it printed.
async fn console(server: &TestServer, input: &str) -> String {
    let mut out = Vec::new();
    within(relay_server::run_console(
        input.as_bytes(),
        &mut out,
        server.handle.clone(),
        server.shutdown.clone(),
    ))
    .await
    .unwrap();
    String::from_utf8(out).unwrap()
}

#[tokio::test]
async fn the_console_shows_stats_and_users_and_kicks_with_a_reason() {
    let server = TestServer::start().await;
    let (alice, _alice_events) = server.connect("alice").await;
    let (_bob, mut bob_events) = server.connect("bob").await;
    alice.send("bob", "hi").await.unwrap();
    next_message(&mut bob_events).await;
    wait_until(|| server.handle.stats().routed == 1).await;

    let out = console(&server, "stats\nwho alice\nwho nobody\nhelp\n").await;
    assert!(out.contains("connections: 2 open, 2 since start; 2 users online"), "{out}");
    assert!(out.contains("registrations: registered 2"), "{out}");
    assert!(out.contains("messages: 1 routed, 0 stored; refused: none"), "{out}");
    let who = out.lines().find(|l| l.starts_with("alice at 127.0.0.1:")).unwrap();
    assert!(who.contains("on this server, online for") && who.contains("bytes queued"), "{who}");
    assert!(out.contains("nobody is not online"), "{out}");
    assert!(out.contains("kick NAME [REASON]") && out.contains("who NAME"), "{out}");

    // Kicked: the client is told why, in a status of its own, and the name is free.
    let out = console(&server, "kick bob spamming the channel\nkick nobody\n").await;
    assert!(out.contains("disconnected bob (spamming the channel)"), "{out}");
    assert!(out.contains("nobody is not online"), "{out}");
    match within(async {
        loop {
            match next_event(&mut bob_events).await {
                Event::Closed { status, detail } => return (status, detail),
                Event::Message { .. } => continue,
                other => panic!("expected the kick, got {other:?}"),
            }
        }
    })
    .await
    {
        (Status::Kicked, detail) => assert_eq!(detail, "spamming the channel"),
        other => panic!("expected Kicked, got {other:?}"),
    }
    server.wait_until_gone("bob").await;
    assert_eq!(server.handle.stats().kicked, 1);
    let (_bob_again, _) = server.connect("bob").await;
    server.stop().await;
}
