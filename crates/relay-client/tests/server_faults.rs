//! A client facing a faulty or hostile server: it notices a server that stops answering (and
//! stays connected to one that answers), and bounds what a server can make it hold or print.

// The fake server fails the test by panicking, like the tests themselves.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use relay_client::{Client, ClientConfig, Event};
use relay_proto::{Kind, Message, MessageCodec, Status};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::codec::Framed;

const WAIT: Duration = Duration::from_secs(20);

fn quick() -> ClientConfig {
    ClientConfig {
        ping_interval: Duration::from_millis(100),
        idle_timeout: Duration::from_millis(300),
        ..ClientConfig::default()
    }
}

/// How the fake server behaves once the client is registered.
#[derive(Clone, PartialEq)]
enum Mode {
    /// Reads everything, answers nothing.
    Silent,
    /// Answers pings.
    Answers,
    /// Stops reading altogether, like a frozen process: the client's writes back up.
    Deaf,
    /// Sends these messages, then reads everything and answers nothing.
    Sends(Vec<Message>),
    /// Sends these messages, then these bytes as they are, then reads everything.
    SendsRaw(Vec<Message>, Vec<u8>),
    /// Sends this many pings, then never reads again.
    PingFlood(u64),
}

/// A fake server: accepts one client, registers it, then reports every ping it receives and
/// behaves as `mode` says. It never closes the connection by itself.
async fn fake_server(mode: Mode) -> (String, mpsc::UnboundedReceiver<u64>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let (pings, pings_rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        let mut framed = Framed::new(stream, MessageCodec::new(relay_proto::DEFAULT_MAX_FRAME_LEN));
        // Version 2: the hello gets a greeting, then the registration is accepted.
        let hello = framed.next().await.unwrap().unwrap();
        assert_eq!(hello.kind, Kind::Hello);
        let greeting = relay_proto::Greeting::new(
            relay_proto::AuthMode::Optional,
            [7; 32],
            relay_proto::DEFAULT_MAX_FRAME_LEN,
            1024,
            Duration::from_secs(5),
            Duration::from_secs(30),
            Duration::from_secs(60),
        );
        framed.send(Message::greeting(hello.id, &greeting)).await.unwrap();
        let register = framed.next().await.unwrap().unwrap();
        framed
            .send(Message::reply(register.id, Status::Registered, register.from, "welcome"))
            .await
            .unwrap();
        if let Mode::Sends(script) | Mode::SendsRaw(script, _) = &mode {
            for msg in script {
                framed.send(msg.clone()).await.unwrap();
            }
        }
        if let Mode::SendsRaw(_, bytes) = &mode {
            use tokio::io::AsyncWriteExt;
            framed.get_mut().write_all(bytes).await.unwrap();
        }
        if let Mode::PingFlood(count) = mode {
            for id in 1..=count {
                if framed.feed(Message::ping(id)).await.is_err() {
                    return;
                }
            }
            let _ = SinkExt::<Message>::flush(&mut framed).await;
        }
        if matches!(mode, Mode::Deaf | Mode::PingFlood(_)) {
            // Keep the socket open without ever reading it again.
            std::future::pending::<()>().await;
        }
        while let Some(Ok(msg)) = framed.next().await {
            if msg.kind == Kind::Ping {
                let _ = pings.send(msg.id);
                if mode == Mode::Answers {
                    framed.send(Message::pong(msg.id)).await.unwrap();
                }
            }
        }
    });
    (addr, pings_rx)
}

#[tokio::test]
async fn a_server_that_stops_answering_is_given_up() {
    let (addr, mut pings) = fake_server(Mode::Silent).await;
    let (client, mut events) = Client::connect_with(&addr, "alice", quick()).await.unwrap();
    let event = tokio::time::timeout(WAIT, events.next()).await.unwrap();
    match event {
        Some(Event::Disconnected { reason }) => assert!(reason.contains("stopped answering")),
        other => panic!("expected Disconnected, got {other:?}"),
    }
    assert!(pings.try_recv().is_ok(), "the client never pinged");
    assert!(client.is_closed());
    // The client also closed its end: the fake server sees the end of the stream, which ends
    // its task and with it the ping channel.
    tokio::time::timeout(WAIT, async { while pings.recv().await.is_some() {} }).await.unwrap();
}

#[tokio::test]
async fn a_server_that_answers_keeps_the_client_connected() {
    let (addr, mut pings) = fake_server(Mode::Answers).await;
    let (client, events) = Client::connect_with(&addr, "alice", quick()).await.unwrap();
    // A client pings only while it still believes in the connection, 100 ms after the last
    // pong. Six pings in a row span twice the idle timeout, so answered pings kept it alive.
    for _ in 0..6 {
        tokio::time::timeout(WAIT, pings.recv()).await.unwrap().unwrap();
    }
    drop((client, events));
}

#[tokio::test]
async fn a_server_that_stops_reading_does_not_hold_the_sender_forever() {
    let (addr, _pings) = fake_server(Mode::Deaf).await;
    let (client, mut events) = Client::connect_with(&addr, "alice", quick()).await.unwrap();
    // Far more than the socket buffers and the send queue hold: the writer blocks, then
    // `send` waits on the full queue.
    let sender = tokio::spawn(async move {
        let chunk = bytes::Bytes::from(vec![b'x'; 16 * 1024]);
        for _ in 0..100_000 {
            client.send("bob", chunk.clone()).await?;
        }
        Ok::<_, relay_client::SendError>(())
    });
    match tokio::time::timeout(WAIT, events.next()).await.unwrap() {
        Some(Event::Disconnected { reason }) => assert!(reason.contains("stopped answering")),
        other => panic!("expected Disconnected, got {other:?}"),
    }
    // Once the client gives up, the blocked writer is released and `send` fails.
    let result = tokio::time::timeout(WAIT, sender).await.unwrap().unwrap();
    assert!(matches!(result, Err(relay_client::SendError::Closed)), "{result:?}");
}

#[tokio::test]
async fn a_user_listing_that_never_ends_is_refused() {
    // 64 KiB parts of one-letter users, never marked complete: 17 parts pass 1,000,000.
    let line = "a 1.2.3.4:5\n";
    let part = Message {
        kind: Kind::Users,
        content: line.repeat(65_000 / line.len()).into(),
        ..Message::ping(1)
    };
    let parts = 1_000_000 / (65_000 / line.len()) + 2;
    let (addr, _pings) = fake_server(Mode::Sends(vec![part; parts])).await;
    let (_client, mut events) =
        Client::connect_with(&addr, "alice", ClientConfig::default()).await.unwrap();
    match tokio::time::timeout(WAIT, events.next()).await.unwrap() {
        Some(Event::Disconnected { reason }) => assert!(reason.contains("user list"), "{reason}"),
        other => panic!("expected Disconnected, got {other:?}"),
    }
}

#[tokio::test]
async fn a_listing_of_huge_names_is_bounded_by_bytes() {
    // Parts of one 60 KB "name" each, never complete: 300 of them are 18 MB, over the
    // client's 16 MiB bound although only 300 entries.
    let part = Message {
        kind: Kind::Users,
        content: format!("{} 1.2.3.4:5\n", "n".repeat(60_000)).into(),
        ..Message::ping(1)
    };
    let (addr, _pings) = fake_server(Mode::Sends(vec![part; 300])).await;
    let (_client, mut events) =
        Client::connect_with(&addr, "alice", ClientConfig::default()).await.unwrap();
    match tokio::time::timeout(WAIT, events.next()).await.unwrap() {
        Some(Event::Disconnected { reason }) => assert!(reason.contains("bytes"), "{reason}"),
        other => panic!("expected Disconnected, got {other:?}"),
    }
}

/// A server that floods pings and reads none of the pongs cannot grow the client: once the
/// kernel's buffers and twice the send queue are full of pongs, the client gives up on it.
#[tokio::test]
async fn a_server_that_floods_pings_and_reads_no_pongs_is_given_up() {
    // 300,000 pongs are 17 MB: far more than loopback socket buffers hold.
    let (addr, _pings) = fake_server(Mode::PingFlood(300_000)).await;
    let (_client, mut events) =
        Client::connect_with(&addr, "alice", ClientConfig::default()).await.unwrap();
    match tokio::time::timeout(WAIT, events.next()).await.unwrap() {
        Some(Event::Disconnected { reason }) => assert!(reason.contains("pings"), "{reason}"),
        other => panic!("expected Disconnected, got {other:?}"),
    }
}

/// A reply status this version does not know (from a newer server) refuses that message, as
/// the spec says; the session goes on.
#[tokio::test]
async fn an_unknown_reply_status_refuses_its_message_and_the_session_goes_on() {
    let script = vec![
        Message::reply(7, Status::Other(99), "bob", "a status from the future"),
        Message::deliver(8, "bob", "alice", "still here"),
    ];
    let (addr, _pings) = fake_server(Mode::Sends(script)).await;
    let (_client, mut events) =
        Client::connect_with(&addr, "alice", ClientConfig::default()).await.unwrap();
    match tokio::time::timeout(WAIT, events.next()).await.unwrap() {
        Some(Event::Rejected { id: 7, status: Status::Other(99), to, .. }) => assert_eq!(to, "bob"),
        other => panic!("expected a refusal, got {other:?}"),
    }
    match tokio::time::timeout(WAIT, events.next()).await.unwrap() {
        Some(Event::Message { id: 8, content, .. }) => assert_eq!(&content[..], b"still here"),
        other => panic!("expected the next message, got {other:?}"),
    }
}

/// A chat message whose sender's name is not UTF-8 is a protocol error, even right after
/// valid messages from a sender of the same length (names already checked are not checked
/// again, but new bytes always are).
#[tokio::test]
async fn a_sender_name_that_is_not_utf8_ends_the_session_after_the_valid_messages() {
    let script = vec![
        Message::deliver(1, "bob", "alice", "one"),
        Message::deliver(2, "bob", "alice", "two"),
    ];
    let mut frame = Vec::new();
    let bad = Message::deliver(3, "bob", "alice", "three");
    let mut encoded = bytes::BytesMut::new();
    relay_proto::encode_body(&bad, &mut encoded).unwrap();
    let mut body = encoded.to_vec();
    let at = body.windows(3).position(|w| w == b"bob").unwrap();
    body[at..at + 3].copy_from_slice(&[0xff, 0xfe, 0xfd]);
    frame.extend_from_slice(&(body.len() as u32).to_be_bytes());
    frame.extend_from_slice(&body);
    let (addr, _pings) = fake_server(Mode::SendsRaw(script, frame)).await;
    let (_client, mut events) =
        Client::connect_with(&addr, "alice", ClientConfig::default()).await.unwrap();
    for id in [1, 2] {
        match tokio::time::timeout(WAIT, events.next()).await.unwrap() {
            Some(Event::Message { id: got, from, .. }) if got == id => assert_eq!(&*from, "bob"),
            other => panic!("expected message {id}, got {other:?}"),
        }
    }
    match tokio::time::timeout(WAIT, events.next()).await.unwrap() {
        Some(Event::Disconnected { reason }) => assert!(reason.contains("UTF-8"), "{reason}"),
        other => panic!("expected a protocol error, got {other:?}"),
    }
}

/// The interactive client (the binary) shows what a hostile server sends as inert text.
#[tokio::test]
async fn the_interactive_client_escapes_what_the_server_sends() {
    let script = vec![
        Message::deliver(1, "evil\u{1b}[2J", "alice", "hi\n\u{1b}[31mred"),
        Message::reply(2, Status::NotFound, "x\ry", "gone"),
        Message::reply(0, Status::ShuttingDown, "", "bye").closing(),
    ];
    let (addr, _pings) = fake_server(Mode::Sends(script)).await;
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_relay-client"))
        .args(["--server", &addr, "--user", "alice", "--guest"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    // Input stays open: the session ends because the server shuts down.
    let _stdin = child.stdin.take();
    let out = tokio::time::timeout(WAIT, child.wait_with_output()).await.unwrap().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // stdout holds only the message; notices (the connected one, the refusal, the shutdown)
    // are on stderr. Both inert.
    let output = String::from_utf8(out.stdout).unwrap();
    assert_eq!(output.lines().collect::<Vec<_>>(), ["evil\\u{1b}[2J: hi\\n\\u{1b}[31mred"]);
    let notices = String::from_utf8(out.stderr).unwrap();
    let notices: Vec<&str> = notices.lines().skip(1).collect();
    assert_eq!(notices, ["! x\\ry: not found", "~ server is shutting down"]);
}
