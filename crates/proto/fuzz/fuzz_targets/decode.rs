//! Fuzzes everything that reads untrusted bytes: the body decoder, the frame codec fed the
//! input in arbitrary chunks, and the typed views of whatever decodes.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use relay_proto::{MessageCodec, Request, ServerEvent, decode_body};
use tokio_util::codec::{Decoder, Encoder};

fuzz_target!(|data: &[u8]| {
    // A body on its own: anything that decodes must re-encode to the same bytes.
    if let Ok(msg) = decode_body(data) {
        let mut again = BytesMut::new();
        relay_proto::encode_body(&msg, &mut again).unwrap();
        assert_eq!(&again[..], data, "decode/encode is not a round trip");
        let _ = Request::parse(msg.as_ref());
        let _ = ServerEvent::parse(msg);
    }

    // The same bytes as a stream, split at a point chosen by the first byte, through a codec
    // with a small limit.
    let split = data.first().map_or(0, |b| usize::from(*b)).min(data.len());
    let mut codec = MessageCodec::new(1024);
    let mut buf = BytesMut::new();
    for chunk in [&data[..split], &data[split..]] {
        buf.extend_from_slice(chunk);
        loop {
            match codec.decode(&mut buf) {
                Ok(Some(msg)) => {
                    let mut out = BytesMut::new();
                    codec.encode(&msg, &mut out).unwrap();
                }
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
    let _ = codec.decode_eof(&mut buf);
});
