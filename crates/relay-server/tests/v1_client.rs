//! A protocol version 1 client, written from the version 1 byte layout alone (no
//! `relay-proto`), keeps working unchanged against a version 2 server under the default
//! `--auth optional`: it registers as a guest with no greeting, and every frame it receives
//! is in the version 1 layout, in the order the version 1 spec gives.

// Helpers here fail the test by panicking, like the tests themselves.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::{TestServer, next_message, within};
use relay_client::{Client, Event, Identity};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const CHAT: u32 = 0;
const LIST_USERS: u32 = 1;
const USERS: u32 = 2;
const REPLY: u32 = 5;
const REGISTERED: u32 = 0;
const NOT_FOUND: u32 = 1;
const NAME_OWNED: u32 = 14;

/// One frame in the version 1 layout: a 4-byte big-endian length, then version 1 (u16),
/// id (u64), kind (u32), register and exit (a byte each), then to, from and content, each a
/// u64 length and its bytes; all integers little-endian.
fn frame(
    id: u64,
    kind: u32,
    register: bool,
    exit: bool,
    to: &str,
    from: &str,
    content: &[u8],
) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&1u16.to_le_bytes());
    body.extend_from_slice(&id.to_le_bytes());
    body.extend_from_slice(&kind.to_le_bytes());
    body.push(u8::from(register));
    body.push(u8::from(exit));
    for field in [to.as_bytes(), from.as_bytes(), content] {
        body.extend_from_slice(&(field.len() as u64).to_le_bytes());
        body.extend_from_slice(field);
    }
    let mut out = (body.len() as u32).to_be_bytes().to_vec();
    out.extend_from_slice(&body);
    out
}

/// A received frame, read by the version 1 layout.
#[derive(Debug)]
struct Frame {
    id: u64,
    kind: u32,
    status: Option<u32>,
    exit: bool,
    to: String,
    from: String,
    content: Vec<u8>,
}

async fn read_frame(stream: &mut TcpStream) -> Option<Frame> {
    let mut len = [0; 4];
    within(stream.read_exact(&mut len)).await.ok()?;
    let mut body = vec![0; u32::from_be_bytes(len) as usize];
    within(stream.read_exact(&mut body)).await.unwrap();
    let mut at = 0;
    let mut take = |n: usize| {
        let part = body[at..at + n].to_vec();
        at += n;
        part
    };
    let version = u16::from_le_bytes(take(2).try_into().unwrap());
    assert_eq!(version, 1, "a version 1 client must get version 1 frames");
    let id = u64::from_le_bytes(take(8).try_into().unwrap());
    let kind = u32::from_le_bytes(take(4).try_into().unwrap());
    let status = (kind == REPLY).then(|| u32::from_le_bytes(take(4).try_into().unwrap()));
    let flags = take(2);
    let mut text = || {
        let n = u64::from_le_bytes(take(8).try_into().unwrap()) as usize;
        take(n)
    };
    let to = String::from_utf8(text()).unwrap();
    let from = String::from_utf8(text()).unwrap();
    let content = text();
    assert_eq!(at, body.len(), "the frame has bytes the version 1 layout does not");
    Some(Frame { id, kind, status, exit: flags[1] == 1, to, from, content })
}

#[tokio::test]
async fn a_version_1_client_registers_chats_lists_and_leaves_as_before() {
    let server = TestServer::start().await;
    let mut old = TcpStream::connect(server.addr).await.unwrap();
    old.write_all(&frame(0, CHAT, true, false, "", "old", b"")).await.unwrap();
    // The first frame it gets is the registration reply: no greeting.
    let reply = read_frame(&mut old).await.unwrap();
    assert_eq!((reply.id, reply.kind, reply.status), (0, REPLY, Some(REGISTERED)), "{reply:?}");
    assert_eq!(reply.to, "old");

    // A version 2 client (with a key) and the version 1 guest talk both ways.
    let (new, mut new_events) = within(
        Client::builder(server.url(), "new").identity(Identity::from_seed(&[1; 32])).connect(),
    )
    .await
    .unwrap();
    new.send("old", "hello old").await.unwrap();
    let got = read_frame(&mut old).await.unwrap();
    assert_eq!(
        (got.kind, &*got.from, &*got.to, &got.content[..]),
        (CHAT, "new", "old", &b"hello old"[..])
    );

    old.write_all(&frame(1, CHAT, false, false, "new", "", b"hello new")).await.unwrap();
    assert_eq!(next_message(&mut new_events).await, ("old".into(), "hello new".into()));

    old.write_all(&frame(2, CHAT, false, false, "nobody", "", b"?")).await.unwrap();
    let miss = read_frame(&mut old).await.unwrap();
    assert_eq!((miss.id, miss.status, &*miss.to), (2, Some(NOT_FOUND), "nobody"));

    old.write_all(&frame(3, LIST_USERS, false, false, "", "", b"")).await.unwrap();
    let users = read_frame(&mut old).await.unwrap();
    assert_eq!((users.id, users.kind), (3, USERS));
    let text = String::from_utf8(users.content).unwrap();
    assert!(
        text.starts_with("new 127.0.0.1:")
            && text.contains("\nold 127.0.0.1:")
            && text.ends_with("\n\n"),
        "{text:?}"
    );

    // A version 1 guest cannot take a name bound to a key.
    let mut thief = TcpStream::connect(server.addr).await.unwrap();
    thief.write_all(&frame(0, CHAT, true, false, "", "new", b"")).await.unwrap();
    let refused = read_frame(&mut thief).await.unwrap();
    assert_eq!((refused.status, refused.exit), (Some(NAME_OWNED), true));
    assert!(read_frame(&mut thief).await.is_none());

    // Going offline: the server closes the connection with no reply, as in version 1.
    old.write_all(&frame(4, CHAT, false, true, "", "", b"")).await.unwrap();
    assert!(read_frame(&mut old).await.is_none());
    server.wait_until_gone("old").await;
    let id = new.send("old", "gone?").await.unwrap();
    assert!(
        matches!(common::next_event(&mut new_events).await, Event::NotFound { id: got, .. } if got == id)
    );
    server.stop().await;
}
