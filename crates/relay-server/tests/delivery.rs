//! Durable delivery, in process: messages for an offline name bound to a key are stored on
//! disk (the sender is told `Stored`), delivered in order when it logs in, acknowledged by its
//! client, and their senders get `Delivered` receipts; unacknowledged messages of a session
//! that ends are kept; limits refuse with a typed reply.

// Helpers here fail the test by panicking, like the tests themselves.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::Path;

use common::{RawPeer, TestServer, next_event, within};
use relay_client::{Client, ConnectError, Event, Events, Identity};
use relay_proto::{Message, NONCE_LEN, ServerEvent, Status};
use relay_server::{Config, InboxLimits};

fn key(n: u8) -> Identity {
    Identity::from_seed(&[n; 32])
}

fn on(dir: &Path) -> Config {
    Config { data_dir: dir.to_path_buf(), ..Config::default() }
}

async fn keyed(server: &TestServer, name: &str, n: u8) -> (Client, Events) {
    try_keyed(server, name, n).await.unwrap()
}

async fn try_keyed(
    server: &TestServer,
    name: &str,
    n: u8,
) -> Result<(Client, Events), ConnectError> {
    within(Client::builder(server.url(), name).identity(key(n)).connect()).await
}

/// Binds `name` to key `n` and goes offline.
async fn bind(server: &TestServer, name: &str, n: u8) {
    let (client, _events) = keyed(server, name, n).await;
    within(client.offline()).await.unwrap();
    server.wait_until_gone(name).await;
}

/// The next event that is not a receipt or a `Stored` notice.
async fn next_non_notice(events: &mut Events) -> Event {
    loop {
        match next_event(events).await {
            Event::Stored { .. } | Event::Delivered { .. } => {}
            other => return other,
        }
    }
}

/// Collects `Stored` notices until `n` have come; any refusal fails the test.
async fn stored(events: &mut Events, n: usize) -> Vec<u64> {
    let mut ids = Vec::new();
    while ids.len() < n {
        match next_event(events).await {
            Event::Stored { id, .. } => ids.push(id),
            other => panic!("expected Stored, got {other:?}"),
        }
    }
    ids
}

/// Collects receipts until every id in `ids` has one.
async fn receipts(events: &mut Events, ids: &[u64]) {
    let mut got = Vec::new();
    while got.len() < ids.len() {
        match next_event(events).await {
            Event::Delivered { ids, .. } => got.extend(ids),
            Event::Stored { .. } => {}
            other => panic!("expected a receipt, got {other:?}"),
        }
    }
    got.sort_unstable();
    let mut want = ids.to_vec();
    want.sort_unstable();
    assert_eq!(got, want);
}

/// The next `n` messages as `(from, content, seq, time)`.
async fn messages(events: &mut Events, n: usize) -> Vec<(String, String, u64, u64)> {
    let mut got = Vec::new();
    while got.len() < n {
        match next_non_notice(events).await {
            Event::Message { from, content, seq, time, .. } => got.push((
                from.to_string(),
                String::from_utf8(content.to_vec()).unwrap(),
                seq,
                time,
            )),
            other => panic!("expected a message, got {other:?}"),
        }
    }
    got
}

/// A receiver that takes its messages in place (`Events::drain`) gets every one, stored and
/// live, once and in order, and acknowledges them as it goes: its sender gets a receipt for
/// each, and nothing is delivered again when it logs in later.
#[tokio::test]
async fn messages_taken_in_place_are_all_delivered_in_order_and_receipted() {
    use relay_client::Received;
    let server = TestServer::start().await;
    bind(&server, "bob", 2).await;
    let (alice, mut alice_events) = keyed(&server, "alice", 1).await;
    for i in 0..300 {
        alice.send("bob", format!("{i}")).await.unwrap();
    }
    stored(&mut alice_events, 300).await;
    let (bob, mut bob_events) = keyed(&server, "bob", 2).await;
    // Live ones behind the stored ones, sent in batches so that many arrive in one read.
    for first in (300..3000).step_by(100) {
        let mut batch = alice.batch();
        for i in first..first + 100 {
            batch.add("bob", format!("{i}")).unwrap();
        }
        batch.send().await.unwrap();
    }
    let (mut next, mut last_seq) = (0, 0);
    while next < 3000 {
        assert!(within(bob_events.ready()).await, "bob's connection ended");
        bob_events.drain(|received| match received {
            Received::Message(msg) => {
                assert_eq!((msg.from, msg.content), ("alice", format!("{next}").as_bytes()));
                assert!(msg.seq > last_seq, "numbers only grow");
                (next, last_seq) = (next + 1, msg.seq);
            }
            Received::Event(Event::Delivered { .. } | Event::Stored { .. }) => {}
            other => panic!("unexpected {other:?}"),
        });
    }
    // Every message got its receipt (bob's acknowledgements covered them all).
    let mut receipted = 0;
    while receipted < 3000 {
        match next_event(&mut alice_events).await {
            Event::Delivered { ids, .. } => receipted += ids.len(),
            other => panic!("expected a receipt, got {other:?}"),
        }
    }
    assert_eq!(receipted, 3000);
    // Nothing is delivered again at his next login.
    within(bob.offline()).await.unwrap();
    server.wait_until_gone("bob").await;
    let (_bob, mut bob_events) = keyed(&server, "bob", 2).await;
    alice.send("bob", "after").await.unwrap();
    let got = messages(&mut bob_events, 1).await;
    assert_eq!(got[0].1, "after");
}

#[tokio::test]
async fn a_message_for_an_offline_key_holder_is_stored_delivered_at_login_and_receipted() {
    let server = TestServer::start().await;
    bind(&server, "bob", 2).await;
    let (alice, mut alice_events) = keyed(&server, "alice", 1).await;
    let before = relay_server_now();
    let ids = [
        alice.send("bob", "one").await.unwrap(),
        alice.send("Bob", "two").await.unwrap(),
        alice.send("bob", "three").await.unwrap(),
    ];
    assert_eq!(stored(&mut alice_events, 3).await, ids);

    let (_bob, mut bob_events) = keyed(&server, "bob", 2).await;
    let got = messages(&mut bob_events, 3).await;
    let texts: Vec<&str> = got.iter().map(|(_, c, _, _)| c.as_str()).collect();
    assert_eq!(texts, ["one", "two", "three"]);
    assert!(got.iter().all(|(from, ..)| from == "alice"));
    // Numbered in order, and stamped with when alice sent them.
    assert!(got.windows(2).all(|w| w[0].2 < w[1].2), "{got:?}");
    assert!(got.iter().all(|m| m.3 >= before && m.3 <= relay_server_now()));
    // bob's client acknowledged them as it handed them over: alice gets the receipts.
    receipts(&mut alice_events, &ids).await;

    // And live traffic afterwards is numbered after the stored messages.
    let live = alice.send("bob", "four").await.unwrap();
    let four = messages(&mut bob_events, 1).await;
    assert_eq!(four[0].1, "four");
    assert!(four[0].2 > got[2].2);
    receipts(&mut alice_events, &[live]).await;
    server.stop().await;
}

fn relay_server_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64
}

#[tokio::test]
async fn a_receipt_for_an_offline_sender_waits_for_its_next_login() {
    let server = TestServer::start().await;
    bind(&server, "bob", 2).await;
    let (alice, mut alice_events) = keyed(&server, "alice", 1).await;
    let id = alice.send("bob", "hi").await.unwrap();
    stored(&mut alice_events, 1).await;
    within(alice.offline()).await.unwrap();
    server.wait_until_gone("alice").await;

    let (_bob, mut bob_events) = keyed(&server, "bob", 2).await;
    assert_eq!(messages(&mut bob_events, 1).await[0].1, "hi");
    // alice logs in again later: the receipt was kept for her.
    let (_alice, mut alice_events) = keyed(&server, "alice", 1).await;
    match next_event(&mut alice_events).await {
        Event::Delivered { to, ids, seq, .. } => {
            assert_eq!((to.as_str(), ids), ("bob", vec![id]));
            assert!(seq > 0, "a stored receipt is numbered");
        }
        other => panic!("expected a receipt, got {other:?}"),
    }
    server.stop().await;
}

#[tokio::test]
async fn nothing_is_stored_for_a_guest_name_or_a_name_nobody_holds() {
    let server = TestServer::start().await;
    let (guest, _g) = server.connect("carol").await;
    within(guest.offline()).await.unwrap();
    server.wait_until_gone("carol").await;
    let (alice, mut events) = keyed(&server, "alice", 1).await;
    for to in ["carol", "nobody"] {
        let id = alice.send(to, "x").await.unwrap();
        assert_eq!(next_event(&mut events).await, Event::NotFound { id, to: to.into() });
    }
    // A version 1 sender cannot be told `Stored`: for it, an offline name is not found.
    bind(&server, "bob", 2).await;
    let mut v1 = RawPeer::connect(server.addr).await;
    v1.send(Message::register(1, "old").with_version(1)).await;
    assert!(matches!(v1.recv().await, Some(ServerEvent::Reply { status: Status::Registered, .. })));
    v1.send(Message::send(5, "bob", "hi").with_version(1)).await;
    match v1.recv().await {
        Some(ServerEvent::Reply { id: 5, status: Status::NotFound, .. }) => {}
        other => panic!("expected NotFound, got {other:?}"),
    }
    server.stop().await;
}

#[tokio::test]
async fn stored_messages_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::with_config(on(dir.path())).await;
    bind(&server, "bob", 2).await;
    let (alice, mut alice_events) = keyed(&server, "alice", 1).await;
    for i in 0..50 {
        alice.send("bob", format!("m{i}")).await.unwrap();
    }
    stored(&mut alice_events, 50).await;
    drop((alice, alice_events));
    server.stop().await;

    let server = TestServer::with_config(on(dir.path())).await;
    let (_bob, mut bob_events) = keyed(&server, "bob", 2).await;
    let got = messages(&mut bob_events, 50).await;
    let texts: Vec<String> = got.into_iter().map(|m| m.1).collect();
    let want: Vec<String> = (0..50).map(|i| format!("m{i}")).collect();
    assert_eq!(texts, want);
    server.stop().await;
}

/// A raw version 2 peer logged in with key `n` as `name`; it acknowledges nothing.
async fn raw_keyed(server: &TestServer, name: &str, n: u8) -> RawPeer {
    let mut peer = RawPeer::connect(server.addr).await;
    peer.send(Message::hello(0)).await;
    let nonce: [u8; NONCE_LEN] = match peer.recv().await {
        Some(ServerEvent::Greeting { greeting, .. }) => greeting.nonce,
        other => panic!("expected a greeting, got {other:?}"),
    };
    peer.send(Message::register_with_key(1, name, key(n).credentials(&nonce, name))).await;
    match peer.recv().await {
        Some(ServerEvent::Reply { status: Status::Registered, .. }) => peer,
        other => panic!("expected Registered, got {other:?}"),
    }
}

#[tokio::test]
async fn what_a_client_took_but_did_not_acknowledge_is_delivered_again_and_deduplicated() {
    let server = TestServer::start().await;
    bind(&server, "bob", 2).await;
    let (alice, mut alice_events) = keyed(&server, "alice", 1).await;
    // bob is online on a client that reads but never acknowledges.
    let mut bob = raw_keyed(&server, "bob", 2).await;
    let ids: Vec<u64> =
        [alice.send("bob", "a").await.unwrap(), alice.send("bob", "b").await.unwrap()].into();
    let mut seqs = Vec::new();
    while seqs.len() < 2 {
        match bob.recv().await {
            Some(ServerEvent::Message { seq, .. }) => seqs.push(seq),
            Some(_) => {}
            None => panic!("bob's connection ended"),
        }
    }
    // bob vanishes with both unacknowledged: nothing is reported undelivered to alice...
    drop(bob);
    server.wait_until_gone("bob").await;
    // ...and a message sent after he left is stored behind them.
    let c = alice.send("bob", "c").await.unwrap();
    assert_eq!(stored(&mut alice_events, 1).await, vec![c]);

    // A client that had handed over "a" (and saved its number) logs in: it gets "b" again
    // and then "c", and drops the duplicate "a" by number.
    let (_bob, mut bob_events) = within(
        Client::builder(server.url(), "bob").identity(key(2)).resume_after(seqs[0]).connect(),
    )
    .await
    .unwrap();
    let got = messages(&mut bob_events, 2).await;
    assert_eq!((got[0].1.as_str(), got[0].2), ("b", seqs[1]));
    assert_eq!(got[1].1, "c");
    // The receipts cover everything bob's client took, the one it had before included.
    let mut all = ids.clone();
    all.push(c);
    receipts(&mut alice_events, &all).await;
    server.stop().await;
}

#[tokio::test]
async fn a_full_inbox_refuses_with_inbox_full_and_stores_nothing_more() {
    let limits = InboxLimits { messages: 3, ..InboxLimits::default() };
    let server = TestServer::with_config(Config { inbox: limits, ..Config::default() }).await;
    bind(&server, "bob", 2).await;
    let (alice, mut alice_events) = keyed(&server, "alice", 1).await;
    for i in 0..3 {
        alice.send("bob", format!("{i}")).await.unwrap();
    }
    stored(&mut alice_events, 3).await;
    let over = alice.send("bob", "3").await.unwrap();
    match next_event(&mut alice_events).await {
        Event::Rejected { id, status: Status::InboxFull, to, detail } => {
            assert_eq!((id, to.as_str()), (over, "bob"));
            assert!(detail.contains("3 messages"), "{detail}");
        }
        other => panic!("expected InboxFull, got {other:?}"),
    }
    let (_bob, mut bob_events) = keyed(&server, "bob", 2).await;
    let texts: Vec<String> = messages(&mut bob_events, 3).await.into_iter().map(|m| m.1).collect();
    assert_eq!(texts, ["0", "1", "2"]);
    server.stop().await;
}

/// While bob's inbox is being delivered at login, alice keeps sending: everything arrives
/// once, in the order she sent it, stored ones first.
#[tokio::test]
async fn nothing_new_overtakes_what_was_stored() {
    let server = TestServer::start().await;
    bind(&server, "bob", 2).await;
    let (alice, mut alice_events) = keyed(&server, "alice", 1).await;
    let stored_count = 2000;
    for i in 0..stored_count {
        alice.send("bob", format!("{i}")).await.unwrap();
    }
    stored(&mut alice_events, stored_count).await;
    let sender = alice.clone();
    let total = stored_count + 2000;
    let sending = tokio::spawn(async move {
        for i in stored_count..total {
            sender.send("bob", format!("{i}")).await.unwrap();
        }
    });
    let (_bob, mut bob_events) = keyed(&server, "bob", 2).await;
    let got = messages(&mut bob_events, total).await;
    within(sending).await.unwrap();
    let texts: Vec<usize> = got.iter().map(|m| m.1.parse().unwrap()).collect();
    assert_eq!(texts, (0..total).collect::<Vec<_>>());
    assert!(got.windows(2).all(|w| w[0].2 < w[1].2));
    server.stop().await;
}

#[tokio::test]
async fn a_message_that_waits_too_long_expires_and_its_sender_is_told() {
    let limits = InboxLimits { max_age_ms: 50, ..InboxLimits::default() };
    let config = Config {
        inbox: limits,
        inbox_sweep: std::time::Duration::from_millis(100),
        ..Config::default()
    };
    let server = TestServer::with_config(config).await;
    bind(&server, "bob", 2).await;
    let (alice, mut alice_events) = keyed(&server, "alice", 1).await;
    let id = alice.send("bob", "soon stale").await.unwrap();
    stored(&mut alice_events, 1).await;
    match next_event(&mut alice_events).await {
        Event::Rejected { id: got, status: Status::Expired, to, .. } => {
            assert_eq!((got, to.as_str()), (id, "bob"));
        }
        other => panic!("expected Expired, got {other:?}"),
    }
    assert_eq!(within(server.handle.inboxes()).await.unwrap().messages, 0);
    // bob logs in to nothing: a message sent now arrives first.
    let (_bob, mut bob_events) = keyed(&server, "bob", 2).await;
    alice.send("bob", "fresh").await.unwrap();
    assert_eq!(messages(&mut bob_events, 1).await[0].1, "fresh");
    server.stop().await;
}

#[tokio::test]
async fn the_operator_sees_inbox_totals_and_can_purge_one() {
    let server = TestServer::start().await;
    bind(&server, "bob", 2).await;
    bind(&server, "carol", 3).await;
    let (alice, mut alice_events) = keyed(&server, "alice", 1).await;
    for to in ["bob", "bob", "carol"] {
        alice.send(to, "12345").await.unwrap();
    }
    stored(&mut alice_events, 3).await;
    let totals = within(server.handle.inboxes()).await.unwrap();
    assert_eq!((totals.recipients, totals.messages), (2, 3));
    assert!(totals.bytes > 15, "{totals:?}");
    assert_eq!(within(server.handle.purge("Bob")).await.unwrap(), 2);
    let totals = within(server.handle.inboxes()).await.unwrap();
    assert_eq!((totals.recipients, totals.messages), (1, 1));
    // Through the console too.
    let (input, output) = (b"inboxes\npurge carol\ninboxes\npurge\n".as_slice(), Vec::new());
    let mut output = std::io::Cursor::new(output);
    let shutdown = tokio_util::sync::CancellationToken::new();
    within(relay_server::run_console(input, &mut output, server.handle.clone(), shutdown))
        .await
        .unwrap();
    let text = String::from_utf8(output.into_inner()).unwrap();
    assert!(text.contains("1 recipients, 1 messages"), "{text}");
    assert!(text.contains("purged 1 messages stored for carol"), "{text}");
    assert!(text.contains("0 recipients, 0 messages, 0 bytes"), "{text}");
    assert!(text.contains("usage: purge NAME"), "{text}");
    let (_bob, mut bob_events) = keyed(&server, "bob", 2).await;
    alice.send("bob", "after").await.unwrap();
    assert_eq!(messages(&mut bob_events, 1).await[0].1, "after");
    server.stop().await;
}

/// A tmpfs of `size` mounted on `dir` for as long as it lives (the tests run as root, as CI
/// does; a machine that cannot mount fails this test loudly rather than skipping it).
struct TinyFs {
    dir: tempfile::TempDir,
}

impl TinyFs {
    fn mount(size: &str) -> TinyFs {
        let dir = tempfile::tempdir().unwrap();
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .expect("cannot run mount");
        assert!(status.success(), "mounting a tmpfs needs root (CI runs as root)");
        TinyFs { dir }
    }

    fn resize(&self, size: &str) {
        let status = std::process::Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(self.dir.path())
            .status()
            .unwrap();
        assert!(status.success());
    }
}

impl Drop for TinyFs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(self.dir.path()).status();
    }
}

#[tokio::test]
async fn a_full_disk_refuses_with_the_reason_keeps_online_traffic_and_recovers() {
    let fs = TinyFs::mount("3m");
    let server = TestServer::with_config(on(fs.dir.path())).await;
    bind(&server, "bob", 2).await;
    let (alice, mut alice_events) = keyed(&server, "alice", 1).await;
    let big = vec![b'x'; 60_000];
    // Store until the disk is full: every message gets an answer, the last a refusal.
    let detail = loop {
        let id = alice.send("bob", big.clone()).await.unwrap();
        match next_event(&mut alice_events).await {
            Event::Stored { id: got, .. } => assert_eq!(got, id),
            Event::Rejected { id: got, status: Status::NotDelivered, detail, .. } => {
                assert_eq!(got, id);
                break detail;
            }
            other => panic!("expected Stored or NotDelivered, got {other:?}"),
        }
    };
    assert!(detail.contains("not stored for bob"), "{detail}");
    // Online traffic goes on, for guests and key holders alike.
    let (carol, _c) = server.connect("carol").await;
    let (_dave, mut dave_events) = server.connect("dave").await;
    carol.send("dave", "still here").await.unwrap();
    assert_eq!(common::next_message(&mut dave_events).await.1, "still here");
    let (_erin, mut erin_events) = {
        let (erin, events) = server.connect("erin").await;
        (erin, events)
    };
    alice.send("erin", "and here").await.unwrap();
    assert_eq!(common::next_message(&mut erin_events).await.1, "and here");

    // Space comes back: storing works again.
    fs.resize("64m");
    let id = alice.send("bob", "after").await.unwrap();
    match next_event(&mut alice_events).await {
        Event::Stored { id: got, .. } => assert_eq!(got, id),
        other => panic!("expected Stored, got {other:?}"),
    }
    // Everything stored before the disk filled is still there, then the new one.
    let (_bob, mut bob_events) = keyed(&server, "bob", 2).await;
    let totals = within(server.handle.inboxes()).await.unwrap();
    let got = messages(&mut bob_events, totals.messages as usize).await;
    assert_eq!(got.last().unwrap().1, "after");
    assert!(got[..got.len() - 1].iter().all(|m| m.1.len() == 60_000));
    server.stop().await;
}

#[tokio::test]
async fn a_released_name_takes_its_inbox_with_it() {
    let server = TestServer::start().await;
    bind(&server, "bob", 2).await;
    let (alice, mut alice_events) = keyed(&server, "alice", 1).await;
    alice.send("bob", "for the old bob").await.unwrap();
    stored(&mut alice_events, 1).await;
    assert!(within(server.handle.release("bob")).await.unwrap().is_some());
    assert_eq!(within(server.handle.inboxes()).await.unwrap().messages, 0);
    // Whoever binds the name next starts with an empty inbox.
    let (_new_bob, mut new_bob_events) = keyed(&server, "bob", 9).await;
    alice.send("bob", "hello, new bob").await.unwrap();
    assert_eq!(messages(&mut new_bob_events, 1).await[0].1, "hello, new bob");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_holder_that_falls_behind_gets_everything_later_in_order_and_no_sender_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::with_config(Config {
        outbox_bytes: 128 * 1024,
        send_wait: std::time::Duration::from_millis(100),
        // Not read for a while on purpose: not a slow consumer to drop.
        write_timeout: std::time::Duration::from_secs(120),
        ..on(dir.path())
    })
    .await;
    let (_bob, mut bob_events) = keyed(&server, "bob", 2).await;
    let (alice, mut alice_events) = keyed(&server, "alice", 1).await;
    // Bob takes nothing while alice sends far more than his outbox, the kernel's buffers and
    // his client's queue hold (2,000 × 16 KiB = 32 MiB).
    const N: usize = 2000;
    let filler = "x".repeat(16 * 1024);
    let mut ids = Vec::with_capacity(N);
    for i in 0..N {
        ids.push(alice.send("bob", format!("{i:05} {filler}")).await.unwrap());
        if let Some(event) = alice_events.try_next() {
            assert!(matches!(event, Event::Delivered { .. }), "alice was told {event:?}");
        }
    }
    // What did not fit went to his inbox rather than being refused.
    let mut overflowed = false;
    for _ in 0..2000 {
        if within(server.handle.inboxes()).await.unwrap().messages > 0 {
            overflowed = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert!(overflowed, "nothing went to bob's inbox");
    // Bob catches up: every message once, in the order sent.
    let got = messages(&mut bob_events, N).await;
    for (i, (from, content, _, _)) in got.iter().enumerate() {
        assert_eq!(from, "alice");
        assert_eq!(&content[..5], format!("{i:05}"), "message {i} out of order");
    }
    let seqs: Vec<u64> = got.iter().map(|m| m.2).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "sequence numbers must grow");
    // And alice hears that each was delivered; none was refused.
    let mut delivered = std::collections::HashSet::new();
    while delivered.len() < N {
        match next_event(&mut alice_events).await {
            Event::Delivered { ids, .. } => delivered.extend(ids),
            other => panic!("alice was told {other:?}"),
        }
    }
    assert!(ids.iter().all(|id| delivered.contains(id)));
    // Live again: a new message arrives without the store.
    alice.send("bob", "live").await.unwrap();
    assert_eq!(messages(&mut bob_events, 1).await[0].1, "live");
    server.stop().await;
}

#[tokio::test]
async fn a_live_receipt_is_numbered_like_a_message_and_acknowledged() {
    let server = TestServer::start().await;
    let (_bob, mut bob_events) = keyed(&server, "bob", 2).await;
    let (alice, mut alice_events) = keyed(&server, "alice", 1).await;
    let mut last = 0;
    for i in 0..3 {
        let id = alice.send("bob", format!("{i}")).await.unwrap();
        assert_eq!(messages(&mut bob_events, 1).await[0].1, format!("{i}"));
        match next_event(&mut alice_events).await {
            Event::Delivered { ids, seq, .. } => {
                assert_eq!(ids, vec![id]);
                assert!(seq > last, "receipt {i} numbered {seq} after {last}");
                last = seq;
            }
            other => panic!("expected a receipt, got {other:?}"),
        }
    }
    // alice's client acknowledged them: nothing of hers is left to move to her inbox when
    // she leaves.
    within(alice.offline()).await.unwrap();
    server.wait_until_gone("alice").await;
    assert_eq!(within(server.handle.inboxes()).await.unwrap().messages, 0);
    server.stop().await;
}
