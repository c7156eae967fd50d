//! The one place that knows how a [`Message`] becomes bytes: bincode 2 through serde, with
//! fixed-width integers, little-endian, and a byte limit on every decode.
//!
//! Why fixed-width integers: bincode charges its decode limit by the in-memory size of what it
//! decodes (8 for a `u64`, `n` for an `n`-byte string). With fixed-width integers that charge
//! equals the number of input bytes consumed, exactly, for our flat struct. So a frame body of
//! `n` bytes can be decoded with a limit of `n` rounded up to a power of two, and a length
//! prefix inside the body that claims more than the body holds fails the limit check *before*
//! bincode allocates for it. Without a limit bincode would allocate the claimed length up front,
//! and a 9-byte body claiming 2^40 bytes would abort the process.
//!
//! Encoding writes the bytes serde's derive would write, through bincode's writer
//! ([`WireOut`]). Decoding, which both ends do for every message, first reads the layout with
//! plain slice operations ([`read_valid`]: 15 ns for a 64-byte message, where serde's
//! field-by-field visitor took 70 and bincode's `BorrowDecode` with a hand-written impl 37,
//! most of it moving bincode's large error type around). A body that is not exactly one valid
//! message goes to bincode ([`Wire`], under the limit below), which rejects it and says why.
//! Tests check that both paths accept and reject exactly what serde's derive does.

use bincode::config::{self, Configuration, Fixint, LittleEndian, NoLimit};
use bincode::de::read::BorrowReader;
use bincode::de::{BorrowDecode, BorrowDecoder};
use bincode::error::{AllowedEnumVariants, DecodeError};
use bytes::BytesMut;

use crate::error::ProtoError;
use crate::limits::{MAX_FRAME_LEN_CEILING, V2_EXTRA_LEN};
use crate::message::{Kind, Message, MessageRef, Status};

/// The wire configuration, without its limit (added per decode).
const WIRE: Configuration<LittleEndian, Fixint, NoLimit> =
    config::standard().with_little_endian().with_fixed_int_encoding();

/// Smallest decode limit used; tiny bodies share it.
const MIN_DECODE_LIMIT: usize = 64;

/// Encodes `msg` onto the end of `dst` (no length prefix) and returns the bytes written.
///
/// # Errors
/// [`ProtoError::Encode`] if serialization fails (it does not for well-formed messages).
pub fn encode_body(msg: &Message, dst: &mut BytesMut) -> Result<usize, ProtoError> {
    encode_body_ref(&msg.as_ref(), dst)
}

/// Encodes a borrowed message onto the end of `dst` (no length prefix) and returns the bytes
/// written: the same bytes as [`encode_body`] on the equivalent owned message.
///
/// # Errors
/// [`ProtoError::Encode`] if serialization fails (it does not for well-formed messages).
pub fn encode_body_ref(msg: &MessageRef<'_>, dst: &mut BytesMut) -> Result<usize, ProtoError> {
    // The size is known exactly: reserve it once, then append field by field. (Encoding into
    // a zero-filled slice instead costs a memset of the whole content first.)
    let len = encoded_len_ref(msg);
    let start = dst.len();
    dst.reserve(len);
    match bincode::encode_into_writer(WireOut(msg), Append(dst), WIRE) {
        Ok(()) => Ok(dst.len() - start),
        Err(e) => {
            dst.truncate(start);
            Err(ProtoError::Encode(e.to_string()))
        }
    }
}

/// Whether a message of this `version` has the version 2 layout (`seq` and `time` after
/// `content`). Only version 2 does: every other version reads and writes the version 1 layout,
/// so a registration from an unknown version still decodes and gets `UnsupportedVersion`.
#[inline]
pub fn has_v2_layout(version: u16) -> bool {
    version == 2
}

/// A [`MessageRef`] written by hand in the layout serde's derive gives it under [`WIRE`]
/// (the same bytes; tests compare the two), with as few writes as the layout allows: the
/// fixed header in one, each text or byte field as its length and its bytes, and in version 2
/// `seq` and `time` in one. serde's field-by-field path took several times as long, and every
/// message is encoded once by its sender and once more by the server.
struct WireOut<'m, 'a>(&'m MessageRef<'a>);

impl bincode::Encode for WireOut<'_, '_> {
    fn encode<E: bincode::enc::Encoder>(
        &self,
        e: &mut E,
    ) -> Result<(), bincode::error::EncodeError> {
        use bincode::enc::write::Writer;
        let m = self.0;
        let mut header = [0u8; 20];
        header[..2].copy_from_slice(&m.version.to_le_bytes());
        header[2..10].copy_from_slice(&m.id.to_le_bytes());
        header[10..14].copy_from_slice(&kind_index(m.kind).to_le_bytes());
        let flags_at = match m.kind {
            Kind::Reply(status) => {
                header[14..18].copy_from_slice(&status.index().to_le_bytes());
                18
            }
            _ => 14,
        };
        header[flags_at] = u8::from(m.register);
        header[flags_at + 1] = u8::from(m.exit);
        let w = e.writer();
        // Fixed lengths, so each write is a few moves rather than a call to memmove.
        if flags_at == 18 {
            w.write(&header)?;
        } else {
            w.write(&header[..16])?;
        }
        for field in [m.to.as_bytes(), m.from.as_bytes(), m.content] {
            w.write(&(field.len() as u64).to_le_bytes())?;
            w.write(field)?;
        }
        if has_v2_layout(m.version) {
            let mut tail = [0u8; V2_EXTRA_LEN];
            tail[..8].copy_from_slice(&m.seq.to_le_bytes());
            tail[8..].copy_from_slice(&m.time.to_le_bytes());
            w.write(&tail)?;
        }
        Ok(())
    }
}

/// The variant index serde writes for a [`Kind`].
fn kind_index(kind: Kind) -> u32 {
    match kind {
        Kind::Chat => 0,
        Kind::ListUsers => 1,
        Kind::Users => 2,
        Kind::Ping => 3,
        Kind::Pong => 4,
        Kind::Reply(_) => 5,
        Kind::Hello => 6,
        Kind::Greeting => 7,
        Kind::Ack => 8,
        Kind::Delivered => 9,
    }
}

/// Appends what bincode writes to a buffer.
struct Append<'a>(&'a mut BytesMut);

impl bincode::enc::write::Writer for Append<'_> {
    #[inline]
    fn write(&mut self, bytes: &[u8]) -> Result<(), bincode::error::EncodeError> {
        self.0.extend_from_slice(bytes);
        Ok(())
    }
}

/// Sets the `seq` field of an encoded version 2 frame body in place (the server numbers a
/// stored message when it delivers it, without decoding and encoding it again).
///
/// # Errors
/// [`ProtoError::Malformed`] if `body` is not a version 2 body.
pub fn set_seq_in_body(body: &mut [u8], seq: u64) -> Result<(), ProtoError> {
    let version = body.get(..2).map(|v| u16::from_le_bytes([v[0], v[1]]));
    let at = body.len().checked_sub(V2_EXTRA_LEN);
    match (version, at) {
        (Some(version), Some(at)) if has_v2_layout(version) && at >= 2 => {
            body[at..at + 8].copy_from_slice(&seq.to_le_bytes());
            Ok(())
        }
        _ => Err(ProtoError::Malformed("not a version 2 message body".into())),
    }
}

/// Number of bytes `msg` takes on the wire, without the length prefix.
pub fn encoded_len(msg: &Message) -> usize {
    encoded_len_ref(&msg.as_ref())
}

/// Number of bytes a borrowed message takes on the wire, without the length prefix.
pub fn encoded_len_ref(msg: &MessageRef<'_>) -> usize {
    // Fixed-width layout: version 2, id 8, kind 4 (+4 for a reply's status), flags 1 + 1,
    // then each of to, from, content as an 8-byte length and its bytes.
    let kind = match msg.kind {
        Kind::Reply(_) => 8,
        _ => 4,
    };
    let extra = if has_v2_layout(msg.version) { V2_EXTRA_LEN } else { 0 };
    2 + 8 + kind + 2 + 24 + msg.to.len() + msg.from.len() + msg.content.len() + extra
}

/// Decodes one frame body into a [`Message`] (an owned copy of [`decode_ref`]'s view).
///
/// # Errors
/// [`ProtoError::Malformed`] for anything that is not exactly one valid message.
pub fn decode_body(body: &[u8]) -> Result<Message, ProtoError> {
    decode_ref(body).map(|msg| msg.to_message())
}

/// Decodes one frame body into a [`MessageRef`] that borrows its text and content from
/// `body`: nothing is allocated or copied, which is how the server routes a message.
///
/// The decode runs with a byte limit of the body's length rounded up to a power of two (at
/// least 64), so a length field inside the body can never make it read or reserve more than
/// the frame holds. Trailing bytes and invalid UTF-8 are errors.
///
/// # Errors
/// [`ProtoError::Malformed`] for anything that is not exactly one valid message.
pub fn decode_ref(body: &[u8]) -> Result<MessageRef<'_>, ProtoError> {
    if let Some(msg) = read_valid(body) {
        return Ok(msg);
    }
    // Not a valid message: bincode decodes it under its limit and says what is wrong. (It
    // accepts exactly what `read_valid` does; the tests check both ways.) bincode takes its
    // limit as a const generic, so pick the smallest power of two that holds the body from a
    // fixed ladder.
    macro_rules! ladder {
        ($($limit:literal)*) => {
            $(if body.len() <= $limit { return decode_limited::<$limit>(body); })*
        };
    }
    ladder!(64 128 256 512 1024 2048 4096 8192 16384 32768 65536 131072 262144 524288 1048576
        2097152 4194304 8388608 16777216);
    Err(ProtoError::Malformed(format!(
        "body of {} bytes is over the largest frame limit of {MAX_FRAME_LEN_CEILING} bytes",
        body.len()
    )))
}

fn decode_limited<const LIMIT: usize>(body: &[u8]) -> Result<MessageRef<'_>, ProtoError> {
    const { assert!(LIMIT >= MIN_DECODE_LIMIT && LIMIT <= MAX_FRAME_LEN_CEILING) };
    let (Wire(msg), used) = bincode::borrow_decode_from_slice(body, WIRE.with_limit::<LIMIT>())
        .map_err(|e| ProtoError::Malformed(describe(&e)))?;
    if used != body.len() {
        return Err(ProtoError::Malformed(format!(
            "{} trailing bytes after the message",
            body.len() - used
        )));
    }
    Ok(msg)
}

/// The message in `body` if it is exactly one valid message, read with plain slice
/// operations: the layout [`Wire`] reads, and the same checks (kind, flags, lengths within the
/// body, UTF-8 text, no trailing bytes), without bincode's error plumbing, which cost several
/// times the reading on every message both ends handle. It reads nothing past `body` and
/// allocates nothing, so it needs no limit of its own; `None` sends the body to bincode for
/// the error.
#[inline]
fn read_valid(body: &[u8]) -> Option<MessageRef<'_>> {
    let raw = read_raw(body)?;
    Some(MessageRef {
        version: raw.version,
        id: raw.id,
        kind: raw.kind,
        register: raw.register,
        exit: raw.exit,
        to: std::str::from_utf8(raw.to).ok()?,
        from: std::str::from_utf8(raw.from).ok()?,
        content: raw.content,
        seq: raw.seq,
        time: raw.time,
    })
}

/// A message read as [`read_valid`] reads it, but with its text fields not yet checked as
/// UTF-8.
#[derive(Clone, Copy, Debug)]
struct Raw<'a> {
    version: u16,
    id: u64,
    kind: Kind,
    register: bool,
    exit: bool,
    to: &'a [u8],
    from: &'a [u8],
    content: &'a [u8],
    seq: u64,
    time: u64,
}

#[inline]
fn read_raw(body: &[u8]) -> Option<Raw<'_>> {
    if body.len() > MAX_FRAME_LEN_CEILING {
        return None;
    }
    let (head, rest) = body.split_first_chunk::<14>()?;
    let [v0, v1, i0, i1, i2, i3, i4, i5, i6, i7, k0, k1, k2, k3] = *head;
    let version = u16::from_le_bytes([v0, v1]);
    let id = u64::from_le_bytes([i0, i1, i2, i3, i4, i5, i6, i7]);
    let (kind, rest) = match u32::from_le_bytes([k0, k1, k2, k3]) {
        5 => {
            let (status, rest) = rest.split_first_chunk::<4>()?;
            (Kind::Reply(Status::from_index(u32::from_le_bytes(*status))), rest)
        }
        index => (plain_kind(index)?, rest),
    };
    let (&[register, exit], rest) = rest.split_first_chunk::<2>()?;
    let (register, exit) = (flag(register).ok()?, flag(exit).ok()?);
    let (to, rest) = plain_field(rest)?;
    let (from, rest) = plain_field(rest)?;
    let (content, rest) = plain_field(rest)?;
    let (seq, time, rest) = if has_v2_layout(version) {
        let (seq, rest) = rest.split_first_chunk::<8>()?;
        let (time, rest) = rest.split_first_chunk::<8>()?;
        (u64::from_le_bytes(*seq), u64::from_le_bytes(*time), rest)
    } else {
        (0, 0, rest)
    };
    rest.is_empty().then_some(Raw {
        version,
        id,
        kind,
        register,
        exit,
        to,
        from,
        content,
        seq,
        time,
    })
}

/// A chat message as a client receives it, read by [`read_chat`] with its names still bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct ChatBytes<'a> {
    /// The sender's id for the message.
    pub id: u64,
    /// The destination as the sender wrote it, not yet checked as UTF-8.
    pub to: &'a [u8],
    /// The sender's name, not yet checked as UTF-8.
    pub from: &'a [u8],
    /// The content.
    pub content: &'a [u8],
    /// Version 2: the per-recipient sequence number.
    pub seq: u64,
    /// Version 2: when the server received it.
    pub time: u64,
}

/// `body` as a chat message (kind `Chat`, neither flag set) if it is one, well formed except
/// that its names are not checked as UTF-8: the caller checks them, or compares them with
/// names it checked before (a client sees the same sender and its own name over and over; the
/// checks were about a seventh of its decoding per message). `None` for anything else, valid
/// or not: decode that with [`decode_ref`].
#[inline]
pub fn read_chat(body: &[u8]) -> Option<ChatBytes<'_>> {
    let raw = read_raw(body)?;
    (raw.kind == Kind::Chat && !raw.register && !raw.exit).then_some(ChatBytes {
        id: raw.id,
        to: raw.to,
        from: raw.from,
        content: raw.content,
        seq: raw.seq,
        time: raw.time,
    })
}

/// A length-prefixed field at the start of `rest`, and what follows it, if the length fits.
#[inline]
fn plain_field(rest: &[u8]) -> Option<(&[u8], &[u8])> {
    let (len, rest) = rest.split_first_chunk::<8>()?;
    let len = usize::try_from(u64::from_le_bytes(*len)).ok()?;
    (len <= rest.len()).then(|| rest.split_at(len))
}

/// The kind at `index`, but for a reply (index 5), which carries a status after it.
#[inline]
fn plain_kind(index: u32) -> Option<Kind> {
    Some(match index {
        0 => Kind::Chat,
        1 => Kind::ListUsers,
        2 => Kind::Users,
        3 => Kind::Ping,
        4 => Kind::Pong,
        6 => Kind::Hello,
        7 => Kind::Greeting,
        8 => Kind::Ack,
        9 => Kind::Delivered,
        _ => return None,
    })
}

/// A [`MessageRef`] read by hand from the layout serde's derive gives it under [`WIRE`]
/// (little-endian, fixed-width integers): version `u16`, id `u64`, kind `u32` (and a `u32`
/// status for a reply), two flag bytes, then `to`, `from` and `content`, each a `u64` length
/// and its bytes; in version 2, then `seq` and `time`, each a `u64`. Only valid with
/// [`WIRE`], which is why it is private to this module.
struct Wire<'a>(MessageRef<'a>);

impl<'de, Context> BorrowDecode<'de, Context> for Wire<'de> {
    fn borrow_decode<D: BorrowDecoder<'de, Context = Context>>(
        d: &mut D,
    ) -> Result<Self, DecodeError> {
        // Few reads, each of several fields: every call into the decoder returns bincode's
        // large error type, and that plumbing, not the reading, is what costs.
        let [v0, v1, i0, i1, i2, i3, i4, i5, i6, i7, k0, k1, k2, k3] = fixed(d)?;
        let version = u16::from_le_bytes([v0, v1]);
        let id = u64::from_le_bytes([i0, i1, i2, i3, i4, i5, i6, i7]);
        let (kind, [register, exit]) = match u32::from_le_bytes([k0, k1, k2, k3]) {
            5 => {
                let [s0, s1, s2, s3, register, exit] = fixed(d)?;
                // An index this version does not know is a status of a newer server.
                let status = Status::from_index(u32::from_le_bytes([s0, s1, s2, s3]));
                (Kind::Reply(status), [register, exit])
            }
            index => match plain_kind(index) {
                Some(kind) => (kind, fixed(d)?),
                None => {
                    const ALL: AllowedEnumVariants = AllowedEnumVariants::Range { min: 0, max: 9 };
                    return Err(unexpected::<Kind>(index, &ALL));
                }
            },
        };
        let (register, exit) = (flag(register)?, flag(exit)?);
        let to = text(d)?;
        let from = text(d)?;
        let content = bytes(d)?;
        let (seq, time) = if has_v2_layout(version) {
            let [s0, s1, s2, s3, s4, s5, s6, s7, t0, t1, t2, t3, t4, t5, t6, t7] = fixed(d)?;
            (
                u64::from_le_bytes([s0, s1, s2, s3, s4, s5, s6, s7]),
                u64::from_le_bytes([t0, t1, t2, t3, t4, t5, t6, t7]),
            )
        } else {
            (0, 0)
        };
        Ok(Wire(MessageRef { version, id, kind, register, exit, to, from, content, seq, time }))
    }
}

fn unexpected<T>(found: u32, allowed: &'static AllowedEnumVariants) -> DecodeError {
    DecodeError::UnexpectedVariant { type_name: std::any::type_name::<T>(), allowed, found }
}

/// `N` fixed bytes. Fixed-width fields are not charged to the limit (as with serde).
#[inline]
fn fixed<'de, const N: usize, D: BorrowDecoder<'de>>(d: &mut D) -> Result<[u8; N], DecodeError> {
    let taken = d.borrow_reader().take_bytes(N)?;
    taken.try_into().map_err(|_| DecodeError::UnexpectedEnd { additional: N })
}

#[inline]
fn flag(byte: u8) -> Result<bool, DecodeError> {
    match byte {
        0 => Ok(false),
        1 => Ok(true),
        other => Err(DecodeError::InvalidBooleanValue(other)),
    }
}

/// A length-prefixed byte string, charged to the limit before it is taken (as with serde).
#[inline]
fn bytes<'de, D: BorrowDecoder<'de>>(d: &mut D) -> Result<&'de [u8], DecodeError> {
    let len = u64::from_le_bytes(fixed(d)?);
    let len = usize::try_from(len).map_err(|_| DecodeError::OutsideUsizeRange(len))?;
    d.claim_bytes_read(len)?;
    d.borrow_reader().take_bytes(len)
}

#[inline]
fn text<'de, D: BorrowDecoder<'de>>(d: &mut D) -> Result<&'de str, DecodeError> {
    std::str::from_utf8(bytes(d)?).map_err(|inner| DecodeError::Utf8 { inner })
}

fn describe(e: &DecodeError) -> String {
    match e {
        DecodeError::LimitExceeded => {
            "a length field claims more bytes than the frame holds".into()
        }
        DecodeError::UnexpectedEnd { .. } => "message is truncated".into(),
        DecodeError::Utf8 { .. } => "a text field is not valid UTF-8".into(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Status;

    fn encode(msg: &Message) -> BytesMut {
        let mut buf = BytesMut::new();
        encode_body(msg, &mut buf).unwrap();
        buf
    }

    #[test]
    fn encoded_len_matches_encoding() {
        for msg in [
            Message::send(1, "bob", "hi"),
            Message::register(2, "alice"),
            Message::reply(3, Status::NotFound, "carol", "no such user"),
            Message::ping(4),
        ] {
            assert_eq!(encoded_len(&msg), encode(&msg).len(), "{msg:?}");
        }
    }

    /// The borrowed view writes and reads exactly what `Message`'s own serde derive does.
    #[test]
    fn borrowed_view_agrees_with_the_message_derive() {
        for msg in [
            Message::deliver(9, "alice", "bob", vec![0u8, 255, 10, 13]),
            Message::reply(3, Status::NotDelivered, "carol", "busy"),
            Message::register(1, "zoë"),
            Message::ping(7).closing(),
        ] {
            let body = encode(&msg);
            let derived = bincode::serde::encode_to_vec(&msg, WIRE).unwrap();
            assert_eq!(&body[..], &derived[..]);
            let (owned, used): (Message, usize) =
                bincode::serde::decode_from_slice(&body, WIRE).unwrap();
            assert_eq!(used, body.len());
            assert_eq!(owned, msg);
            assert_eq!(decode_body(&body).unwrap(), msg);
        }
    }

    /// The version 1 layout is the version 2 one without its last 16 bytes (`seq`, `time`).
    #[test]
    fn version_1_layout_is_version_2_without_seq_and_time() {
        let mut v2 = Message::deliver(9, "alice", "bob", "hi");
        v2.seq = 77;
        v2.time = 1_700_000_000_000;
        let v1 = v2.clone().with_version(1);
        let (b1, b2) = (encode(&v1), encode(&v2));
        assert_eq!(b2.len(), b1.len() + V2_EXTRA_LEN);
        assert_eq!(&b1[2..], &b2[2..b1.len()]);
        assert_eq!(&b2[b1.len()..], &[&77u64.to_le_bytes()[..], &v2.time.to_le_bytes()].concat());
        assert_eq!(decode_body(&b2).unwrap(), v2);
        // Version 1 carries no seq or time: they read back as 0.
        let back = decode_body(&b1).unwrap();
        assert_eq!((back.seq, back.time, back.version), (0, 0, 1));
        // A version 1 body read as version 2 is short; a version 2 body read as 1 is long.
        let mut as_v2 = b1.to_vec();
        as_v2[0] = 2;
        assert!(decode_body(&as_v2).is_err());
        let mut as_v1 = b2.to_vec();
        as_v1[0] = 1;
        assert!(decode_body(&as_v1).is_err());
    }

    /// Exhaustive, so a new status cannot be added without coming here (and to the table in
    /// `message.rs`).
    fn index(status: Status) -> usize {
        match status {
            Status::Other(i) => i as usize,
            Status::Registered => 0,
            Status::NotFound => 1,
            Status::NameTaken => 2,
            Status::InvalidName => 3,
            Status::InvalidRequest => 4,
            Status::UnsupportedVersion => 5,
            Status::ShuttingDown => 6,
            Status::NotDelivered => 7,
            Status::ServerFull => 8,
            Status::FrameTooLarge => 9,
            Status::Malformed => 10,
            Status::RegistrationTimeout => 11,
            Status::SlowConsumer => 12,
            Status::IdleTimeout => 13,
            Status::NameOwned => 14,
            Status::NameConfusable => 15,
            Status::AuthFailed => 16,
            Status::AuthRequired => 17,
            Status::Unavailable => 18,
            Status::FrameTimeout => 19,
            Status::RateLimited => 20,
            Status::Stored => 21,
            Status::InboxFull => 22,
            Status::Expired => 23,
            Status::Kicked => 24,
        }
    }

    #[test]
    fn every_status_is_read_at_the_index_it_is_written() {
        let known = index(Status::Kicked) + 1;
        for i in 0..known + 2 {
            let status = Status::from_index(i as u32);
            assert_eq!(index(status), i);
            assert_eq!(matches!(status, Status::Other(_)), i >= known, "{status:?}");
            let body = encode(&Message::reply(1, status, "", ""));
            // kind (5) at 10..14, then the status index.
            assert_eq!(body[14..18], (i as u32).to_le_bytes(), "{status:?}");
            assert_eq!(decode_body(&body).unwrap().kind, Kind::Reply(status));
            // The same bytes as serde writes for it.
            let derived = bincode::serde::encode_to_vec(Message::reply(1, status, "", ""), WIRE);
            assert_eq!(&body[..], &derived.unwrap()[..]);
        }
    }

    #[test]
    fn the_seq_of_an_encoded_version_2_body_is_set_in_place() {
        let mut msg = Message::deliver(9, "alice", "bob", "hi");
        msg.time = 77;
        let mut body = encode(&msg);
        set_seq_in_body(&mut body, 42).unwrap();
        msg.seq = 42;
        assert_eq!(decode_body(&body).unwrap(), msg);
        let mut v1 = encode(&msg.clone().with_version(1));
        assert!(set_seq_in_body(&mut v1, 1).is_err());
        assert!(set_seq_in_body(&mut [2, 0, 1], 1).is_err());
    }

    #[test]
    fn acks_and_receipts_round_trip() {
        for msg in [Message::ack(1 << 40 | 5), Message::delivered("bob", &[3, u64::MAX], 9)] {
            let body = encode(&msg);
            assert_eq!(decode_body(&body).unwrap(), msg);
            let derived = bincode::serde::encode_to_vec(&msg, WIRE).unwrap();
            assert_eq!(&body[..], &derived[..]);
        }
    }

    /// Every valid message takes the plain path (bincode only ever sees invalid bodies), and
    /// it reads what bincode reads.
    #[test]
    fn valid_messages_are_read_without_bincode() {
        let mut all = vec![
            Message::deliver(9, "alice", "bob", vec![0u8, 255, 10, 13]),
            Message::register(1, "zoë"),
            Message::ping(7).closing(),
            Message::ack(5),
            Message::delivered("bob", &[3, u64::MAX], 9),
            Message::send(1, "b", vec![b'x'; 70_000]),
        ];
        for i in 0..30 {
            all.push(Message::reply(i, Status::from_index(i as u32), "carol", "why"));
        }
        for version in [0, 1, 2, 3, u16::MAX] {
            all.push(Message::send(u64::MAX, "é", "hi").with_version(version));
        }
        for msg in all {
            let body = encode(&msg);
            let plain = read_valid(&body).map(|m| m.to_message());
            assert_eq!(plain.as_ref(), Some(&msg), "{msg:?}");
            let (Wire(by_bincode), _) =
                bincode::borrow_decode_from_slice(&body, WIRE.with_limit::<131072>()).unwrap();
            assert_eq!(by_bincode.to_message(), msg);
        }
    }

    #[test]
    fn round_trip() {
        let msg = Message::deliver(9, "alice", "bob", vec![0u8, 255, 10, 13]);
        assert_eq!(decode_body(&encode(&msg)).unwrap(), msg);
    }

    /// A body whose length is exactly a power of two decodes with a limit equal to that length:
    /// the decode charge equals the bytes consumed, so the tightest ladder step is enough.
    #[test]
    fn body_of_exact_power_of_two_length_decodes() {
        for target in [64usize, 1024, 65536] {
            let empty = encoded_len(&Message::send(1, "b", ""));
            let msg = Message::send(1, "b", vec![b'x'; target - empty]);
            let body = encode(&msg);
            assert_eq!(body.len(), target);
            assert_eq!(decode_body(&body).unwrap(), msg);
        }
    }

    #[test]
    fn huge_length_claim_is_rejected_without_allocating() {
        // A real message whose `to` length (after version 2, id 8, kind 4, flags 2) claims 2^40.
        let mut body = encode(&Message::send(9, "bob", "")).to_vec();
        body[16..24].copy_from_slice(&(1u64 << 40).to_le_bytes());
        let err = decode_body(&body).unwrap_err();
        assert!(matches!(err, ProtoError::Malformed(ref m) if m.contains("claims")), "{err}");
    }

    #[test]
    fn trailing_bytes_are_rejected() {
        let mut body = encode(&Message::ping(1));
        body.extend_from_slice(&[0]);
        assert!(decode_body(&body).unwrap_err().to_string().contains("trailing"));
    }

    #[test]
    fn invalid_utf8_is_rejected() {
        let mut body = encode(&Message::send(1, "ab", "x")).to_vec();
        // `to` starts after version 2 + id 8 + kind 4 + flags 2 + length 8 = 24.
        body[24] = 0xff;
        assert!(decode_body(&body).unwrap_err().to_string().contains("UTF-8"));
    }

    #[test]
    fn truncated_and_garbage_bodies_are_errors() {
        let body = encode(&Message::send(5, "bob", "hello"));
        for cut in 0..body.len() {
            assert!(decode_body(&body[..cut]).is_err(), "cut at {cut}");
        }
        assert!(decode_body(&[0xff; 40]).is_err());
        assert!(decode_body(&[]).is_err());
    }

    #[test]
    fn bad_enum_and_bool_values_are_errors() {
        let mut body = encode(&Message::ping(1)).to_vec();
        body[10] = 200; // kind index out of range
        assert!(decode_body(&body).is_err());
        let mut body = encode(&Message::ping(1)).to_vec();
        body[14] = 2; // `register` is neither 0 nor 1
        assert!(decode_body(&body).is_err());
    }
}
