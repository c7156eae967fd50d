//! Encode and decode one frame at 64 B and 1 KiB of content: `cargo bench -p relay-proto`.
//! `decode` builds an owned message from a frame; `decode_ref` reads one in place.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;

use bytes::BytesMut;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use relay_proto::{
    DEFAULT_MAX_FRAME_LEN, FRAME_HEADER_LEN, Message, MessageCodec, MessageRef, decode_ref,
};
use tokio_util::codec::{Decoder, Encoder};

fn codec(c: &mut Criterion) {
    let mut group = c.benchmark_group("codec");
    for size in [64usize, 1024] {
        let content = vec![b'x'; size];
        let msg = Message::deliver(42, "alice", "bob", content.clone());
        let mut codec = MessageCodec::new(DEFAULT_MAX_FRAME_LEN);
        let mut frame = BytesMut::new();
        codec.encode(&msg, &mut frame).unwrap();
        group.throughput(Throughput::Elements(1));

        let mut buf = BytesMut::with_capacity(64 * 1024);
        group.bench_with_input(BenchmarkId::new("encode", size), &msg, |b, msg| {
            b.iter(|| {
                buf.clear();
                codec.encode(black_box(msg), &mut buf).unwrap();
            })
        });
        let borrowed = MessageRef::send(42, "bob", &content);
        group.bench_with_input(BenchmarkId::new("encode_ref", size), &borrowed, |b, msg| {
            b.iter(|| {
                buf.clear();
                codec.encode_ref(black_box(msg), &mut buf).unwrap();
            })
        });
        group.bench_with_input(BenchmarkId::new("decode", size), &frame, |b, frame| {
            b.iter(|| {
                let mut src = frame.clone();
                black_box(codec.decode(&mut src).unwrap().unwrap())
            })
        });
        // What the server does per message: decode in place, no copy.
        let body = &frame[FRAME_HEADER_LEN..];
        group.bench_with_input(BenchmarkId::new("decode_ref", size), body, |b, body| {
            b.iter(|| black_box(decode_ref(black_box(body)).unwrap()))
        });
    }
    group.finish();
}

criterion_group!(benches, codec);
criterion_main!(benches);
