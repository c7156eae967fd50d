//! Identities, in process: names bound to keys on first claim, proven with a signature over
//! the greeting's nonce, kept across restarts in the data directory; guests, look-alikes,
//! `release`, and every way a registration can be wrong.

// Helpers here fail the test by panicking, like the tests themselves.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::Path;

use common::{RawPeer, TestServer, next_event, next_message, wait_until, within};
use relay_client::{Client, ClientConfig, ConnectError, Event, Events, Identity};
use relay_proto::{
    AuthMode, CREDENTIALS_LEN, Message, NONCE_LEN, ServerEvent, Status, signing_input,
};
use relay_server::{Config, RedbStore};

fn key(n: u8) -> Identity {
    Identity::from_seed(&[n; 32])
}

fn on(dir: &Path) -> Config {
    Config { data_dir: dir.to_path_buf(), ..Config::default() }
}

async fn keyed(
    server: &TestServer,
    name: &str,
    id: &Identity,
) -> Result<(Client, Events), ConnectError> {
    within(Client::builder(server.url(), name).identity(id.clone()).connect()).await
}

async fn guest(server: &TestServer, name: &str) -> Result<(Client, Events), ConnectError> {
    within(Client::connect(&server.url(), name)).await
}

/// A raw version 2 peer that said hello: returns it with the greeting's nonce.
async fn hello(server: &TestServer) -> (RawPeer, [u8; NONCE_LEN]) {
    let mut peer = RawPeer::connect(server.addr).await;
    peer.send(Message::hello(0)).await;
    match peer.recv().await {
        Some(ServerEvent::Greeting { id: 0, greeting }) => {
            assert_eq!(greeting.versions, vec![1, 2]);
            assert_eq!(greeting.auth, AuthMode::Optional);
            (peer, greeting.nonce)
        }
        other => panic!("expected a greeting, got {other:?}"),
    }
}

/// What the server says to a raw registration with these credentials.
async fn register_raw(peer: &mut RawPeer, name: &str, credentials: Vec<u8>) -> Option<Status> {
    let mut msg = Message::register(1, name);
    msg.content = credentials.into();
    peer.send(msg).await;
    match peer.recv().await {
        Some(ServerEvent::Reply { status, .. }) => Some(status),
        other => panic!("expected a reply, got {other:?}"),
    }
}

#[tokio::test]
async fn the_first_claim_binds_and_the_key_logs_in_again_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::with_config(on(dir.path())).await;
    let (alice, _e) = keyed(&server, "alice", &key(1)).await.unwrap();
    assert_eq!(alice.name(), "alice");
    // Bound: offline, the name is still hers.
    within(alice.offline()).await.unwrap();
    assert!(matches!(keyed(&server, "alice", &key(2)).await, Err(ConnectError::NameOwned { .. })));
    assert!(matches!(guest(&server, "alice").await, Err(ConnectError::NameOwned { .. })));
    server.stop().await;

    // A new server on the same data: the same key logs in, any other is refused.
    let server = TestServer::with_config(on(dir.path())).await;
    let (again, _e) = keyed(&server, "alice", &key(1)).await.unwrap();
    assert_eq!(again.name(), "alice");
    let err = keyed(&server, "alice", &key(2)).await.unwrap_err();
    assert!(matches!(err, ConnectError::NameOwned { .. }), "{err}");
    assert!(err.to_string().contains("belongs to"), "{err}");
    server.stop().await;
}

#[tokio::test]
async fn guests_may_use_free_names_and_never_shadow_bound_ones() {
    let server = TestServer::start().await;
    let (carol, mut carol_events) = guest(&server, "carol").await.unwrap();
    let (bob, _b) = keyed(&server, "bob", &key(2)).await.unwrap();
    bob.send("carol", "hi guest").await.unwrap();
    assert_eq!(next_message(&mut carol_events).await, ("bob".into(), "hi guest".into()));
    // A guest name is not stored: once carol leaves, a key may bind it.
    within(carol.offline()).await.unwrap();
    let (_c, _e) = keyed(&server, "carol", &key(3)).await.unwrap();
    server.stop().await;
}

#[tokio::test]
async fn a_key_holder_displaces_a_guest_holding_the_name() {
    let server = TestServer::start().await;
    let (_guest, mut guest_events) = guest(&server, "dave").await.unwrap();
    let (_dave, _e) = keyed(&server, "Dave", &key(4)).await.unwrap();
    match next_event(&mut guest_events).await {
        Event::Closed { status: Status::NameOwned, .. } => {}
        other => panic!("{other:?}"),
    }
    assert_eq!(server.handle.users().len(), 1);
    assert_eq!(server.handle.users()[0].0, "Dave");
    server.stop().await;
}

#[tokio::test]
async fn look_alikes_of_a_bound_name_are_refused() {
    let server = TestServer::start().await;
    let (_alice, _e) = keyed(&server, "alice", &key(1)).await.unwrap();
    // The same name in other case or width: it belongs to alice's key.
    for same in ["Alice", "ALICE", "ａｌｉｃｅ"] {
        let err = keyed(&server, same, &key(9)).await.unwrap_err();
        assert!(matches!(err, ConnectError::NameOwned { .. }), "{same}: {err}");
    }
    // Look-alikes: Cyrillic а, capital I for l, Ukrainian і.
    for look_alike in ["аlice", "aIice", "alіce"] {
        let err = keyed(&server, look_alike, &key(9)).await.unwrap_err();
        assert!(matches!(err, ConnectError::LooksLike { .. }), "{look_alike}: {err}");
        assert!(err.to_string().contains("looks like alice"), "{err}");
        let err = guest(&server, look_alike).await.unwrap_err();
        assert!(matches!(err, ConnectError::LooksLike { .. }), "{look_alike}: {err}");
    }
    // Invisible and direction characters are never part of a name (checked by the server
    // too, not only by this client library).
    for invisible in ["alice\u{200b}", "\u{202e}ecila", "al\u{200d}ice"] {
        let mut peer = RawPeer::connect(server.addr).await;
        peer.send(Message::register(1, invisible)).await;
        assert_eq!(peer.closing_status().await, Some(Status::InvalidName), "{invisible:?}");
    }
    // A name with a colon is refused: names never look like addresses.
    let mut peer = RawPeer::connect(server.addr).await;
    peer.send(Message::register(1, "host:80")).await;
    assert_eq!(peer.closing_status().await, Some(Status::InvalidName));
    // The key holder's name is shown as bound, whatever case it logs in with.
    assert_eq!(server.handle.users()[0].0, "alice");
    server.stop().await;
}

#[tokio::test]
async fn look_alikes_of_an_online_guest_are_refused_too() {
    let server =
        TestServer::with_config(Config { auth: AuthMode::None, ..Config::default() }).await;
    let (_g, _e) = guest(&server, "paypal").await.unwrap();
    assert!(matches!(guest(&server, "PayPal").await, Err(ConnectError::NameTaken { .. })));
    assert!(matches!(guest(&server, "pаypal").await, Err(ConnectError::LooksLike { .. })));
    server.stop().await;
}

#[tokio::test]
async fn bad_credentials_are_refused_and_the_name_stays_free() {
    let server = TestServer::start().await;
    let id = key(5);

    // A good signature works (the raw path the client library takes).
    let (mut peer, nonce) = hello(&server).await;
    let good = id.credentials(&nonce, "erin").to_vec();
    assert_eq!(register_raw(&mut peer, "erin", good.clone()).await, Some(Status::Registered));
    drop(peer);
    server.wait_until_gone("erin").await;

    // Replay: the same credentials on another connection (another nonce).
    let (mut peer, _) = hello(&server).await;
    assert_eq!(register_raw(&mut peer, "erin", good).await, Some(Status::AuthFailed));
    // A signature for another name.
    let (mut peer, nonce) = hello(&server).await;
    let other_name = id.credentials(&nonce, "frank").to_vec();
    assert_eq!(register_raw(&mut peer, "erin", other_name).await, Some(Status::AuthFailed));
    // A flipped signature bit.
    let (mut peer, nonce) = hello(&server).await;
    let mut flipped = id.credentials(&nonce, "erin").to_vec();
    flipped[CREDENTIALS_LEN - 1] ^= 0x40;
    assert_eq!(register_raw(&mut peer, "erin", flipped).await, Some(Status::AuthFailed));
    // A valid signature by a key that is not the 32 bytes sent.
    let (mut peer, nonce) = hello(&server).await;
    let mut swapped = id.credentials(&nonce, "erin").to_vec();
    swapped[..32].copy_from_slice(&key(6).public_key().0);
    assert_eq!(register_raw(&mut peer, "erin", swapped).await, Some(Status::AuthFailed));
    // A key of the wrong length.
    let (mut peer, nonce) = hello(&server).await;
    let short = id.credentials(&nonce, "erin")[1..].to_vec();
    assert_eq!(register_raw(&mut peer, "erin", short).await, Some(Status::InvalidRequest));
    // Credentials without a hello: nothing was signed for this connection.
    let mut peer = RawPeer::connect(server.addr).await;
    let creds = id.credentials(&[0; 32], "erin").to_vec();
    assert_eq!(register_raw(&mut peer, "erin", creds).await, Some(Status::AuthFailed));
    // The signed bytes are what the spec says: a hand-made signature input verifies.
    let (mut peer, nonce) = hello(&server).await;
    let input = signing_input(&nonce, "erin", &id.public_key().0);
    assert_eq!(&input[..20], b"relay-register-v2\0\0\0");
    let creds = id.credentials(&nonce, "erin").to_vec();
    assert_eq!(register_raw(&mut peer, "erin", creds).await, Some(Status::Registered));
    server.stop().await;
}

#[tokio::test]
async fn a_greeting_never_answered_times_out_like_any_registration() {
    let config =
        Config { register_timeout: std::time::Duration::from_millis(300), ..Config::default() };
    let server = TestServer::with_config(config).await;
    let (mut peer, _) = hello(&server).await;
    assert_eq!(peer.closing_status().await, Some(Status::RegistrationTimeout));
    server.stop().await;
}

#[tokio::test]
async fn of_50_racing_first_claims_by_different_keys_exactly_one_wins_and_stays() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::with_config(on(dir.path())).await;
    let url = server.url();
    let attempts: Vec<_> = (0..50u8)
        .map(|n| {
            let url = url.clone();
            tokio::spawn(async move {
                let result = Client::builder(url, "prize").identity(key(100 + n)).connect().await;
                (n, result)
            })
        })
        .collect();
    let mut winners = Vec::new();
    for attempt in attempts {
        match within(attempt).await.unwrap() {
            (n, Ok(client)) => winners.push((n, client)),
            (_, Err(ConnectError::NameOwned { .. } | ConnectError::NameTaken { .. })) => {}
            (_, Err(e)) => panic!("unexpected error: {e}"),
        }
    }
    assert_eq!(winners.len(), 1);
    let winner = winners[0].0;
    drop(winners);
    server.stop().await;

    // The store agrees after a restart: only the winner's key gets in.
    let server = TestServer::with_config(on(dir.path())).await;
    for n in 0..50u8 {
        let result = keyed(&server, "prize", &key(100 + n)).await;
        if n == winner {
            within(result.unwrap().0.offline()).await.unwrap();
        } else {
            assert!(matches!(result, Err(ConnectError::NameOwned { .. })), "key {n}");
        }
    }
    server.stop().await;
}

#[tokio::test]
async fn release_unbinds_a_name_and_disconnects_its_holder() {
    let server = TestServer::start().await;
    let (_gina, mut gina_events) = keyed(&server, "gina", &key(7)).await.unwrap();
    let (input, mut feed) = tokio::io::duplex(1024);
    let (out_read, output) = tokio::io::duplex(4096);
    let console = tokio::spawn(relay_server::run_console(
        tokio::io::BufReader::new(input),
        output,
        server.handle.clone(),
        server.shutdown.clone(),
    ));
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    let mut lines = tokio::io::BufReader::new(out_read).lines();
    feed.write_all(b"release Gina\nrelease nobody\n").await.unwrap();
    let line = within(lines.next_line()).await.unwrap().unwrap();
    assert!(line.starts_with("released gina (was bound to ed25519:"), "{line}");
    let line = within(lines.next_line()).await.unwrap().unwrap();
    assert_eq!(line, "nobody is not bound to a key");
    match next_event(&mut gina_events).await {
        Event::Closed { status: Status::NameOwned, .. } => {}
        other => panic!("{other:?}"),
    }
    // Free for anyone now, including another key.
    let (_new, _e) = keyed(&server, "gina", &key(8)).await.unwrap();
    drop(feed);
    within(console).await.unwrap().unwrap();
    server.stop().await;
}

#[tokio::test]
async fn auth_required_refuses_guests_and_auth_none_stores_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let required = Config { auth: AuthMode::Required, ..on(dir.path()) };
    let server = TestServer::with_config(required).await;
    assert!(matches!(guest(&server, "henry").await, Err(ConnectError::AuthRequired)));
    let (_h, _e) = keyed(&server, "henry", &key(9)).await.unwrap();
    server.stop().await;

    // --auth none: no data directory is even created; keys are ignored, names are first come.
    let unused = dir.path().join("never");
    let none = Config { auth: AuthMode::None, data_dir: unused.clone(), ..Config::default() };
    let server = TestServer::with_config(none).await;
    let (_h, _e) = keyed(&server, "henry", &key(10)).await.unwrap();
    assert!(matches!(keyed(&server, "henry", &key(9)).await, Err(ConnectError::NameTaken { .. })));
    assert!(!unused.exists());
    server.stop().await;
}

#[tokio::test]
async fn sequence_numbers_only_grow_across_reconnects_and_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let mut last = 0;
    for _restart in 0..2 {
        let server = TestServer::with_config(on(dir.path())).await;
        let (sender, _s) = guest(&server, "sender").await.unwrap();
        for _reconnect in 0..2 {
            let (ivy, mut events) = keyed(&server, "ivy", &key(11)).await.unwrap();
            for i in 0..3 {
                sender.send("ivy", format!("{i}")).await.unwrap();
                match next_event(&mut events).await {
                    Event::Message { seq, time, .. } => {
                        assert!(seq > last, "{seq} after {last}");
                        assert!(time > 1_700_000_000_000, "time {time}");
                        last = seq;
                    }
                    other => panic!("{other:?}"),
                }
            }
            within(ivy.offline()).await.unwrap();
        }
        server.stop().await;
    }
}

#[tokio::test]
async fn a_locked_or_damaged_data_dir_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let _held = RedbStore::open(dir.path()).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let err = relay_server::Server::new(listener, on(dir.path())).unwrap_err();
    assert!(err.to_string().contains("in use by another relay-server"), "{err}");

    let damaged = tempfile::tempdir().unwrap();
    std::fs::write(damaged.path().join(relay_server::DB_FILE), b"not a database at all").unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let err = relay_server::Server::new(listener, on(damaged.path())).unwrap_err();
    assert!(err.to_string().contains("damaged"), "{err}");
}

#[tokio::test]
async fn the_client_library_waits_for_the_registration_and_reports_its_name() {
    // Registering with `ClientConfig::identity` is the same as the builder.
    let server = TestServer::start().await;
    let config = ClientConfig { identity: Some(key(12)), ..ClientConfig::default() };
    let (jo, _e) = within(Client::connect_with(&server.url(), "Jo", config)).await.unwrap();
    assert_eq!(jo.name(), "Jo");
    wait_until(|| server.handle.online() == 1).await;
    server.stop().await;
}
