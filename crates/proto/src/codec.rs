//! Framing: [`MessageCodec`] turns a byte stream into [`Message`]s and back, over
//! `LengthDelimitedCodec` with a 4-byte big-endian length prefix and an explicit maximum.

use bytes::{Buf, BytesMut};
use tokio_util::codec::{Decoder, Encoder, LengthDelimitedCodec, LengthDelimitedCodecError};

use crate::encoding::{decode_body, encode_body_ref};
use crate::error::ProtoError;
use crate::limits::{FRAME_HEADER_LEN, MAX_FRAME_LEN_CEILING, MIN_FRAME_LEN_FLOOR};
use crate::message::{Message, MessageRef};

/// Reads and writes length-prefixed [`Message`] frames.
///
/// Decoding rejects a frame whose length prefix is over the limit as soon as the 4-byte header
/// arrives, before reading or reserving its body. The limit can be changed at any time (the
/// server raises it once a client has registered).
#[derive(Debug)]
pub struct MessageCodec {
    frames: LengthDelimitedCodec,
    max_frame_len: usize,
}

impl MessageCodec {
    /// A codec whose frames carry at most `max_frame_len` bytes after the length prefix.
    ///
    /// The limit is clamped to the range the protocol allows (see
    /// [`check_max_frame_len`](crate::check_max_frame_len)); validate configuration with that
    /// function first to report a bad value to a person.
    pub fn new(max_frame_len: usize) -> MessageCodec {
        let max_frame_len = clamp(max_frame_len);
        let frames = LengthDelimitedCodec::builder()
            .length_field_type::<u32>()
            .big_endian()
            .max_frame_length(max_frame_len)
            .new_codec();
        MessageCodec { frames, max_frame_len }
    }

    /// The current maximum frame body length.
    pub fn max_frame_len(&self) -> usize {
        self.max_frame_len
    }

    /// Changes the maximum frame body length for frames not yet started.
    pub fn set_max_frame_len(&mut self, max_frame_len: usize) {
        self.max_frame_len = clamp(max_frame_len);
        self.frames.set_max_frame_length(self.max_frame_len);
    }
}

fn is_over_limit(e: &std::io::Error) -> bool {
    e.get_ref().is_some_and(|inner| inner.is::<LengthDelimitedCodecError>())
}

fn clamp(len: usize) -> usize {
    len.clamp(MIN_FRAME_LEN_FLOOR, MAX_FRAME_LEN_CEILING)
}

impl MessageCodec {
    /// The body length of the frame at the front of `src` if all of it is there, consuming
    /// nothing: `None` until it is. Keeps no state, so a caller can ask again after more
    /// bytes arrive, and take the body in place (see [`FrameReader::buffered_body`]).
    ///
    /// # Errors
    /// [`ProtoError::FrameTooLarge`] as soon as a header over the limit is there.
    ///
    /// [`FrameReader::buffered_body`]: crate::FrameReader::buffered_body
    pub fn complete_frame(&self, src: &[u8]) -> Result<Option<usize>, ProtoError> {
        let Some(header) = src.first_chunk::<FRAME_HEADER_LEN>() else { return Ok(None) };
        let len = u32::from_be_bytes(*header);
        let max = self.max_frame_len;
        if usize::try_from(len).map_or(true, |len| len > max) {
            return Err(ProtoError::FrameTooLarge { len: u64::from(len), max });
        }
        let len = len as usize;
        Ok((src.len() - FRAME_HEADER_LEN >= len).then_some(len))
    }

    /// Splits the next complete frame's body off the front of `src`, without decoding it;
    /// `None` until a whole frame is buffered. Callers decode it with
    /// [`decode_ref`](crate::decode_ref) to read the message in place.
    ///
    /// # Errors
    /// [`ProtoError::FrameTooLarge`] as soon as a header over the limit arrives.
    pub fn decode_frame(&mut self, src: &mut BytesMut) -> Result<Option<BytesMut>, ProtoError> {
        match self.frames.decode(src) {
            Ok(frame) => Ok(frame),
            Err(e) if is_over_limit(&e) => {
                // `LengthDelimitedCodec` refuses the header before consuming it, so it is
                // still at the front of `src`: read it to report the claimed length.
                let len = match src.get(..FRAME_HEADER_LEN) {
                    Some(mut header) => u64::from(header.get_u32()),
                    None => 0,
                };
                Err(ProtoError::FrameTooLarge { len, max: self.max_frame_len })
            }
            Err(e) => Err(e.into()),
        }
    }
}

impl Decoder for MessageCodec {
    type Item = Message;
    type Error = ProtoError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Message>, ProtoError> {
        match self.decode_frame(src)? {
            Some(body) => decode_body(&body).map(Some),
            None => Ok(None),
        }
    }

    fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<Message>, ProtoError> {
        match self.decode(src)? {
            Some(msg) => Ok(Some(msg)),
            None if src.is_empty() => Ok(None),
            None => Err(ProtoError::Truncated { buffered: src.len() }),
        }
    }
}

impl MessageCodec {
    /// Appends the frame for a borrowed message to `dst`: a placeholder header, the body, then
    /// the real length. This is byte-for-byte what `LengthDelimitedCodec` writes, without
    /// encoding into a temporary buffer first. On error `dst` is left as it was.
    ///
    /// # Errors
    /// [`ProtoError::FrameTooLarge`] if the body is over the frame limit.
    pub fn encode_ref(&self, msg: &MessageRef<'_>, dst: &mut BytesMut) -> Result<(), ProtoError> {
        let start = dst.len();
        dst.extend_from_slice(&[0; FRAME_HEADER_LEN]);
        let len = match encode_body_ref(msg, dst) {
            Ok(len) => len,
            Err(e) => {
                dst.truncate(start);
                return Err(e);
            }
        };
        if len > self.max_frame_len {
            dst.truncate(start);
            return Err(ProtoError::FrameTooLarge { len: len as u64, max: self.max_frame_len });
        }
        // `len` fits in u32: it is at most the frame limit, itself at most 16 MiB.
        let header = u32::try_from(len).unwrap_or(u32::MAX).to_be_bytes();
        dst[start..start + FRAME_HEADER_LEN].copy_from_slice(&header);
        Ok(())
    }
}

impl Encoder<&Message> for MessageCodec {
    type Error = ProtoError;

    fn encode(&mut self, msg: &Message, dst: &mut BytesMut) -> Result<(), ProtoError> {
        self.encode_ref(&msg.as_ref(), dst)
    }
}

impl Encoder<Message> for MessageCodec {
    type Error = ProtoError;

    fn encode(&mut self, msg: Message, dst: &mut BytesMut) -> Result<(), ProtoError> {
        self.encode(&msg, dst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::encoding::{encode_body, encoded_len};
    use bytes::{BufMut, Bytes};

    fn frame(msg: &Message) -> BytesMut {
        let mut buf = BytesMut::new();
        MessageCodec::new(crate::DEFAULT_MAX_FRAME_LEN).encode(msg, &mut buf).unwrap();
        buf
    }

    /// The worked example in `docs/PROTOCOL.md`, byte for byte.
    #[test]
    fn documented_example_frame() {
        let expected: Vec<u8> = [
            &[0x00, 0x00, 0x00, 0x2d][..],                  // length 45
            &[0x01, 0x00],                                  // version 1
            &[0x07, 0, 0, 0, 0, 0, 0, 0],                   // id 7
            &[0x00, 0, 0, 0],                               // kind Chat
            &[0x00, 0x00],                                  // register, exit
            &[0x03, 0, 0, 0, 0, 0, 0, 0, b'b', b'o', b'b'], // to "bob"
            &[0x00, 0, 0, 0, 0, 0, 0, 0],                   // from ""
            &[0x02, 0, 0, 0, 0, 0, 0, 0, b'h', b'i'],       // content "hi"
        ]
        .concat();
        assert_eq!(&frame(&Message::send(7, "bob", "hi").with_version(1))[..], &expected[..]);

        let reply = frame(&Message::reply(7, crate::Status::NotFound, "bob", ""));
        // kind Reply (5) followed by status NotFound (1).
        assert_eq!(&reply[14..22], &[5, 0, 0, 0, 1, 0, 0, 0]);
    }

    /// The reply and hello examples in `docs/PROTOCOL.md`, byte for byte.
    #[test]
    fn documented_reply_and_hello_frames() {
        let hex = |frame: &[u8]| -> String {
            frame.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(" ")
        };
        let reply = Message::reply(2, crate::Status::NotFound, "carol", "carol is not online");
        assert_eq!(
            hex(&frame(&reply.with_version(1))),
            "00 00 00 44 01 00 02 00 00 00 00 00 00 00 05 00 00 00 01 00 00 00 00 00 05 00 00 \
             00 00 00 00 00 63 61 72 6f 6c 00 00 00 00 00 00 00 00 13 00 00 00 00 00 00 00 63 \
             61 72 6f 6c 20 69 73 20 6e 6f 74 20 6f 6e 6c 69 6e 65"
        );
        // The operator's kick, closing (version 2).
        let kicked = Message::reply(0, crate::Status::Kicked, "bob", "please stop").closing();
        assert_eq!(
            hex(&frame(&kicked)),
            "00 00 00 4a 02 00 00 00 00 00 00 00 00 00 05 00 00 00 18 00 00 00 00 01 03 00 00 \
             00 00 00 00 00 62 6f 62 00 00 00 00 00 00 00 00 0b 00 00 00 00 00 00 00 70 6c 65 \
             61 73 65 20 73 74 6f 70 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00"
        );
        let hello = hex(&frame(&Message::hello(1)));
        // Version 2, id 1, kind Hello (6), everything else empty or zero.
        let expected =
            format!("00 00 00 38 02 00 01 00 00 00 00 00 00 00 06 {}", ["00"; 45].join(" "));
        assert_eq!(hello, expected);
    }

    /// The multi-frame user list example in `docs/PROTOCOL.md`: its split, and its last frame
    /// byte for byte.
    #[test]
    fn documented_user_list_frames() {
        let users = [
            ("alice", "127.0.0.1:50001".to_string()),
            ("bob", "127.0.0.1:50002".to_string()),
            ("carol", "127.0.0.1:50003".to_string()),
        ];
        // A frame limit of 120 leaves 56 bytes of lines per frame: two frames.
        let parts = Message::user_list(4, users.iter().map(|(n, a)| (*n, a.clone())), 120, None);
        let contents: Vec<&[u8]> = parts.iter().map(|m| &m.content[..]).collect();
        assert_eq!(
            contents,
            [&b"alice 127.0.0.1:50001\nbob 127.0.0.1:50002\n"[..], b"carol 127.0.0.1:50003\n\n"]
        );
        let last = frame(&parts[1].clone().with_version(1));
        let mut expected = vec![0x00, 0x00, 0x00, 0x3f, 0x01, 0x00, 0x04, 0, 0, 0, 0, 0, 0, 0];
        expected.extend_from_slice(&[0x02, 0, 0, 0, 0, 0]);
        expected.extend_from_slice(&[0; 16]);
        expected.extend_from_slice(&[0x17, 0, 0, 0, 0, 0, 0, 0]);
        expected.extend_from_slice(b"carol 127.0.0.1:50003\n\n");
        assert_eq!(&last[..], &expected[..]);
    }

    /// The version 2 worked example in `docs/PROTOCOL.md`: a delivered message with its
    /// sequence number and time.
    #[test]
    fn documented_v2_example_frame() {
        let mut msg = Message::deliver(7, "alice", "bob", "hi");
        msg.seq = 1 << 40 | 1;
        msg.time = 1_764_547_200_000;
        let expected: Vec<u8> = [
            &[0x00, 0x00, 0x00, 0x42][..],                              // length 66
            &[0x02, 0x00],                                              // version 2
            &[0x07, 0, 0, 0, 0, 0, 0, 0],                               // id 7
            &[0x00, 0, 0, 0],                                           // kind Chat
            &[0x00, 0x00],                                              // register, exit
            &[0x03, 0, 0, 0, 0, 0, 0, 0, b'b', b'o', b'b'],             // to "bob"
            &[0x05, 0, 0, 0, 0, 0, 0, 0, b'a', b'l', b'i', b'c', b'e'], // from "alice"
            &[0x02, 0, 0, 0, 0, 0, 0, 0, b'h', b'i'],                   // content "hi"
            &[0x01, 0, 0, 0, 0, 0x01, 0, 0],                            // seq 2^40 + 1
            &[0x00, 0x84, 0x35, 0xd7, 0x9a, 0x01, 0, 0],                // time 1764547200000
        ]
        .concat();
        assert_eq!(&frame(&msg)[..], &expected[..]);
    }

    #[test]
    fn frames_match_length_delimited_codec() {
        let msg = Message::send(3, "bob", "hello");
        let mut body = BytesMut::new();
        encode_body(&msg, &mut body).unwrap();
        let mut expected = BytesMut::new();
        LengthDelimitedCodec::new().encode(body.freeze(), &mut expected).unwrap();
        assert_eq!(frame(&msg), expected);
    }

    #[test]
    fn decodes_frames_split_anywhere_and_back_to_back() {
        let a = Message::send(1, "bob", "one");
        let b = Message::send(2, "bob", "two");
        let mut all = frame(&a);
        all.extend_from_slice(&frame(&b));
        for split in 0..=all.len() {
            let mut codec = MessageCodec::new(1024);
            let mut buf = BytesMut::from(&all[..split]);
            let mut got = Vec::new();
            while let Some(m) = codec.decode(&mut buf).unwrap() {
                got.push(m);
            }
            buf.extend_from_slice(&all[split..]);
            while let Some(m) = codec.decode(&mut buf).unwrap() {
                got.push(m);
            }
            assert_eq!(got, vec![a.clone(), b.clone()], "split at {split}");
        }
    }

    #[test]
    fn frame_at_the_limit_decodes_and_one_over_is_refused_from_its_header() {
        let max = 1024;
        let empty = encoded_len(&Message::send(1, "bob", ""));
        let at_limit = Message::send(1, "bob", vec![7u8; max - empty]);
        let mut codec = MessageCodec::new(max);
        let mut buf = BytesMut::new();
        codec.encode(&at_limit, &mut buf).unwrap();
        assert_eq!(buf.len(), FRAME_HEADER_LEN + max);
        assert_eq!(codec.decode(&mut buf).unwrap(), Some(at_limit));

        // Encoding a message one byte over is refused and leaves the buffer untouched.
        let over = Message::send(1, "bob", vec![7u8; max - empty + 1]);
        let mut buf = BytesMut::from(&b"keep"[..]);
        let err = codec.encode(&over, &mut buf).unwrap_err();
        assert!(matches!(err, ProtoError::FrameTooLarge { len, max: 1024 } if len == 1025));
        assert_eq!(&buf[..], b"keep");

        // Decoding: the header alone is enough to refuse the frame.
        let mut buf = BytesMut::new();
        buf.put_u32(max as u32 + 1);
        let err = codec.decode(&mut buf).unwrap_err();
        assert!(matches!(err, ProtoError::FrameTooLarge { len: 1025, max: 1024 }));
        assert_eq!(err.status(), Some(crate::Status::FrameTooLarge));
    }

    #[test]
    fn huge_header_does_not_reserve_memory() {
        let mut codec = MessageCodec::new(crate::DEFAULT_MAX_FRAME_LEN);
        let mut buf = BytesMut::new();
        buf.put_u32(u32::MAX);
        assert!(codec.decode(&mut buf).is_err());
        assert!(buf.capacity() < 1024, "capacity {}", buf.capacity());
    }

    #[test]
    fn limit_can_be_raised_after_registration() {
        let mut codec = MessageCodec::new(crate::PRE_REGISTER_MAX_FRAME_LEN);
        let big = Message::send(1, "bob", Bytes::from(vec![1u8; 4000]));
        let mut buf = BytesMut::new();
        assert!(codec.encode(&big, &mut buf).is_err());
        codec.set_max_frame_len(crate::DEFAULT_MAX_FRAME_LEN);
        codec.encode(&big, &mut buf).unwrap();
        assert_eq!(codec.decode(&mut buf).unwrap(), Some(big));
    }

    #[test]
    fn garbage_body_in_a_valid_frame_is_malformed() {
        let mut codec = MessageCodec::new(1024);
        let mut buf = BytesMut::new();
        buf.put_u32(5);
        buf.put_slice(b"\xde\xad\xbe\xef\x00");
        let err = codec.decode(&mut buf).unwrap_err();
        assert_eq!(err.status(), Some(crate::Status::Malformed));
    }

    #[test]
    fn eof_inside_a_frame_is_truncation() {
        let mut codec = MessageCodec::new(1024);
        let full = frame(&Message::ping(1));
        let mut buf = BytesMut::from(&full[..full.len() - 1]);
        assert!(matches!(codec.decode_eof(&mut buf), Err(ProtoError::Truncated { .. })));
        let mut empty = BytesMut::new();
        assert_eq!(codec.decode_eof(&mut empty).unwrap(), None);
    }
}
