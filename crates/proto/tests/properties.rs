//! Property tests: arbitrary bytes never panic the decoder or make it allocate past its
//! limit, the decoder accepts exactly what bincode's serde derive accepts, and every valid
//! message survives an encode/decode round trip.

// The counting allocator below is the only unsafe code in the workspace: a test-only
// GlobalAlloc that forwards to the system allocator.
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};

use bytes::{Bytes, BytesMut};
use proptest::prelude::*;
use relay_proto::{Kind, Message, MessageCodec, Status, decode_body};
use tokio_util::codec::{Decoder, Encoder};

/// Records the largest single allocation made while `TRACKING` is set on this thread.
struct CountingAlloc;

thread_local! {
    static TRACKING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    // Per thread, like `TRACKING`: tests run in parallel, and one test's allocations must
    // not count as another's (a shared maximum made `a_length_bomb_allocates_nothing_large`
    // fail now and then, seeing a property test's allocation on another thread).
    static LARGEST: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Notes an allocation of `size` bytes if this thread is tracking.
fn note(size: usize) {
    if TRACKING.with(|t| t.get()) {
        LARGEST.with(|l| l.set(l.get().max(size)));
    }
}

unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: CountingAlloc = CountingAlloc;

/// Runs `f` and returns the largest single allocation it made on this thread.
fn largest_allocation(f: impl FnOnce()) -> usize {
    LARGEST.with(|l| l.set(0));
    TRACKING.with(|t| t.set(true));
    f();
    TRACKING.with(|t| t.set(false));
    LARGEST.with(|l| l.get())
}

/// The most a decode of `len` bytes may allocate at once: the decode limit (the length rounded
/// up to a power of two, at least 64), or the short error description, whichever is larger.
fn allocation_bound(len: usize) -> usize {
    len.next_power_of_two().max(64).max(256)
}

fn status() -> impl Strategy<Value = Status> {
    prop_oneof![
        Just(Status::Registered),
        Just(Status::NotFound),
        Just(Status::NameTaken),
        Just(Status::InvalidName),
        Just(Status::InvalidRequest),
        Just(Status::UnsupportedVersion),
        Just(Status::ShuttingDown),
        Just(Status::NotDelivered),
        Just(Status::ServerFull),
        Just(Status::FrameTooLarge),
        Just(Status::Malformed),
        Just(Status::RegistrationTimeout),
        Just(Status::SlowConsumer),
        Just(Status::IdleTimeout),
        Just(Status::NameOwned),
        Just(Status::NameConfusable),
        Just(Status::AuthFailed),
        Just(Status::AuthRequired),
        Just(Status::Unavailable),
        Just(Status::FrameTimeout),
        Just(Status::RateLimited),
        (21u32..).prop_map(Status::Other),
    ]
}

fn kind() -> impl Strategy<Value = Kind> {
    prop_oneof![
        Just(Kind::Chat),
        Just(Kind::ListUsers),
        Just(Kind::Users),
        Just(Kind::Ping),
        Just(Kind::Pong),
        status().prop_map(Kind::Reply),
        Just(Kind::Hello),
        Just(Kind::Greeting),
    ]
}

prop_compose! {
    fn message()(
        version in prop_oneof![Just(1u16), Just(2u16), any::<u16>()],
        id in any::<u64>(),
        kind in kind(),
        register in any::<bool>(),
        exit in any::<bool>(),
        to in ".{0,40}",
        from in ".{0,40}",
        content in proptest::collection::vec(any::<u8>(), 0..2000),
        seq in any::<u64>(),
        time in any::<u64>(),
    ) -> Message {
        // Only version 2 carries `seq` and `time`; any other version reads them back as 0.
        let (seq, time) = if relay_proto::has_v2_layout(version) { (seq, time) } else { (0, 0) };
        Message {
            version, id, kind, register, exit, to, from, content: Bytes::from(content), seq, time,
        }
    }
}

/// The version 1 layout, as a serde struct: `Message`'s first eight fields.
#[derive(serde::Deserialize)]
struct V1 {
    version: u16,
    id: u64,
    kind: Kind,
    register: bool,
    exit: bool,
    to: String,
    from: String,
    content: Bytes,
}

/// What bincode's serde derive makes of `body` under the wire configuration: the reference the
/// in-place decoder must agree with.
fn serde_decode(body: &[u8]) -> Option<Message> {
    let config = bincode::config::standard()
        .with_little_endian()
        .with_fixed_int_encoding()
        .with_limit::<{ 1 << 20 }>();
    // The layout follows the version, the first field.
    let version = u16::from_le_bytes([*body.first()?, *body.get(1)?]);
    if relay_proto::has_v2_layout(version) {
        return match bincode::serde::decode_from_slice::<Message, _>(body, config) {
            Ok((msg, used)) if used == body.len() => Some(msg),
            _ => None,
        };
    }
    match bincode::serde::decode_from_slice::<V1, _>(body, config) {
        Ok((m, used)) if used == body.len() => Some(Message {
            version: m.version,
            id: m.id,
            kind: m.kind,
            register: m.register,
            exit: m.exit,
            to: m.to,
            from: m.from,
            content: m.content,
            seq: 0,
            time: 0,
        }),
        _ => None,
    }
}

/// `msg`'s encoding with the given bytes overwritten.
#[allow(clippy::unwrap_used)] // A test helper: a failure is a test failure.
fn mutate(msg: &Message, flips: Vec<(prop::sample::Index, u8)>) -> Vec<u8> {
    let mut buf = BytesMut::new();
    relay_proto::encode_body(msg, &mut buf).unwrap();
    let mut body = buf.to_vec();
    for (at, byte) in flips {
        let i = at.index(body.len());
        body[i] = byte;
    }
    body
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn the_decoder_accepts_exactly_what_the_serde_derive_does(
        msg in message(),
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..4),
    ) {
        let body = mutate(&msg, flips);
        prop_assert_eq!(decode_body(&body).ok(), serde_decode(&body));
    }

    #[test]
    fn the_decoder_agrees_with_the_serde_derive_on_arbitrary_bytes(
        body in proptest::collection::vec(any::<u8>(), 0..120),
    ) {
        prop_assert_eq!(decode_body(&body).ok(), serde_decode(&body));
    }

    /// The hand-written encoder writes exactly what serde's derive does (in version 2 the
    /// whole struct; in any other version its first eight fields).
    #[test]
    fn the_encoder_writes_what_the_serde_derive_does(msg in message()) {
        let mut buf = BytesMut::new();
        relay_proto::encode_body(&msg, &mut buf).unwrap();
        let config = bincode::config::standard().with_little_endian().with_fixed_int_encoding();
        let mut derived = bincode::serde::encode_to_vec(&msg, config).unwrap();
        if !relay_proto::has_v2_layout(msg.version) {
            derived.truncate(derived.len() - relay_proto::V2_EXTRA_LEN);
        }
        prop_assert_eq!(&buf[..], &derived[..]);
    }

    #[test]
    fn every_message_round_trips(msg in message()) {
        let mut codec = MessageCodec::new(relay_proto::DEFAULT_MAX_FRAME_LEN);
        let mut buf = BytesMut::new();
        codec.encode(&msg, &mut buf).unwrap();
        prop_assert_eq!(buf.len() - 4, relay_proto::encoded_len(&msg));
        prop_assert_eq!(codec.decode(&mut buf).unwrap(), Some(msg));
        prop_assert!(buf.is_empty());
    }

    #[test]
    fn arbitrary_bodies_never_panic_or_overallocate(body in proptest::collection::vec(any::<u8>(), 0..600)) {
        let largest = largest_allocation(|| {
            let _ = decode_body(&body);
        });
        let limit = allocation_bound(body.len());
        prop_assert!(largest <= limit, "allocated {} for a {}-byte body", largest, body.len());
    }

    #[test]
    fn mutated_valid_bodies_never_panic_or_overallocate(
        msg in message(),
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
    ) {
        let body = mutate(&msg, flips);
        let largest = largest_allocation(|| {
            let _ = decode_body(&body);
        });
        let limit = allocation_bound(body.len());
        prop_assert!(largest <= limit, "allocated {} for a {}-byte body", largest, body.len());
    }

    #[test]
    fn arbitrary_streams_never_panic_the_codec(
        chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..64), 0..16)
    ) {
        let mut codec = MessageCodec::new(1024);
        let mut buf = BytesMut::new();
        'outer: for chunk in chunks {
            buf.extend_from_slice(&chunk);
            loop {
                match codec.decode(&mut buf) {
                    Ok(Some(_)) => {}
                    Ok(None) => break,
                    Err(_) => break 'outer,
                }
            }
        }
    }
}

#[test]
fn a_length_bomb_allocates_nothing_large() {
    // A real message whose `to` length (after version 2, id 8, kind 4, flags 2) claims 2^40.
    let mut buf = BytesMut::new();
    relay_proto::encode_body(&Message::send(9, "bob", ""), &mut buf).unwrap();
    let mut body = buf.to_vec();
    body[16..24].copy_from_slice(&(1u64 << 40).to_le_bytes());
    let largest = largest_allocation(|| assert!(decode_body(&body).is_err()));
    assert!(largest <= 64, "allocated {largest} bytes");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(3000))]

    /// The canonical form is a fixed point: normalising it again changes nothing, it is itself
    /// a valid name, and it has the same canonical form as the name it came from.
    #[test]
    fn name_normalisation_is_idempotent(name in "\\PC{1,16}|[a-zA-Z0-9._-]{1,16}") {
        if let Ok(key) = relay_proto::name_key(&name) {
            let again = relay_proto::name_key(&key.canonical).unwrap();
            prop_assert_eq!(&again.canonical, &key.canonical);
            prop_assert_eq!(relay_proto::canonical_name(&key.canonical), key.canonical.as_str());
            // A name and its compatibility forms agree on the skeleton, so look-alike
            // detection cannot be dodged with fullwidth or other compatibility characters.
            let nfkc: String = unicode_normalization::UnicodeNormalization::nfkc(name.as_str()).collect();
            if let Ok(of_nfkc) = relay_proto::name_key(&nfkc) {
                prop_assert_eq!(of_nfkc.skeleton, key.skeleton);
            }
        }
    }
}
