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

use common::{RawPeer, TestServer, next_message, wait_until, within};
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

/// A sender whose message waits for a busy receiver is not being silent: the server was not
/// reading it meanwhile. After a wait longer than the idle timeout it is pinged, and dropped
/// only if it does not answer (before, it was dropped at once as idle, never pinged).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sender_held_by_a_busy_receiver_is_pinged_not_dropped_as_idle() {
    let idle_timeout = Duration::from_millis(2800);
    let config = Config {
        outbox_bytes: 16 * 1024 + 4,
        max_frame_len: 16 * 1024,
        send_wait: Duration::from_secs(10),
        ping_interval: Duration::from_secs(2),
        idle_timeout,
        // The kernel holds little for the receiver, so its outbox fills.
        kernel_unsent: 4096,
        ..Config::default()
    };
    let server = TestServer::with_config(config).await;

    // The receiver stops reading for 3.5 s (sending a frame every 200 ms, so it is not idle),
    // then reads everything and answers pings. (The server's ping behind what it was written
    // comes 2 s after it registered; it has until 4.8 s to answer.)
    let slow = RawPeer::connect_small_buffer(server.addr).await.register_as("slow").await;
    let registered = Instant::now();
    let (resume, resumed) = tokio::sync::oneshot::channel::<()>();
    let reading = tokio::spawn(async move {
        let mut slow = slow;
        let pause = tokio::time::sleep(Duration::from_millis(3500));
        tokio::pin!(pause);
        let mut id = 100;
        loop {
            tokio::select! {
                () = &mut pause => break,
                () = tokio::time::sleep(Duration::from_millis(200)) => {
                    id += 1;
                    slow.send(relay_proto::Message::ping(id)).await;
                }
            }
        }
        let _ = resume.send(());
        loop {
            match slow.recv().await {
                Some(ServerEvent::Ping { id }) => slow.send(relay_proto::Message::pong(id)).await,
                Some(ServerEvent::Message { from, .. }) if from == "victim" => return slow,
                Some(_) => {}
                None => panic!("the receiver was disconnected"),
            }
        }
    });

    // Another sender fills its outbox (and what the kernel takes).
    let (filler, _filler_events) = server.connect("filler").await;
    for _ in 0..40 {
        filler.send("slow", vec![b'f'; 1000]).await.unwrap();
    }
    wait_until(|| server.handle.who("slow").is_some_and(|w| w.queued_bytes > 12 * 1024)).await;

    // The victim's message waits for room until the receiver reads again: about 3 s, longer
    // than the idle timeout. Then it answers whatever the server sends it.
    let mut victim = RawPeer::register(server.addr, "victim").await;
    let start = Instant::now();
    victim.send(relay_proto::Message::send(1, "slow", vec![b'v'; 1000])).await;
    victim.send(relay_proto::Message::send(2, "nobody", "still there?")).await;
    let mut pings = 0;
    within(async {
        loop {
            match victim.recv().await {
                Some(ServerEvent::Ping { id }) => {
                    pings += 1;
                    victim.send(relay_proto::Message::pong(id)).await;
                }
                Some(ServerEvent::Reply { status, closing: true, detail, .. }) => {
                    panic!(
                        "the victim was dropped after {:?}: {status:?} {detail}",
                        start.elapsed()
                    )
                }
                Some(ServerEvent::Reply { id: 2, status: Status::NotFound, .. }) => break,
                Some(other) => panic!("unexpected {other:?}"),
                None => panic!("the victim's connection ended"),
            }
        }
    })
    .await;
    let held = start.elapsed();
    within(resumed).await.unwrap();
    let slow = within(reading).await.unwrap();
    println!(
        "the victim was held {held:?} (idle timeout {idle_timeout:?}), answered {pings} pings; \
         the receiver paused {:?} after registering",
        Duration::from_millis(3500)
    );
    assert!(held > idle_timeout, "held only {held:?}: the test did not hold the victim");
    assert!(registered.elapsed() > Duration::from_millis(3500));
    drop((filler, slow, victim));
    server.stop().await;
}
