//! Places where the server and docs/PROTOCOL.md once disagreed, pinned to what the spec now
//! says: replies go to the connection that sent the message, what may come before
//! registering, the smallest frame limits, and a client that reads is never dropped for the
//! replies the server itself generates.

// Helpers here fail the test by panicking, like the tests themselves.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::process::ServerProcess;
use common::{RawPeer, TestServer, next_event, wait_until, within};
use relay_client::{Client, Event};
use relay_proto::{Message, ServerEvent, Status};
use relay_server::Config;

/// Sends to `to` until the server refuses a message as not delivered (its outbox is full).
async fn flood_until_refused(client: &Client, events: &mut relay_client::Events, to: &str) {
    let payload = Bytes::from(vec![b'x'; 16 * 1024]);
    for _ in 0..8000 {
        client.send(to, payload.clone()).await.unwrap();
        if let Some(event) = events.try_next() {
            assert!(
                matches!(event, Event::Rejected { status: Status::NotDelivered, .. }),
                "{event:?}"
            );
            return;
        }
        tokio::task::yield_now().await;
    }
    match next_event(events).await {
        Event::Rejected { status: Status::NotDelivered, .. } => {}
        other => panic!("expected NotDelivered, got {other:?}"),
    }
}

#[tokio::test]
async fn replies_about_a_message_never_reach_a_later_holder_of_the_senders_name() {
    let server = TestServer::with_config(Config {
        outbox_bytes: 128 * 1024,
        send_wait: Duration::from_millis(100),
        // Long enough that the sink is not dropped as a slow consumer during the test.
        write_timeout: Duration::from_secs(60),
        shutdown_timeout: Duration::from_millis(200),
        ..Config::default()
    })
    .await;
    let sink = RawPeer::connect_small_buffer(server.addr).await.register_as("sink").await;
    let (sam, mut sam_events) = server.connect("sam").await;
    flood_until_refused(&sam, &mut sam_events, "sink").await;
    // sam leaves with messages still queued for the sink; someone else becomes sam.
    within(sam.offline()).await.unwrap();
    let (new_sam, mut new_events) = server.connect("sam").await;
    // The sink vanishes: what was queued for it is undeliverable, and its sender is gone.
    drop(sink);
    // The slot is freed only after the sink's connection reported what it could not write.
    wait_until(|| server.handle.connections() == 1).await;
    let id = new_sam.send("nobody", "marker").await.unwrap();
    assert_eq!(next_event(&mut new_events).await, Event::NotFound { id, to: "nobody".into() });
    assert!(new_events.try_next().is_none());
    server.stop().await;
}

#[tokio::test]
async fn before_registering_a_ping_is_answered_and_exit_closes_silently() {
    let server = TestServer::start().await;
    let mut peer = RawPeer::connect(server.addr).await;
    peer.send(Message::ping(5)).await;
    assert_eq!(peer.recv().await, Some(ServerEvent::Pong { id: 5 }));
    peer.send(Message::offline(6)).await;
    assert_eq!(peer.recv().await, None);

    // Anything else is refused and closes the connection.
    let mut peer = RawPeer::connect(server.addr).await;
    peer.send(Message::send(7, "bob", "hi")).await;
    match peer.recv().await {
        Some(ServerEvent::Reply {
            id: 7, status: Status::InvalidRequest, closing: true, ..
        }) => {}
        other => panic!("{other:?}"),
    }
    // So is a second hello.
    let mut peer = RawPeer::connect(server.addr).await;
    peer.send(Message::hello(1)).await;
    assert!(matches!(peer.recv().await, Some(ServerEvent::Greeting { .. })));
    peer.send(Message::hello(2)).await;
    assert_eq!(peer.closing_status().await, Some(Status::InvalidRequest));
    server.stop().await;
}

/// A client that keeps reading while it pipelines thousands of messages to a stalled
/// receiver gets a `NotDelivered` for each it cannot deliver, however small its outbox:
/// the server waits for it to take its replies instead of dropping it.
#[tokio::test]
async fn a_client_that_reads_is_never_dropped_for_the_replies_the_server_makes() {
    for outbox_bytes in [16 * 1024, 64 * 1024] {
        let server = TestServer::with_config(Config {
            outbox_bytes,
            max_frame_len: 8 * 1024,
            send_wait: Duration::from_millis(50),
            write_timeout: Duration::from_secs(60),
            // The sink never reads, so shutdown gives up on it after this.
            shutdown_timeout: Duration::from_millis(200),
            ..Config::default()
        })
        .await;
        let _sink = RawPeer::connect_small_buffer(server.addr).await.register_as("sink").await;
        let (alice, mut events) = server.connect("alice").await;
        let reader = tokio::spawn(async move {
            let mut refused = 0;
            loop {
                match next_event(&mut events).await {
                    Event::Rejected { status: Status::NotDelivered, .. } => refused += 1,
                    Event::NotFound { .. } => return refused,
                    other => panic!("outbox {outbox_bytes}: unexpected {other:?}"),
                }
            }
        });
        // 12 MB in all: far more than the kernel's socket buffers absorb.
        let payload = Bytes::from(vec![b'y'; 4000]);
        let mut batch = alice.batch();
        for _ in 0..3000 {
            batch.add("sink", &payload).unwrap();
        }
        within(batch.send()).await.unwrap();
        alice.send("nobody", "done").await.unwrap();
        let refused = within(reader).await.unwrap();
        // Some fit in the sink's outbox and socket; most are refused, each one reported.
        assert!(refused > 1000, "outbox {outbox_bytes}: {refused} refused");
        server.stop().await;
    }
}

#[tokio::test]
async fn the_smallest_frame_limits_start_and_serve() {
    for max in ["256", "512"] {
        let server = ServerProcess::spawn(&["--max-frame", max], None).await;
        let (alice, mut events) =
            within(Client::connect(&server.addr.to_string(), "alice")).await.unwrap();
        alice.send("alice", "fits").await.unwrap();
        match next_event(&mut events).await {
            Event::Message { content, .. } => assert_eq!(&content[..], b"fits"),
            other => panic!("{other:?}"),
        }
    }
}

/// A reply never grows with what it refuses: a 60 KB destination is quoted short.
#[tokio::test]
async fn a_huge_destination_gets_a_short_refusal_and_the_session_goes_on() {
    let server = TestServer::start().await;
    let mut peer = RawPeer::register(server.addr, "quoter").await;
    peer.send(Message::send(5, "d".repeat(60_000), "hi")).await;
    match peer.recv().await {
        Some(ServerEvent::Reply {
            id: 5, status: Status::InvalidName, to, closing: false, ..
        }) => {
            assert!(to.len() <= relay_proto::MAX_QUOTED, "{} bytes quoted", to.len());
        }
        other => panic!("{other:?}"),
    }
    peer.send(Message::ping(6)).await;
    assert_eq!(peer.recv().await, Some(ServerEvent::Pong { id: 6 }));
    server.stop().await;
}

/// Messages to the destination of the one before skip the name rules (it passed them); any
/// other destination is checked, however many good ones came before it.
#[tokio::test]
async fn a_bad_destination_after_good_ones_is_still_refused() {
    let server = TestServer::start().await;
    let mut peer = RawPeer::register(server.addr, "checker").await;
    for id in 1..=3 {
        peer.send(Message::send(id, "checker", "to myself")).await;
        assert!(
            matches!(peer.recv().await, Some(ServerEvent::Message { id: got, .. }) if got == id)
        );
    }
    for (id, bad) in [(4, "bad name"), (5, ""), (6, "checker\u{202e}")] {
        peer.send(Message::send(id, bad, "hi")).await;
        match peer.recv().await {
            Some(ServerEvent::Reply {
                id: got,
                status: Status::InvalidName,
                closing: false,
                ..
            }) if got == id => {}
            other => panic!("{bad:?}: {other:?}"),
        }
    }
    peer.send(Message::send(7, "checker", "and again")).await;
    assert!(matches!(peer.recv().await, Some(ServerEvent::Message { id: 7, .. })));
    server.stop().await;
}

/// A malformed frame in the middle of a run of messages to one destination is refused as
/// any malformed frame is (the connection closes with `Malformed`), after the messages before
/// it were delivered; nothing after it is.
#[tokio::test]
async fn a_malformed_frame_inside_a_run_closes_the_connection_after_the_ones_before() {
    use bytes::BytesMut;
    let server = TestServer::start().await;
    let mut peer = RawPeer::register(server.addr, "runner").await;
    let frame = |msg: &Message| {
        let mut body = BytesMut::new();
        relay_proto::encode_body(msg, &mut body).unwrap();
        let mut out = (body.len() as u32).to_be_bytes().to_vec();
        out.extend_from_slice(&body);
        out
    };
    let mut burst = Vec::new();
    for id in 1..=3 {
        burst.extend(frame(&Message::send(id, "runner", "fine")));
    }
    // `from` is the sender's to leave empty; here it is three bytes that are not UTF-8.
    let mut bad = frame(&Message { from: "abc".into(), ..Message::send(4, "runner", "bad") });
    let at = bad.windows(3).position(|w| w == b"abc").unwrap();
    bad[at..at + 3].copy_from_slice(&[0xff, 0xfe, 0xfd]);
    burst.extend(bad);
    burst.extend(frame(&Message::send(5, "runner", "after")));
    peer.send_raw(&burst).await;
    for id in 1..=3 {
        assert!(
            matches!(peer.recv().await, Some(ServerEvent::Message { id: got, .. }) if got == id)
        );
    }
    assert_eq!(peer.closing_status().await, Some(Status::Malformed));
    server.stop().await;
}
