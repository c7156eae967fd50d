//! The relay wire protocol: one [`Message`] struct, its framing and encoding, the limits that
//! bound every decode, and typed views ([`Request`], [`ServerEvent`]) that the server and
//! client handle instead of raw flags.
//!
//! The protocol is specified for implementers in `docs/PROTOCOL.md` at the repository root.
//!
//! A frame is a 4-byte big-endian length followed by that many bytes of one bincode-encoded
//! [`Message`]. [`MessageCodec`] reads and writes frames with an explicit maximum length, and
//! decodes with a byte limit tied to the frame, so a hostile length prefix can never make the
//! decoder allocate more than the frame could hold.
//!
//! ```
//! use bytes::BytesMut;
//! use relay_proto::{Message, MessageCodec, Request};
//! use tokio_util::codec::{Decoder, Encoder};
//!
//! let mut codec = MessageCodec::new(relay_proto::DEFAULT_MAX_FRAME_LEN);
//! let mut buf = BytesMut::new();
//! codec.encode(&Message::send(7, "bob", "hello"), &mut buf).unwrap();
//! let decoded = codec.decode(&mut buf).unwrap().unwrap();
//! match Request::parse(decoded.as_ref()).unwrap() {
//!     Request::Send { id, to, content } => {
//!         assert_eq!((id, to, content), (7, "bob", &b"hello"[..]));
//!     }
//!     other => panic!("unexpected {other:?}"),
//! }
//! ```
#![deny(missing_docs)]

mod auth;
mod codec;
mod encoding;
mod error;
mod event;
mod greeting;
mod handoff;
mod limits;
mod message;
mod name;
mod reader;
mod request;
mod text;

pub use auth::{
    AuthError, CREDENTIALS_LEN, Identity, NONCE_LEN, PUBLIC_KEY_LEN, PublicKey, SEED_LEN,
    SIGNATURE_LEN, SIGNING_DOMAIN, TLS_BINDING_LEN, TLS_EXPORTER_LABEL, fresh_nonce, hex,
    signing_input, signing_input_bound, verify_credentials, verify_credentials_bound,
};
pub use codec::MessageCodec;
pub use encoding::{
    ChatBytes, decode_body, decode_ref, encode_body, encode_body_ref, encoded_len, encoded_len_ref,
    has_v2_layout, read_chat, set_seq_in_body,
};
pub use error::ProtoError;
pub use event::{ServerEvent, User};
pub use greeting::{AuthMode, Greeting};
pub use handoff::Handoff;
pub use limits::{
    DEFAULT_MAX_FRAME_LEN, FRAME_HEADER_LEN, MAX_FRAME_LEN_CEILING, MAX_NAME_LEN,
    MIN_FRAME_LEN_FLOOR, MIN_PROTOCOL_VERSION, PRE_REGISTER_MAX_FRAME_LEN, PROTOCOL_VERSION,
    V2_EXTRA_LEN, check_max_frame_len,
};
pub use message::{Kind, Message, MessageRef, Status};
pub use name::{
    Destination, NameError, NameKey, canonical_name, name_key, parse_destination, validate_name,
};
pub use reader::{FrameReader, Source, Stream, frames_in, split_run};
pub use request::{MAX_QUOTED, Rejection, Request};
pub use text::{needs_escape, printable};
