//! The core relay behaviour, driven in-process through the client library: registration,
//! routing by name and address, not found, going offline, ordering, operator shutdown.

// Helpers here fail the test by panicking, like the tests themselves.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use bytes::Bytes;
use common::{RawPeer, TestServer, WAIT, next_event, next_message, wait_until, within};
use relay_client::{Client, ConnectError, Event, SendError};
use relay_proto::{Message, ServerEvent, Status};

#[tokio::test]
async fn register_is_acknowledged_and_listed() {
    let server = TestServer::start().await;
    let (alice, _events) = server.connect("alice").await;
    assert_eq!(alice.name(), "alice");
    let users = server.handle.users();
    assert_eq!(users, vec![("alice".to_string(), alice.local_addr())]);
    server.stop().await;
}

/// A batch refuses a message over the frame limit, or to a destination that is no name, at
/// `add` (keeping what it holds), and sends the rest in order.
#[tokio::test]
async fn a_batch_refuses_what_cannot_be_sent_and_keeps_the_rest() {
    let server = TestServer::start().await;
    let (alice, _alice_events) = server.connect("alice").await;
    let (_bob, mut bob_events) = server.connect("bob").await;
    let mut batch = alice.batch();
    batch.add("bob", "one").unwrap();
    let huge = vec![b'x'; relay_proto::DEFAULT_MAX_FRAME_LEN + 1];
    match batch.add("bob", &huge) {
        Err(SendError::TooLarge { len, max }) => assert!(len > max, "{len} > {max}"),
        other => panic!("expected TooLarge, got {other:?}"),
    }
    assert!(matches!(batch.add("no such name!", "x"), Err(SendError::InvalidDestination { .. })));
    assert_eq!(batch.len(), 1, "refused messages are not in the batch");
    batch.add("bob", "two").unwrap();
    batch.send().await.unwrap();
    assert_eq!(next_message(&mut bob_events).await.1, "one");
    assert_eq!(next_message(&mut bob_events).await.1, "two");
    server.stop().await;
}

#[tokio::test]
async fn a_taken_name_is_refused_and_the_owner_keeps_it() {
    let server = TestServer::start().await;
    let (alice, mut alice_events) = server.connect("alice").await;
    let second = within(Client::connect(&server.url(), "alice")).await;
    assert!(matches!(second, Err(ConnectError::NameTaken { ref name }) if name == "alice"));
    // The first alice still receives messages.
    let (bob, _bob_events) = server.connect("bob").await;
    bob.send("alice", "still yours").await.unwrap();
    assert_eq!(next_message(&mut alice_events).await, ("bob".into(), "still yours".into()));
    assert_eq!(server.handle.users()[0], ("alice".to_string(), alice.local_addr()));
    server.stop().await;
}

#[tokio::test]
async fn of_50_concurrent_registrations_of_one_name_exactly_one_wins() {
    let server = TestServer::start().await;
    let url = server.url();
    let attempts: Vec<_> = (0..50)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move { Client::connect(&url, "popular").await })
        })
        .collect();
    let mut winners = Vec::new();
    let mut taken = 0;
    for attempt in attempts {
        match within(attempt).await.unwrap() {
            Ok(client) => winners.push(client),
            Err(ConnectError::NameTaken { .. }) => taken += 1,
            Err(e) => panic!("unexpected error: {e}"),
        }
    }
    assert_eq!((winners.len(), taken), (1, 49));
    assert_eq!(server.handle.online(), 1);
    server.stop().await;
}

#[tokio::test]
async fn messages_are_routed_by_name_and_by_address() {
    let server = TestServer::start().await;
    let (alice, _alice_events) = server.connect("alice").await;
    let (bob, mut bob_events) = server.connect("bob").await;

    alice.send("bob", "by name").await.unwrap();
    assert_eq!(next_message(&mut bob_events).await, ("alice".into(), "by name".into()));

    let bob_addr = bob.local_addr().to_string();
    let id = alice.send(&bob_addr, "by address").await.unwrap();
    match next_event(&mut bob_events).await {
        Event::Message { id: got, from, content, .. } => {
            assert_eq!((got, &*from, &content[..]), (id, "alice", &b"by address"[..]));
        }
        other => panic!("{other:?}"),
    }
    server.stop().await;
}

#[tokio::test]
async fn ipv6_clients_are_served_and_addressable() {
    let server = TestServer::bind("[::1]:0", relay_server::Config::default()).await;
    let (alice, _a) = server.connect("alice").await;
    let (bob, mut bob_events) = server.connect("bob").await;
    let bob_addr = bob.local_addr().to_string();
    assert!(bob_addr.starts_with("[::1]:"), "{bob_addr}");
    alice.send(&bob_addr, "over v6").await.unwrap();
    assert_eq!(next_message(&mut bob_events).await, ("alice".into(), "over v6".into()));
    server.stop().await;
}

#[tokio::test]
async fn binary_content_arrives_intact() {
    let server = TestServer::start().await;
    let (alice, _a) = server.connect("alice").await;
    let (_bob, mut bob_events) = server.connect("bob").await;
    let content: Vec<u8> = (0..=255).collect();
    alice.send("bob", content.clone()).await.unwrap();
    match next_event(&mut bob_events).await {
        Event::Message { content: got, .. } => assert_eq!(got, Bytes::from(content)),
        other => panic!("{other:?}"),
    }
    server.stop().await;
}

#[tokio::test]
async fn an_unknown_destination_gets_not_found_with_the_message_id() {
    let server = TestServer::start().await;
    let (alice, mut events) = server.connect("alice").await;
    let first = alice.send("nobody", "hello?").await.unwrap();
    let second = alice.send("127.0.0.1:1", "anyone?").await.unwrap();
    assert_ne!(first, second);
    // A name is looked up in the name table (it might be bound, and then the message is
    // stored), an address is not: replies about different messages may come in either order.
    let mut got = vec![next_event(&mut events).await, next_event(&mut events).await];
    got.sort_by_key(|e| match e {
        Event::NotFound { id, .. } => *id,
        _ => 0,
    });
    let mut expected = vec![
        Event::NotFound { id: first, to: "nobody".into() },
        Event::NotFound { id: second, to: "127.0.0.1:1".into() },
    ];
    expected.sort_by_key(|e| match e {
        Event::NotFound { id, .. } => *id,
        _ => 0,
    });
    assert_eq!(got, expected);
    server.stop().await;
}

#[tokio::test]
async fn going_offline_frees_the_name_at_once() {
    let server = TestServer::start().await;
    let (alice, _events) = server.connect("alice").await;
    let (bob, mut bob_events) = server.connect("bob").await;
    within(alice.offline()).await.unwrap();
    assert!(alice.is_closed());
    // `offline` returns after the server closed the session, so the name is already free.
    assert!(!server.handle.users().iter().any(|(n, _)| n == "alice"));
    let id = bob.send("alice", "gone?").await.unwrap();
    assert_eq!(next_event(&mut bob_events).await, Event::NotFound { id, to: "alice".into() });
    let (again, _e) = server.connect("alice").await;
    assert_eq!(again.name(), "alice");
    server.stop().await;
}

#[tokio::test]
async fn an_abrupt_disconnect_frees_the_name() {
    let server = TestServer::start().await;
    let peer = RawPeer::register(server.addr, "carol").await;
    assert_eq!(server.handle.online(), 1);
    drop(peer);
    server.wait_until_gone("carol").await;
    let (carol, _e) = server.connect("carol").await;
    assert_eq!(carol.name(), "carol");
    server.stop().await;
}

#[tokio::test]
async fn a_thousand_messages_arrive_in_order() {
    let server = TestServer::start().await;
    let (alice, _a) = server.connect("alice").await;
    let (_bob, mut bob_events) = server.connect("bob").await;
    let sender = tokio::spawn(async move {
        for i in 0..1000u32 {
            alice.send("bob", i.to_string()).await.unwrap();
        }
        alice
    });
    for i in 0..1000u32 {
        assert_eq!(next_message(&mut bob_events).await, ("alice".into(), i.to_string()));
    }
    within(sender).await.unwrap();
    server.stop().await;
}

#[tokio::test]
async fn batched_and_single_sends_keep_their_order_and_ids() {
    let server = TestServer::start().await;
    let (alice, mut alice_events) = server.connect("alice").await;
    let (_bob, mut bob_events) = server.connect("bob").await;
    let first = alice.send("bob", "0").await.unwrap();
    let mut batch = alice.batch();
    let mut ids = vec![first];
    for i in 1..=300u32 {
        ids.push(batch.add("bob", i.to_string()).unwrap());
    }
    // A bad destination is refused at once and leaves the batch as it was.
    assert!(matches!(batch.add("two words", "x"), Err(SendError::InvalidDestination { .. })));
    let missing = batch.add("nobody", "lost").unwrap();
    assert_eq!(batch.len(), 301);
    batch.send().await.unwrap();
    assert!(batch.is_empty());
    ids.push(alice.send("bob", "301").await.unwrap());
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "ids increase: {ids:?}");

    for i in 0..=301u32 {
        assert_eq!(next_message(&mut bob_events).await, ("alice".into(), i.to_string()));
    }
    match next_event(&mut alice_events).await {
        Event::NotFound { id, to } => assert_eq!((id, to.as_str()), (missing, "nobody")),
        other => panic!("{other:?}"),
    }
    server.stop().await;
}

#[tokio::test]
async fn users_are_listed_with_addresses() {
    let server = TestServer::start().await;
    let (alice, mut events) = server.connect("alice").await;
    let (bob, _b) = server.connect("bob").await;
    let id = alice.list_users().await.unwrap();
    match next_event(&mut events).await {
        Event::Users { id: got, users, .. } => {
            assert_eq!(got, id);
            let listed: Vec<_> = users.iter().map(|u| (u.name.as_str(), u.addr.clone())).collect();
            assert_eq!(
                listed,
                vec![
                    ("alice", alice.local_addr().to_string()),
                    ("bob", bob.local_addr().to_string())
                ]
            );
        }
        other => panic!("{other:?}"),
    }
    server.stop().await;
}

#[tokio::test]
async fn exit_reaches_50_clients_and_each_one_ends() {
    let server = TestServer::start().await;
    let mut clients = Vec::new();
    for i in 0..50 {
        clients.push(server.connect(&format!("user{i}")).await);
    }
    assert_eq!(server.handle.online(), 50);
    server.shutdown.cancel();
    for (client, mut events) in clients {
        assert!(matches!(next_event(&mut events).await, Event::ServerShutdown { .. }));
        assert_eq!(within(events.next()).await, None, "{} got more events", client.name());
        wait_until(|| client.is_closed()).await;
    }
    within(server.task).await.unwrap();
}

#[tokio::test]
async fn from_is_stamped_by_the_server() {
    let server = TestServer::start().await;
    let (_bob, mut bob_events) = server.connect("bob").await;
    let mut mallory = RawPeer::register(server.addr, "mallory").await;
    let mut spoofed = Message::send(5, "bob", "it's me, alice");
    spoofed.from = "alice".into();
    mallory.send(spoofed).await;
    assert_eq!(next_message(&mut bob_events).await, ("mallory".into(), "it's me, alice".into()));
    server.stop().await;
}

#[tokio::test]
async fn invalid_requests_get_typed_errors_and_the_session_goes_on() {
    let server = TestServer::start().await;
    let (_bob, mut bob_events) = server.connect("bob").await;
    let mut peer = RawPeer::register(server.addr, "mallory").await;

    peer.send(Message::register(2, "mallory2")).await;
    assert!(matches!(
        peer.recv().await,
        Some(ServerEvent::Reply { id: 2, status: Status::InvalidRequest, closing: false, .. })
    ));
    let mut addressed_exit = Message::offline(3);
    addressed_exit.to = "bob".into();
    peer.send(addressed_exit).await;
    assert!(matches!(
        peer.recv().await,
        Some(ServerEvent::Reply { id: 3, status: Status::InvalidRequest, closing: false, .. })
    ));
    peer.send(Message::send(4, "not a name", "x")).await;
    assert!(matches!(
        peer.recv().await,
        Some(ServerEvent::Reply { id: 4, status: Status::InvalidName, closing: false, .. })
    ));
    peer.send(Message::reply(5, Status::Registered, "", "")).await;
    assert!(matches!(
        peer.recv().await,
        Some(ServerEvent::Reply { id: 5, status: Status::InvalidRequest, .. })
    ));
    // Still registered, bob still online: the exit flag only ever ends mallory's session.
    peer.send(Message::send(6, "bob", "still here")).await;
    assert_eq!(next_message(&mut bob_events).await, ("mallory".into(), "still here".into()));
    assert_eq!(server.handle.online(), 2);
    server.stop().await;
}

#[tokio::test]
async fn registration_errors_are_typed_and_close_the_connection() {
    let server = TestServer::start().await;
    // Sending before registering.
    let mut peer = RawPeer::connect(server.addr).await;
    peer.send(Message::send(1, "bob", "hi")).await;
    assert_eq!(peer.closing_status().await, Some(Status::InvalidRequest));
    // A bad name, sent raw so the client library's own check is bypassed.
    let mut peer = RawPeer::connect(server.addr).await;
    peer.send(Message::register(1, "two words")).await;
    assert_eq!(peer.closing_status().await, Some(Status::InvalidName));
    // Another protocol version.
    let mut peer = RawPeer::connect(server.addr).await;
    let mut future = Message::register(1, "zed");
    future.version = 99;
    peer.send(future).await;
    assert_eq!(peer.closing_status().await, Some(Status::UnsupportedVersion));
    assert_eq!(server.handle.online(), 0);
    server.stop().await;
}

#[tokio::test]
async fn garbage_and_oversized_frames_drop_only_their_sender() {
    let server = TestServer::start().await;
    let (alice, _a) = server.connect("alice").await;
    let (_bob, mut bob_events) = server.connect("bob").await;

    let mut garbage = RawPeer::register(server.addr, "garbage").await;
    garbage.send_raw(&[0, 0, 0, 6, 0xde, 0xad, 0xbe, 0xef, 0xff, 0xff]).await;
    assert_eq!(garbage.closing_status().await, Some(Status::Malformed));

    let mut oversized = RawPeer::register(server.addr, "oversized").await;
    oversized.send_raw(&[0x7f, 0xff, 0xff, 0xff]).await;
    assert_eq!(oversized.closing_status().await, Some(Status::FrameTooLarge));

    server.wait_until_gone("garbage").await;
    server.wait_until_gone("oversized").await;
    alice.send("bob", "unaffected").await.unwrap();
    assert_eq!(next_message(&mut bob_events).await, ("alice".into(), "unaffected".into()));
    server.stop().await;
}

/// Runs the operator console over `input` and returns what it printed.
async fn console(server: &TestServer, input: &str) -> String {
    let mut out = Vec::new();
    let handle = server.handle.clone();
    relay_server::run_console(input.as_bytes(), &mut out, handle, server.shutdown.clone())
        .await
        .unwrap();
    String::from_utf8(out).unwrap()
}

#[tokio::test]
async fn console_exit_shuts_the_server_down_and_end_of_input_does_not() {
    let server = TestServer::start().await;
    let (_alice, mut events) = server.connect("alice").await;

    // End of input: the console returns, the server keeps serving.
    let out = console(&server, "help\nlist\n").await;
    assert!(out.contains("EXIT"), "{out}");
    assert!(out.contains("1 online") && out.contains("alice 127.0.0.1:"), "{out}");
    assert!(!server.shutdown.is_cancelled());

    let out = console(&server, "bogus\nEXIT\nlist\n").await;
    assert!(out.contains("unknown command 'bogus'"), "{out}");
    assert!(out.contains("shutting down"), "{out}");
    assert!(server.shutdown.is_cancelled());
    assert!(matches!(next_event(&mut events).await, Event::ServerShutdown { .. }));
    tokio::time::timeout(WAIT, server.task).await.unwrap().unwrap();
}

#[tokio::test]
async fn dropping_every_client_handle_ends_the_session() {
    let server = TestServer::start().await;
    let (alice, events) = server.connect("alice").await;
    let clone = alice.clone();
    drop(alice);
    assert_eq!(server.handle.online(), 1, "a clone still holds the connection");
    drop((clone, events));
    server.wait_until_gone("alice").await;
    server.stop().await;
}

#[tokio::test]
async fn events_are_a_stream_that_ends_with_the_connection() {
    use futures_util::StreamExt;
    let server = TestServer::start().await;
    let (alice, events) = server.connect("alice").await;
    alice.send("alice", "one").await.unwrap();
    alice.send("alice", "two").await.unwrap();
    let got: Vec<Event> = within(events.take(2).collect()).await;
    let texts: Vec<&[u8]> = got
        .iter()
        .map(|e| match e {
            Event::Message { content, .. } => &content[..],
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(texts, [&b"one"[..], &b"two"[..]]);

    let (bob, mut events) = server.connect("bob").await;
    let (carol, _c) = server.connect("carol").await;
    carol.send("bob", "before").await.unwrap();
    assert!(matches!(within(StreamExt::next(&mut events)).await, Some(Event::Message { .. })));
    within(bob.offline()).await.unwrap();
    let rest: Vec<Event> = within(events.collect()).await;
    assert!(rest.is_empty(), "{rest:?}");
    server.stop().await;
}

/// A name becomes routable only once its welcome is queued: a client registering while
/// messages for its name are already pouring in always gets `Registered` first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_overtakes_the_welcome() {
    let server = TestServer::start().await;
    let (flood, mut flood_events) = server.connect("flood").await;
    // The flooder reads its replies (mostly `NotFound`): one that did not would, on a loaded
    // machine, outlast the write timeout and be dropped as a slow consumer mid-test.
    let draining = tokio::spawn(async move { while flood_events.next().await.is_some() {} });
    let stop = tokio_util::sync::CancellationToken::new();
    let flooding = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut batch = flood.batch();
            while !stop.is_cancelled() {
                for _ in 0..64 {
                    batch.add("late", "early bird").unwrap();
                }
                batch.send().await.unwrap();
                tokio::task::yield_now().await;
            }
        })
    };
    for _ in 0..30 {
        let (late, _events) = within(Client::connect(&server.url(), "late"))
            .await
            .expect("a message for the name arrived before the registration reply");
        within(late.offline()).await.unwrap();
    }
    stop.cancel();
    within(flooding).await.unwrap();
    server.stop().await;
    draining.abort();
}

/// Bursts from two senders to a receiver that keeps pausing: every message arrives once and in
/// its sender's order, whether it went in with the run of messages after it in the sender's
/// read (queued under one lock), or waited for room where a run stopped at a full outbox.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bursts_to_a_pausing_receiver_arrive_whole_and_in_order() {
    const EACH: usize = 3000;
    let server = TestServer::with_config(relay_server::Config {
        outbox_bytes: 16 * 1024 + 4,
        max_frame_len: 16 * 1024,
        send_wait: std::time::Duration::from_secs(15),
        kernel_unsent: 4096,
        ..relay_server::Config::default()
    })
    .await;
    // A small receive buffer: little beyond the outbox is in flight.
    let mut slow = RawPeer::connect_small_buffer(server.addr).await.register_as("slow").await;
    let mut senders = Vec::new();
    for name in ["ann", "ben"] {
        let (client, events) = server.connect(name).await;
        senders.push(tokio::spawn(async move {
            let mut batch = client.batch();
            for i in 0..EACH {
                batch.add("slow", format!("{name} {i} {}", "x".repeat(i % 300))).unwrap();
                if batch.len() == 500 {
                    batch.send().await.unwrap();
                }
            }
            batch.send().await.unwrap();
            (client, events)
        }));
    }
    let mut next = std::collections::HashMap::new();
    for got in 0..2 * EACH {
        if got % 200 == 0 {
            // Pauses, so the receiver's outbox fills and runs stop at it.
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        let (from, text) = match slow.recv().await {
            Some(ServerEvent::Message { from, content, .. }) => {
                (from, String::from_utf8(content.to_vec()).unwrap())
            }
            other => panic!("expected a message, got {other:?}"),
        };
        let mut parts = text.splitn(3, ' ');
        assert_eq!(parts.next(), Some(from.as_str()));
        let i: usize = parts.next().unwrap().parse().unwrap();
        let expected = next.entry(from.clone()).or_insert(0usize);
        assert_eq!(i, *expected, "from {from}");
        *expected += 1;
    }
    assert_eq!(next.values().copied().collect::<Vec<_>>(), vec![EACH, EACH]);
    for sender in senders {
        let (_client, mut events) = within(sender).await.unwrap();
        // Nothing was refused.
        assert!(events.try_next().is_none());
    }
    server.stop().await;
}
