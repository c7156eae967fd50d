//! Hostile input, overload and faults, in-process with small limits and short timeouts:
//! each limit holds, its error is typed, and only the offending connection is affected.

// Helpers here fail the test by panicking, like the tests themselves.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::{RawPeer, TestServer, next_event, next_message, wait_until, within};
use relay_client::{Client, ConnectError, Event};
use relay_proto::{Message, MessageCodec, ServerEvent, Status};
use relay_server::Config;
use tokio_util::codec::Encoder;

fn config() -> Config {
    Config::default()
}

#[tokio::test]
async fn an_oversized_header_before_registering_is_refused_from_the_header_alone() {
    let server = TestServer::start().await;
    let mut peer = RawPeer::connect(server.addr).await;
    // 2 KiB is fine after registering but over the 1 KiB pre-registration limit. Only the
    // header is sent: the server must answer without waiting for the body.
    peer.send_raw(&2048u32.to_be_bytes()).await;
    assert_eq!(peer.closing_status().await, Some(Status::FrameTooLarge));
    server.stop().await;
}

#[tokio::test]
async fn a_length_bomb_inside_a_valid_frame_is_malformed_and_harms_no_one() {
    let server = TestServer::start().await;
    let (alice, _a) = server.connect("alice").await;
    let (_bob, mut bob_events) = server.connect("bob").await;
    let mut bomber = RawPeer::register(server.addr, "bomber").await;
    // A well-framed message to bob whose `to` length (after version 2, id 8, kind 4, flags 2)
    // claims 2^40 bytes.
    let mut frame = bytes::BytesMut::new();
    MessageCodec::new(1024).encode(Message::send(9, "bob", ""), &mut frame).unwrap();
    frame[4 + 16..4 + 24].copy_from_slice(&(1u64 << 40).to_le_bytes());
    bomber.send_raw(&frame).await;
    assert_eq!(bomber.closing_status().await, Some(Status::Malformed));
    server.wait_until_gone("bomber").await;
    alice.send("bob", "still fine").await.unwrap();
    assert_eq!(next_message(&mut bob_events).await, ("alice".into(), "still fine".into()));
    server.stop().await;
}

#[tokio::test]
async fn a_connection_that_does_not_register_in_time_is_closed() {
    let server = TestServer::with_config(Config {
        register_timeout: Duration::from_millis(200),
        ..config()
    })
    .await;
    let mut idle = RawPeer::connect(server.addr).await;
    assert_eq!(idle.closing_status().await, Some(Status::RegistrationTimeout));
    wait_until(|| server.handle.connections() == 0).await;
    server.stop().await;
}

#[tokio::test]
async fn a_peer_that_never_answers_pings_is_dropped_and_its_name_freed() {
    let server = TestServer::with_config(Config {
        ping_interval: Duration::from_millis(100),
        idle_timeout: Duration::from_millis(300),
        ..config()
    })
    .await;
    // The library answers pings; it must outlive the silent peer.
    let (alive, mut alive_events) = server.connect("alive").await;
    let mut frozen = RawPeer::register(server.addr, "frozen").await;
    assert!(matches!(frozen.recv().await, Some(ServerEvent::Ping { .. })));
    assert_eq!(frozen.closing_status().await, Some(Status::IdleTimeout));
    server.wait_until_gone("frozen").await;

    // By now "alive" has been quiet longer than the idle timeout too, and answered its pings.
    assert!(server.handle.users().iter().any(|(n, _)| n == "alive"));
    let (other, _o) = server.connect("other").await;
    other.send("alive", "you there?").await.unwrap();
    assert_eq!(next_message(&mut alive_events).await, ("other".into(), "you there?".into()));
    drop(alive);
    server.stop().await;
}

/// A client that keeps sending but never reads what it is sent (here 64 KiB, which the
/// kernel's socket buffers take whole, so no write ever waits and the writer's timeout never
/// sees it) is found out by the ping that goes behind what it was sent, and dropped as a slow
/// consumer. Before, it was kept for as long as it sent something.
#[tokio::test]
async fn a_client_that_sends_but_never_reads_is_dropped_as_a_slow_consumer() {
    use futures_util::SinkExt;
    let server = TestServer::with_config(Config {
        ping_interval: Duration::from_millis(200),
        idle_timeout: Duration::from_millis(600),
        ..config()
    })
    .await;
    let mut mute = RawPeer::register(server.addr, "mute").await;
    let (alice, _alice_events) = server.connect("alice").await;
    for _ in 0..4 {
        alice.send("mute", vec![b'm'; 16 * 1024]).await.unwrap();
    }
    // It sends a frame every 50 ms (never idle), and reads nothing until it is dropped.
    let sending = tokio::spawn(async move {
        for id in 100.. {
            if mute.framed.send(Message::ping(id)).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
            if id > 100 + 20 * 60 {
                panic!("still connected after a minute");
            }
        }
        mute
    });
    server.wait_until_gone("mute").await;
    let mut mute = within(sending).await.unwrap();
    assert_eq!(mute.closing_status().await, Some(Status::SlowConsumer));
    // Counted once the session has ended, just after the client saw the connection close.
    wait_until(|| server.handle.stats().slow_consumers == 1).await;
    drop(alice);
    server.stop().await;
}

#[tokio::test]
async fn a_receiver_that_never_reads_costs_its_senders_nothing_but_a_typed_reply() {
    let server = TestServer::with_config(Config {
        outbox_bytes: 128 * 1024,
        // Refused after a short wait for room, well before the sink is dropped.
        send_wait: Duration::from_millis(100),
        write_timeout: Duration::from_millis(500),
        ..config()
    })
    .await;
    let sink = RawPeer::connect_small_buffer(server.addr).await.register_as("sink").await;
    let (alice, mut alice_events) = server.connect("alice").await;
    let (carol, _c) = server.connect("carol").await;
    let (_dave, mut dave_events) = server.connect("dave").await;

    // Flood the sink until the server refuses a message for it. Kernel buffers absorb a few
    // MiB first; 4,000 messages of 32 KiB (125 MiB) is far more than they hold.
    let payload = Bytes::from(vec![b'x'; 32 * 1024]);
    let mut refused = None;
    for _ in 0..4000 {
        alice.send("sink", payload.clone()).await.unwrap();
        if let Some(event) = alice_events.try_next() {
            refused = Some(event);
            break;
        }
        // Let the writer run so the socket fills; this is a yield, not a timed wait.
        tokio::task::yield_now().await;
    }
    let refused = match refused {
        Some(event) => event,
        None => next_event(&mut alice_events).await,
    };
    match refused {
        Event::Rejected { status: Status::NotDelivered, to, .. } => assert_eq!(to, "sink"),
        other => panic!("expected NotDelivered, got {other:?}"),
    }

    // Another pair is unaffected while the sink is stuck.
    carol.send("dave", "unaffected").await.unwrap();
    assert_eq!(next_message(&mut dave_events).await, ("carol".into(), "unaffected".into()));

    // The sink drains nothing, so it is disconnected as a slow consumer and its name freed,
    // and counted once as one.
    server.wait_until_gone("sink").await;
    drop(sink);
    common::wait_until(|| server.handle.stats().slow_consumers == 1).await;
    // The messages still queued for it when it was dropped are reported to their sender.
    let id = alice.send("sink", "gone").await.unwrap();
    let mut stranded = 0;
    loop {
        match next_event(&mut alice_events).await {
            Event::NotFound { id: got, .. } if got == id => break,
            Event::Rejected { status: Status::NotDelivered, detail, .. } => {
                if detail.contains("disconnected") {
                    stranded += 1;
                }
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(stranded > 0, "no sender was told about the messages stranded in the outbox");
    server.stop().await;
}

#[tokio::test]
async fn the_connection_cap_refuses_with_server_full_and_releases_slots() {
    let server = TestServer::with_config(Config { max_clients: 3, ..config() }).await;
    let (a, _ae) = server.connect("a").await;
    let (_b, _be) = server.connect("b").await;
    let (_c, _ce) = server.connect("c").await;
    match within(Client::connect(&server.url(), "d")).await {
        Err(ConnectError::Refused { status: Status::ServerFull, .. }) => {}
        other => panic!("expected ServerFull, got {other:?}"),
    }
    within(a.offline()).await.unwrap();
    wait_until(|| server.handle.connections() == 2).await;
    let (d, _de) = server.connect("d").await;
    assert_eq!(d.name(), "d");
    server.stop().await;
}

#[tokio::test]
async fn on_exit_everything_already_sent_is_delivered_before_the_shutdown_notice() {
    let server = TestServer::start().await;
    let (alice, mut alice_events) = server.connect("alice").await;
    let (_bob, mut bob_events) = server.connect("bob").await;
    for i in 0..2000u32 {
        alice.send("bob", i.to_string()).await.unwrap();
    }
    // Alice's messages are handled in order by one task, so once her note to herself comes
    // back, all 2,000 are queued for bob.
    alice.send("alice", "sync").await.unwrap();
    assert_eq!(next_message(&mut alice_events).await, ("alice".into(), "sync".into()));

    server.shutdown.cancel();
    for i in 0..2000u32 {
        assert_eq!(next_message(&mut bob_events).await, ("alice".into(), i.to_string()));
    }
    assert!(matches!(next_event(&mut bob_events).await, Event::ServerShutdown { .. }));
    within(server.task).await.unwrap();
}

#[tokio::test]
async fn a_client_that_stopped_reading_cannot_hold_up_shutdown() {
    let server = TestServer::with_config(Config {
        outbox_bytes: 128 * 1024,
        // Long enough that only the shutdown drain time can end the stuck connection.
        write_timeout: Duration::from_secs(600),
        shutdown_timeout: Duration::from_millis(300),
        ..config()
    })
    .await;
    let _sink = RawPeer::connect_small_buffer(server.addr).await.register_as("sink").await;
    let (alice, mut alice_events) = server.connect("alice").await;
    let payload = Bytes::from(vec![b'x'; 32 * 1024]);
    for _ in 0..4000 {
        alice.send("sink", payload.clone()).await.unwrap();
        if alice_events.try_next().is_some() {
            break;
        }
        tokio::task::yield_now().await;
    }
    let started = tokio::time::Instant::now();
    server.shutdown.cancel();
    within(server.task).await.unwrap();
    // Bounded by the drain time, not the (10-minute) write timeout.
    assert!(started.elapsed() < Duration::from_secs(60), "took {:?}", started.elapsed());
}

#[tokio::test]
async fn a_message_that_outgrows_the_frame_once_stamped_is_refused_not_dropped() {
    let server = TestServer::with_config(Config { max_frame_len: 1024, ..config() }).await;
    let mut peer = RawPeer::register(server.addr, "a_rather_long_sender_name").await;
    let (_bob, _be) = server.connect("bob").await;
    let empty = relay_proto::encoded_len(&Message::send(2, "bob", ""));
    // Exactly at the limit as sent; over it once the sender's name is added.
    peer.send(Message::send(2, "bob", vec![0u8; 1024 - empty])).await;
    assert!(matches!(
        peer.recv().await,
        Some(ServerEvent::Reply { id: 2, status: Status::FrameTooLarge, closing: false, .. })
    ));
    server.stop().await;
}

#[tokio::test]
async fn clients_may_ping_the_server() {
    let server = TestServer::start().await;
    let mut peer = RawPeer::register(server.addr, "pinger").await;
    peer.send(Message::ping(42)).await;
    assert_eq!(peer.recv().await, Some(ServerEvent::Pong { id: 42 }));
    server.stop().await;
}

/// Registers `name`, then sends a frame header claiming `claimed` bytes and trickles that
/// frame's bytes one every 50 ms (for at most 10 s, stopping when the server closes). Returns
/// the status of the server's closing reply and whether the trickle was still going then.
async fn trickle(server: &TestServer, name: &str, claimed: u32) -> (Option<Status>, bool) {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_util::codec::Decoder;

    let peer = RawPeer::register(server.addr, name).await;
    let (mut read, mut write) = peer.framed.into_inner().into_split();
    let trickling = Arc::new(AtomicBool::new(true));
    let flag = trickling.clone();
    tokio::spawn(async move {
        let _ = write.write_all(&claimed.to_be_bytes()).await;
        for _ in 0..200 {
            if write.write_all(b"x").await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        flag.store(false, Ordering::SeqCst);
        // Keep the socket open: the server must act, not see an end of stream.
        std::future::pending::<()>().await;
    });
    let mut bytes = Vec::new();
    within(read.read_to_end(&mut bytes)).await.unwrap();
    let still_trickling = trickling.load(Ordering::SeqCst);
    let mut codec = MessageCodec::new(relay_proto::DEFAULT_MAX_FRAME_LEN);
    let mut buf = bytes::BytesMut::from(&bytes[..]);
    let mut status = None;
    while let Ok(Some(msg)) = codec.decode(&mut buf) {
        if let Ok(ServerEvent::Reply { status: s, closing: true, .. }) = ServerEvent::parse(msg) {
            status = Some(s);
        }
    }
    (status, still_trickling)
}

#[tokio::test]
async fn a_frame_trickled_too_slowly_is_cut_off() {
    let server =
        TestServer::with_config(Config { frame_timeout: Duration::from_millis(300), ..config() })
            .await;
    let (status, still_trickling) = trickle(&server, "trickler", 1000).await;
    assert_eq!(status, Some(Status::FrameTimeout));
    assert!(still_trickling, "closed only after the trickle stopped");
    server.stop().await;
}

#[tokio::test]
async fn trickled_bytes_are_no_sign_of_life() {
    let server = TestServer::with_config(Config {
        ping_interval: Duration::from_millis(100),
        idle_timeout: Duration::from_millis(400),
        ..config()
    })
    .await;
    let (status, still_trickling) = trickle(&server, "zombie", 1000).await;
    assert_eq!(status, Some(Status::IdleTimeout));
    assert!(still_trickling, "kept alive by bytes that never made a frame");
    server.stop().await;
}

/// A listing gives at most a page of users; the client follows `next` for the rest, in name
/// order, each user once.
#[tokio::test]
async fn long_listings_are_paged() {
    let server =
        TestServer::with_config(Config { list_page: 10, list_burst: 100, ..config() }).await;
    let mut clients = Vec::new();
    for i in 0..25 {
        clients.push(server.connect(&format!("user{i:02}")).await);
    }
    let (lister, mut events) = server.connect("zz-lister").await;
    let mut seen = Vec::new();
    let mut pages = 0;
    let mut next: Option<String> = None;
    loop {
        let id = match &next {
            None => lister.list_users().await.unwrap(),
            Some(after) => lister.list_users_after(after).await.unwrap(),
        };
        match next_event(&mut events).await {
            Event::Users { id: got, users, next: more } => {
                assert_eq!(got, id);
                assert!(users.len() <= 10, "a page of {}", users.len());
                seen.extend(users.into_iter().map(|u| u.name));
                pages += 1;
                match more {
                    Some(after) => next = Some(after),
                    None => break,
                }
            }
            other => panic!("{other:?}"),
        }
    }
    let mut expected: Vec<String> = (0..25).map(|i| format!("user{i:02}")).collect();
    expected.push("zz-lister".into());
    assert_eq!((seen, pages), (expected, 3));
    server.stop().await;
}

/// User listings cost the server far more than the client: past a burst, they are refused
/// with a typed reply, the session goes on, and a token comes back after the interval.
#[tokio::test]
async fn user_listings_are_rate_limited_not_disconnected() {
    let server = TestServer::with_config(Config {
        list_burst: 3,
        list_interval: Duration::from_millis(300),
        ..config()
    })
    .await;
    let (alice, mut events) = server.connect("alice").await;
    let started = std::time::Instant::now();
    for _ in 0..20 {
        alice.list_users().await.unwrap();
    }
    let (mut listed, mut limited) = (0, 0);
    while listed + limited < 20 {
        match next_event(&mut events).await {
            Event::Users { .. } => listed += 1,
            Event::Rejected { status: Status::RateLimited, .. } => limited += 1,
            other => panic!("{other:?}"),
        }
    }
    // The burst of 3, plus one for each interval that passed meanwhile (none, unless this
    // machine is very slow).
    let earned = (started.elapsed().as_millis() / 300) as usize;
    assert!((3..=3 + earned).contains(&listed), "{listed} listed, {limited} refused");
    assert!(limited > 0);
    // Still connected, and listing again once a token has come back.
    tokio::time::sleep(Duration::from_millis(350)).await;
    alice.list_users().await.unwrap();
    assert!(matches!(next_event(&mut events).await, Event::Users { .. }));
    server.stop().await;
}

/// The reason a fresh connection is refused with, or `None` if it is admitted (it can
/// register).
async fn refusal(server: &TestServer, name: &str) -> (Option<String>, Option<RawPeer>) {
    let mut peer = RawPeer::connect(server.addr).await;
    peer.send(Message::register(1, name)).await;
    match peer.recv().await {
        Some(ServerEvent::Reply { status: Status::Registered, .. }) => (None, Some(peer)),
        Some(ServerEvent::Reply { status: Status::ServerFull, detail, closing: true, .. }) => {
            (Some(detail), None)
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn one_address_holds_at_most_its_share_of_connections() {
    let server =
        TestServer::with_config(Config { max_per_address: 3, loopback_exempt: false, ..config() })
            .await;
    let mut held = Vec::new();
    for i in 0..3 {
        let (refused, peer) = refusal(&server, &format!("p{i}")).await;
        assert_eq!(refused, None);
        held.push(peer);
    }
    let (refused, _) = refusal(&server, "p3").await;
    assert!(refused.unwrap().contains("too many connections from your address"));
    // A connection closing gives its place back.
    held.pop();
    wait_until(|| server.handle.connections() == 2).await;
    assert_eq!(refusal(&server, "p4").await.0, None);
    server.stop().await;
}

#[tokio::test]
async fn one_address_may_open_connections_only_so_fast() {
    let server =
        TestServer::with_config(Config { connects_per_sec: 5, loopback_exempt: false, ..config() })
            .await;
    let started = std::time::Instant::now();
    let mut refused = 0;
    let mut held = Vec::new();
    for i in 0..12 {
        match refusal(&server, &format!("c{i}")).await {
            (None, peer) => held.push(peer),
            (Some(detail), _) => {
                assert!(detail.contains("slow down"), "{detail}");
                refused += 1;
            }
        }
    }
    // A burst of 5, and one more for each fifth of a second that passed.
    let earned = (started.elapsed().as_millis() / 200) as usize;
    assert!(refused >= 12 - 5 - earned, "{refused} refused in {:?}", started.elapsed());
    assert!(refused > 0 || earned >= 7);
    server.stop().await;
}

#[tokio::test]
async fn loopback_is_exempt_from_the_per_address_limits_by_default() {
    let server =
        TestServer::with_config(Config { max_per_address: 1, connects_per_sec: 1, ..config() })
            .await;
    let mut held = Vec::new();
    for i in 0..5 {
        let (refused, peer) = refusal(&server, &format!("l{i}")).await;
        assert_eq!(refused, None);
        held.push(peer);
    }
    server.stop().await;
}

/// A flood of refused connections from one address costs one log line, not one each.
#[tokio::test]
async fn refusals_are_logged_once_per_address_not_per_attempt() {
    use common::process::ServerProcess;
    let mut server =
        ServerProcess::spawn(&["--limit-loopback", "--max-per-address", "1"], None).await;
    let url = server.addr.to_string();
    let (holder, _events) = within(Client::connect(&url, "holder")).await.unwrap();
    for _ in 0..30 {
        let refused = within(Client::connect(&url, "flood")).await;
        assert!(matches!(refused, Err(ConnectError::Refused { status: Status::ServerFull, .. })));
    }
    within(holder.offline()).await.unwrap();
    let lines = server.log_until("offline").await;
    let refusal_lines = lines.iter().filter(|l| l.contains("too many connections")).count();
    assert_eq!(refusal_lines, 1, "{lines:#?}");
}

/// Bytes the kernel holds in the send queue of the server's side of the connection from
/// `peer` (sent and not acknowledged, or not sent), read from /proc/net/tcp.
fn server_send_queue(server: std::net::SocketAddr, peer: std::net::SocketAddr) -> u64 {
    let hex = |a: std::net::SocketAddr| format!("0100007F:{:04X}", a.port());
    let (local, remote) = (hex(server), hex(peer));
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
    for line in table.lines().skip(1) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.get(1) == Some(&local.as_str()) && fields.get(2) == Some(&remote.as_str()) {
            let tx = fields[4].split(':').next().unwrap();
            return u64::from_str_radix(tx, 16).unwrap();
        }
    }
    panic!("no connection {local} -> {remote} in /proc/net/tcp");
}

/// What the kernel holds for a client that reads nothing, after 3 MiB were sent to it.
async fn kernel_bytes_for_a_client_that_never_reads(kernel_unsent: usize) -> u64 {
    let config = Config { kernel_unsent, send_wait: Duration::from_millis(200), ..config() };
    let server = TestServer::with_config(config).await;
    let sink = RawPeer::connect_small_buffer(server.addr).await.register_as("sink").await;
    let sink_addr = sink.framed.get_ref().local_addr().unwrap();
    let (alice, mut events) = server.connect("alice").await;
    let mut sent = Vec::new();
    for _ in 0..192 {
        sent.push(alice.send("sink", vec![b'x'; 16 * 1024]).await.unwrap());
    }
    // Every message either went out or was refused: once the last is accounted for (a
    // refusal, or the ping answered after it), what the kernel holds has settled.
    let probe = alice.send("alice", "after").await.unwrap();
    loop {
        match next_event(&mut events).await {
            Event::Message { id, .. } if id == probe => break,
            _ => {}
        }
    }
    let held = server_send_queue(server.addr, sink_addr);
    drop(sink);
    server.stop().await;
    held
}

#[tokio::test]
async fn the_kernel_holds_a_bounded_backlog_for_a_client_that_never_reads() {
    let bounded = kernel_bytes_for_a_client_that_never_reads(128 * 1024).await;
    // The bound, plus what one write may take past it.
    assert!(
        bounded <= 384 * 1024,
        "the kernel holds {bounded} bytes for a client that reads nothing"
    );
    // Without the bound (the kernel's own sizing), the same client costs the server far more
    // kernel memory, none of it counted against the outbox.
    let unbounded = kernel_bytes_for_a_client_that_never_reads(0).await;
    assert!(unbounded > 2 * bounded, "unbounded {unbounded} vs bounded {bounded}");
    // The default: a bound of the outbox's size.
    let default = Config::default().kernel_unsent;
    assert_eq!(default, 1 << 20);
    let mib = kernel_bytes_for_a_client_that_never_reads(default).await;
    assert!(mib <= (1 << 20) + 256 * 1024, "{mib} bytes with the default 1 MiB bound");
    println!(
        "kernel send queue for a client that reads nothing: {unbounded} bytes unbounded, \
         {mib} with the default 1 MiB bound, {bounded} with 128 KiB"
    );
}
