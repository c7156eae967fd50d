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

use bincode::config::{self, Configuration, Fixint, LittleEndian, NoLimit};
use bincode::error::DecodeError;
use bytes::BytesMut;

use crate::error::ProtoError;
use crate::limits::MAX_FRAME_LEN_CEILING;
use crate::message::{Kind, Message, MessageRef};

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
    // The size is known exactly, so encode into a slice of `dst` rather than through a
    // `std::io::Write` adapter, which checks capacity on every field.
    let len = encoded_len_ref(msg);
    let start = dst.len();
    dst.resize(start + len, 0);
    match bincode::serde::encode_into_slice(msg, &mut dst[start..], WIRE) {
        Ok(written) => {
            // `encoded_len` is exact (a test checks it); stay correct even if it were not.
            dst.truncate(start + written);
            Ok(written)
        }
        Err(e) => {
            dst.truncate(start);
            Err(ProtoError::Encode(e.to_string()))
        }
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
    2 + 8 + kind + 2 + 24 + msg.to.len() + msg.from.len() + msg.content.len()
}

/// Decodes one frame body into a [`Message`].
///
/// The decode runs with a byte limit of the body's length rounded up to a power of two (at
/// least 64), so it can never allocate more than twice what the frame holds, nor more than the
/// frame limit when that limit is a power of two. Trailing bytes and invalid UTF-8 are errors.
///
/// # Errors
/// [`ProtoError::Malformed`] for anything that is not exactly one valid message.
pub fn decode_body(body: &[u8]) -> Result<Message, ProtoError> {
    // bincode takes its limit as a const generic, so pick the smallest power of two that
    // holds the body from a fixed ladder.
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

fn decode_limited<const LIMIT: usize>(body: &[u8]) -> Result<Message, ProtoError> {
    const { assert!(LIMIT >= MIN_DECODE_LIMIT && LIMIT <= MAX_FRAME_LEN_CEILING) };
    // Decoded as the borrowed view, then copied once into the owned message: bincode would
    // otherwise build the content through a zero-filled `Vec`.
    let (msg, used): (MessageRef<'_>, usize) =
        bincode::serde::borrow_decode_from_slice(body, WIRE.with_limit::<LIMIT>())
            .map_err(|e| ProtoError::Malformed(describe(&e)))?;
    if used != body.len() {
        return Err(ProtoError::Malformed(format!(
            "{} trailing bytes after the message",
            body.len() - used
        )));
    }
    Ok(msg.to_message())
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
