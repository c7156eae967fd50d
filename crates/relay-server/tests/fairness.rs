//! One busy receiver cannot freeze a sender: a receiver that reads steadily but slowly while
//! 20 other clients flood it holds a victim sender's session at most the send wait per
//! message, however many senders compete for it (they take turns), and the victim's other
//! traffic goes on.

// Helpers here fail the test by panicking, like the tests themselves.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::{RawPeer, TestServer, next_message, within};
use relay_client::Event;
use relay_proto::{ServerEvent, Status};
use relay_server::Config;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_receiver_holds_a_sender_no_longer_than_the_send_wait() {
    let send_wait = Duration::from_millis(500);
    // An outbox that holds one message: each message the receiver takes makes room for one
    // more, which all the waiting senders compete for.
    let config = Config {
        outbox_bytes: 17 * 1024,
        max_frame_len: 16 * 1024,
        send_wait,
        ..Config::default()
    };
    let server = TestServer::with_config(config).await;

    // The slow receiver: reads one message every 40 ms, steadily, through a small socket
    // buffer, so its outbox on the server stays full while others flood it.
    let stop = Arc::new(AtomicBool::new(false));
    let mut slow = RawPeer::connect_small_buffer(server.addr).await.register_as("slow").await;
    let reading = {
        let stop = stop.clone();
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                match tokio::time::timeout(Duration::from_millis(100), slow.recv()).await {
                    Ok(Some(ServerEvent::Ping { id })) => {
                        slow.send(relay_proto::Message::pong(id)).await;
                    }
                    Ok(Some(_)) | Err(_) => {}
                    Ok(None) => break,
                }
                tokio::time::sleep(Duration::from_millis(40)).await;
            }
        })
    };

    // 20 flooders, each sending 15 KiB messages to it as fast as the server lets them.
    let mut flooders = Vec::new();
    for i in 0..20 {
        let (client, mut events) = server.connect(&format!("flood{i}")).await;
        let stop = stop.clone();
        flooders.push(tokio::spawn(async move {
            // Refusals are expected (the receiver cannot keep up); drain them.
            tokio::spawn(async move { while events.next().await.is_some() {} });
            let payload = vec![b'f'; 15 * 1024];
            while !stop.load(Ordering::Relaxed) {
                if client.send("slow", payload.clone()).await.is_err() {
                    break;
                }
            }
        }));
    }
    // Let the flood fill the receiver's outbox and line up the senders.
    tokio::time::sleep(Duration::from_millis(300)).await;

    // The victim writes to the busy receiver, then to someone else: that second message
    // waits for the first (one session, in order) but never longer than the send wait.
    let (victim, mut victim_events) = server.connect("victim").await;
    let (_fast, mut fast_events) = server.connect("fast").await;
    let mut worst = Duration::ZERO;
    for round in 0..5 {
        let start = Instant::now();
        victim.send("slow", vec![b'v'; 15 * 1024]).await.unwrap();
        victim.send("fast", format!("ping {round}")).await.unwrap();
        let (from, text) = next_message(&mut fast_events).await;
        assert_eq!((from.as_str(), text), ("victim", format!("ping {round}")));
        worst = worst.max(start.elapsed());
    }
    // The message to the busy receiver was either delivered or refused in time; refusals are
    // fine, a frozen session is not.
    while let Ok(Some(event)) =
        tokio::time::timeout(Duration::from_millis(10), victim_events.next()).await
    {
        assert!(matches!(event, Event::Rejected { .. }), "{event:?}");
    }
    stop.store(true, Ordering::Relaxed);
    for flooder in flooders {
        let _ = within(flooder).await;
    }
    let _ = within(reading).await;
    println!("the victim was held at most {worst:?} (send wait {send_wait:?})");
    // The send wait, plus generous slack for a loaded 2-core machine; before senders took
    // turns, a victim here waited 8 to 12 s.
    assert!(worst < send_wait * 4, "the victim was held {worst:?} (send wait {send_wait:?})");
    drop(victim);
    server.stop().await;
}

/// A sender whose messages wait for a busy receiver, one after another, is not being silent:
/// the server was not reading it meanwhile. It is pinged, and dropped only if it does not
/// answer, never straight after the waits (here 12 messages of one write wait about 250 ms
/// each, twice the idle timeout in all).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sender_held_by_a_busy_receiver_is_pinged_not_dropped_as_idle() {
    use bytes::BytesMut;
    use tokio_util::codec::Encoder;
    let config = Config {
        outbox_bytes: 17 * 1024,
        max_frame_len: 16 * 1024,
        send_wait: Duration::from_secs(5),
        ping_interval: Duration::from_millis(300),
        idle_timeout: Duration::from_millis(1500),
        // The kernel holds little for the receiver, so its outbox stays full.
        kernel_unsent: 4096,
        ..Config::default()
    };
    let server = TestServer::with_config(config).await;
    const MESSAGES: u64 = 12;

    // The receiver takes one message every 250 ms, and pings the server as it goes (so it is
    // never idle itself); it answers pings at once.
    let mut slow = RawPeer::connect_small_buffer(server.addr).await.register_as("slow").await;
    let receiving = tokio::spawn(async move {
        let mut got = 0;
        let mut ping = 100;
        while got < MESSAGES {
            match slow.recv().await {
                Some(ServerEvent::Message { from, .. }) if from == "victim" => got += 1,
                Some(ServerEvent::Ping { id }) => {
                    slow.send(relay_proto::Message::pong(id)).await;
                    continue;
                }
                Some(ServerEvent::Pong { .. }) => continue,
                Some(other) => panic!("unexpected {other:?}"),
                None => panic!("the receiver was disconnected"),
            }
            ping += 1;
            slow.send(relay_proto::Message::ping(ping)).await;
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        got
    });

    // The victim writes all its messages at once, then only answers the server.
    let mut victim = RawPeer::register(server.addr, "victim").await;
    let mut burst = BytesMut::new();
    let mut codec = relay_proto::MessageCodec::new(16 * 1024);
    for id in 0..MESSAGES {
        let msg = relay_proto::Message::send(10 + id, "slow", vec![b'v'; 15 * 1024]);
        codec.encode(msg, &mut burst).unwrap();
    }
    victim.send_raw(&burst).await;
    let (done, mut finished) = tokio::sync::oneshot::channel::<()>();
    let answering = tokio::spawn(async move {
        let (mut pings, mut asked) = (0, false);
        loop {
            let event = tokio::select! {
                event = victim.recv() => event,
                _ = &mut finished, if !asked => {
                    asked = true;
                    // Still connected: a message to nobody gets its answer.
                    victim.send(relay_proto::Message::send(999, "nobody", "still here?")).await;
                    continue;
                }
            };
            match event {
                Some(ServerEvent::Ping { id }) => {
                    pings += 1;
                    victim.send(relay_proto::Message::pong(id)).await;
                }
                Some(ServerEvent::Reply { status, closing: true, detail, .. }) => {
                    panic!("the victim was disconnected: {status:?} {detail}")
                }
                Some(ServerEvent::Reply { id: 999, status: Status::NotFound, .. }) => return pings,
                Some(other) => panic!("unexpected {other:?}"),
                None => panic!("the victim's connection ended"),
            }
        }
    });
    let delivered = within(receiving).await.unwrap();
    assert_eq!(delivered, MESSAGES);
    done.send(()).unwrap();
    let pings = within(answering).await.unwrap();
    println!("the victim answered {pings} pings");
    server.stop().await;
}
