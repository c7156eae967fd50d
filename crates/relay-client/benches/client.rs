//! The client library's per-message work at 64 B and 1 KiB of content: `cargo bench -p
//! relay-client`. `encode` is `Batch::add` on a connected client (the destination check, the
//! frame-limit check and the encoding into the batch's buffer), 256 at a time (each 256 then
//! sent, untimed, to a server in process on loopback, which answers that nobody is `bob`). `decode` is what the connection's reader does
//! with one socket read of 256 frames: each frame found and split off the read buffer, decoded,
//! and turned into an `Event::Message` (the events are dropped, not handed to a program).
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use relay_client::Received;
use relay_client::bench::FrameDecoder;
use relay_client::{Client, Event};
use relay_proto::{DEFAULT_MAX_FRAME_LEN, Message, MessageCodec};
use relay_server::{Config, Server};
use tokio_util::codec::Encoder;
use tokio_util::sync::CancellationToken;

/// Frames per simulated socket read in `decode`.
const FRAMES_PER_READ: usize = 256;

fn encode(c: &mut Criterion) {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let data = tempfile::tempdir().unwrap();
    let shutdown = CancellationToken::new();
    let client = runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let config = Config { data_dir: data.path().to_path_buf(), ..Config::default() };
        let server = Server::new(listener, config).unwrap();
        let addr = server.local_addr().unwrap().to_string();
        tokio::spawn(server.run(shutdown.clone()));
        let (client, _events) = Client::connect(&addr, "alice").await.unwrap();
        client
    });
    let mut group = c.benchmark_group("client");
    group.throughput(Throughput::Elements(1));
    for size in [64usize, 1024] {
        let content = vec![b'x'; size];
        group.bench_with_input(BenchmarkId::new("encode", size), &content, |b, content| {
            b.iter_custom(|iters| {
                // Timed: the adds. Not timed: handing each 256 to the writer, which keeps
                // the batch's buffer warm and its size that of a real burst.
                let mut batch = client.batch();
                let (mut left, mut timed) = (iters, Duration::ZERO);
                while left > 0 {
                    let n = left.min(FRAMES_PER_READ as u64);
                    let start = Instant::now();
                    for _ in 0..n {
                        black_box(batch.add(black_box("bob"), content).unwrap());
                    }
                    timed += start.elapsed();
                    runtime.block_on(batch.send()).unwrap();
                    left -= n;
                }
                timed
            })
        });
    }
    group.finish();
    shutdown.cancel();
    drop(client);
    runtime.shutdown_timeout(Duration::from_secs(1));
}

fn decode(c: &mut Criterion) {
    let mut group = c.benchmark_group("client");
    group.throughput(Throughput::Elements(FRAMES_PER_READ as u64));
    for size in [64usize, 1024] {
        // What a server writes to a version 2 guest: chat messages from one sender.
        let mut codec = MessageCodec::new(DEFAULT_MAX_FRAME_LEN);
        let mut read = BytesMut::new();
        for id in 0..FRAMES_PER_READ as u64 {
            let msg = Message::deliver(id, "alice", "bob", vec![b'x'; size]).with_version(2);
            codec.encode(&msg, &mut read).unwrap();
        }
        let mut decoder = FrameDecoder::new();
        group.bench_with_input(BenchmarkId::new("decode", size), &read, |b, read| {
            b.iter(|| {
                // The socket read's copy into the read buffer is part of the cost.
                let mut buf = BytesMut::from(&read[..]);
                let mut messages = 0;
                decoder.decode(&mut buf, |event| {
                    messages += usize::from(matches!(event, Event::Message { .. }));
                });
                assert_eq!(messages, FRAMES_PER_READ);
            })
        });
        // The same read, its messages handed over in place (`Events::drain`).
        let mut decoder = FrameDecoder::new();
        group.bench_with_input(BenchmarkId::new("decode_in_place", size), &read, |b, read| {
            b.iter(|| {
                let mut buf = BytesMut::from(&read[..]);
                let mut bytes = 0;
                decoder.decode_in_place(&mut buf, |received| {
                    if let Received::Message(msg) = received {
                        bytes += msg.content.len();
                    }
                });
                assert_eq!(bytes, FRAMES_PER_READ * size);
            })
        });
    }
    group.finish();
}

criterion_group!(benches, encode, decode);
criterion_main!(benches);
