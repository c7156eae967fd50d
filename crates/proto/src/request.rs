//! The typed view of what a client sends: [`Request::parse`] checks a message's flags and
//! fields and says what the client asked for, or why it is refused.
//!
//! A request borrows its text and content from the decoded frame, so the server can route a
//! message without copying it first.

use crate::auth::CREDENTIALS_LEN;
use crate::limits::{MIN_PROTOCOL_VERSION, PROTOCOL_VERSION};
use crate::message::{Kind, Message, MessageRef, Status};
use crate::name::{parse_destination, validate_name};

/// A valid client-to-server message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request<'a> {
    /// Claim `name` (the message's `from`, `register` set).
    Register {
        /// Message id, echoed in the reply.
        id: u64,
        /// The name asked for; already checked by [`validate_name`].
        name: &'a str,
        /// The protocol version the client registers with (1 or 2).
        version: u16,
        /// Version 2: the public key and signature proving it ([`CREDENTIALS_LEN`] bytes,
        /// checked with [`verify_credentials`](crate::verify_credentials)); `None` for a
        /// guest.
        credentials: Option<&'a [u8]>,
    },
    /// Version 2: the first frame, asking for the server's greeting.
    Hello {
        /// Message id, echoed in the greeting.
        id: u64,
        /// The version the client speaks.
        version: u16,
    },
    /// Send `content` to `to`, a name or an `ip:port` address (already checked).
    Send {
        /// Message id, echoed in any reply about this message.
        id: u64,
        /// Destination name or address.
        to: &'a str,
        /// Message body.
        content: &'a [u8],
    },
    /// Ask for the users online.
    ListUsers {
        /// Message id, echoed in the reply.
        id: u64,
        /// List only users after this name (the `to` of a paged listing's last part); empty
        /// for the first page.
        after: &'a str,
    },
    /// Go offline (`exit` set).
    Offline {
        /// Message id.
        id: u64,
    },
    /// Liveness probe; answer with a pong of the same id.
    Ping {
        /// Message id.
        id: u64,
    },
    /// Answer to the server's ping.
    Pong {
        /// Message id.
        id: u64,
    },
    /// Version 2: every message numbered up to `seq` was handed to the application.
    Ack {
        /// Message id (unused; 0 by convention).
        id: u64,
        /// The highest sequence number handed over.
        seq: u64,
    },
}

/// Why a client message was refused: the typed status and a detail for people.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejection {
    /// Id of the refused message.
    pub id: u64,
    /// The typed reason.
    pub status: Status,
    /// What is wrong, for logs and people.
    pub detail: String,
    /// The destination the rejection is about, if any.
    pub to: String,
}

impl Rejection {
    fn new(id: u64, status: Status, detail: impl Into<String>) -> Rejection {
        Rejection { id, status, detail: detail.into(), to: String::new() }
    }

    /// A rejection about `to` (a name or destination the client sent), quoted in the reply
    /// at most [`MAX_QUOTED`] bytes long: a reply never grows with what it refuses.
    fn about(id: u64, status: Status, detail: impl Into<String>, to: &str) -> Rejection {
        Rejection { to: quoted(to), ..Rejection::new(id, status, detail) }
    }

    /// The reply to send the client.
    pub fn to_message(&self) -> Message {
        Message::reply(self.id, self.status, self.to.clone(), self.detail.clone())
    }
}

/// Longest name or destination a rejection quotes back, in bytes: longer ones are cut (at a
/// character boundary) and marked with `…`. Twice the longest valid name.
pub const MAX_QUOTED: usize = 2 * crate::limits::MAX_NAME_LEN;

/// `text` cut to at most [`MAX_QUOTED`] bytes.
fn quoted(text: &str) -> String {
    if text.len() <= MAX_QUOTED {
        return text.to_owned();
    }
    let mut end = MAX_QUOTED - '…'.len_utf8();
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

impl<'a> Request<'a> {
    /// The id of the message this request came in.
    pub fn id(&self) -> u64 {
        match self {
            Request::Register { id, .. }
            | Request::Hello { id, .. }
            | Request::Send { id, .. }
            | Request::ListUsers { id, .. }
            | Request::Offline { id }
            | Request::Ping { id }
            | Request::Pong { id }
            | Request::Ack { id, .. } => *id,
        }
    }

    /// Checks a message received from a client.
    ///
    /// `from` is ignored except on registration: the server stamps the sender's name itself.
    ///
    /// # Errors
    /// A [`Rejection`] for invalid flag combinations ([`Status::InvalidRequest`]), invalid
    /// names or destinations ([`Status::InvalidName`]), kinds only a server sends, and a
    /// registration with another protocol version ([`Status::UnsupportedVersion`]).
    pub fn parse(msg: MessageRef<'a>) -> Result<Request<'a>, Rejection> {
        let id = msg.id;
        let invalid = |detail: &str| Err(Rejection::new(id, Status::InvalidRequest, detail));
        match msg.kind {
            Kind::Chat => {}
            Kind::Users | Kind::Reply(_) | Kind::Greeting | Kind::Delivered => {
                return invalid("only the server sends this kind");
            }
            Kind::ListUsers | Kind::Ping | Kind::Pong | Kind::Hello | Kind::Ack
                if msg.register || msg.exit =>
            {
                return invalid("control messages take no register or exit flag");
            }
            Kind::Ack => {
                if msg.version < 2 {
                    return invalid("ack is a version 2 message");
                }
                if !msg.to.is_empty() || !msg.content.is_empty() {
                    return invalid("an ack carries only its sequence number");
                }
                return Ok(Request::Ack { id, seq: msg.seq });
            }
            Kind::Hello => {
                if msg.version < 2 {
                    return invalid("hello is a version 2 message");
                }
                return Ok(Request::Hello { id, version: msg.version });
            }
            Kind::ListUsers => {
                if !msg.to.is_empty()
                    && let Err(e) = validate_name(msg.to)
                {
                    let detail = format!("bad name to list after: {e}");
                    return Err(Rejection::about(id, Status::InvalidName, detail, msg.to));
                }
                return Ok(Request::ListUsers { id, after: msg.to });
            }
            Kind::Ping => return Ok(Request::Ping { id }),
            Kind::Pong => return Ok(Request::Pong { id }),
        }
        match (msg.register, msg.exit) {
            (true, true) => invalid("register and exit cannot both be set"),
            (true, false) => {
                if !(MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION).contains(&msg.version) {
                    return Err(Rejection::new(
                        id,
                        Status::UnsupportedVersion,
                        format!(
                            "protocol version {} is not supported; this server speaks \
                             {MIN_PROTOCOL_VERSION} to {PROTOCOL_VERSION}",
                            msg.version
                        ),
                    ));
                }
                if !msg.to.is_empty() {
                    return invalid("a registration carries the name in `from`, not `to`");
                }
                let credentials = match (msg.version, msg.content.len()) {
                    (_, 0) => None,
                    (1, _) => return invalid("a version 1 registration carries only the name"),
                    (_, CREDENTIALS_LEN) => Some(msg.content),
                    _ => {
                        return invalid(
                            "registration credentials must be 96 bytes: a 32-byte Ed25519 \
                             public key, then a 64-byte signature",
                        );
                    }
                };
                match validate_name(msg.from) {
                    Ok(()) => Ok(Request::Register {
                        id,
                        name: msg.from,
                        version: msg.version,
                        credentials,
                    }),
                    Err(e) => {
                        Err(Rejection::about(id, Status::InvalidName, e.to_string(), msg.from))
                    }
                }
            }
            (false, true) => {
                if !msg.to.is_empty() {
                    return invalid("an offline notice must not be addressed to anyone");
                }
                Ok(Request::Offline { id })
            }
            (false, false) => match parse_destination(msg.to) {
                Ok(_) => Ok(Request::Send { id, to: msg.to, content: msg.content }),
                Err(e) => Err(Rejection::about(
                    id,
                    Status::InvalidName,
                    format!("bad destination: {e}"),
                    msg.to,
                )),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn status(msg: Message) -> Status {
        Request::parse(msg.as_ref()).unwrap_err().status
    }

    #[test]
    fn valid_requests() {
        assert_eq!(
            Request::parse(Message::register(1, "alice").as_ref()),
            Ok(Request::Register { id: 1, name: "alice", version: 2, credentials: None })
        );
        let creds = [5u8; CREDENTIALS_LEN];
        assert_eq!(
            Request::parse(Message::register_with_key(1, "alice", creds).as_ref()),
            Ok(Request::Register { id: 1, name: "alice", version: 2, credentials: Some(&creds) })
        );
        assert_eq!(
            Request::parse(Message::register(1, "alice").with_version(1).as_ref()),
            Ok(Request::Register { id: 1, name: "alice", version: 1, credentials: None })
        );
        assert_eq!(
            Request::parse(Message::hello(0).as_ref()),
            Ok(Request::Hello { id: 0, version: 2 })
        );
        assert_eq!(
            Request::parse(Message::send(2, "bob", "hi").as_ref()),
            Ok(Request::Send { id: 2, to: "bob", content: b"hi" })
        );
        assert!(matches!(
            Request::parse(Message::send(3, "127.0.0.1:9", "x").as_ref()),
            Ok(Request::Send { id: 3, .. })
        ));
        assert_eq!(Request::parse(Message::offline(4).as_ref()), Ok(Request::Offline { id: 4 }));
        assert_eq!(
            Request::parse(Message::list_users(5).as_ref()),
            Ok(Request::ListUsers { id: 5, after: "" })
        );
        assert_eq!(Request::parse(Message::ping(6).as_ref()), Ok(Request::Ping { id: 6 }));
        assert_eq!(Request::parse(Message::pong(7).as_ref()), Ok(Request::Pong { id: 7 }));
        assert_eq!(Request::parse(Message::ack(9).as_ref()), Ok(Request::Ack { id: 0, seq: 9 }));
    }

    #[test]
    fn acks_are_version_2_and_bare_and_receipts_come_only_from_servers() {
        assert_eq!(status(Message::ack(1).with_version(1)), Status::InvalidRequest);
        let mut addressed = Message::ack(1);
        addressed.to = "bob".into();
        assert_eq!(status(addressed), Status::InvalidRequest);
        assert_eq!(status(Message::ack(1).closing()), Status::InvalidRequest);
        assert_eq!(status(Message::delivered("bob", &[1], 2)), Status::InvalidRequest);
    }

    #[test]
    fn a_spoofed_from_is_ignored_not_trusted() {
        let mut msg = Message::send(1, "bob", "hi");
        msg.from = "mallory".into();
        assert!(matches!(Request::parse(msg.as_ref()), Ok(Request::Send { .. })));
    }

    #[test]
    fn bad_flag_combinations() {
        let mut both = Message::register(1, "alice");
        both.exit = true;
        assert_eq!(status(both), Status::InvalidRequest);

        let mut addressed_exit = Message::offline(1);
        addressed_exit.to = "bob".into();
        assert_eq!(status(addressed_exit), Status::InvalidRequest);

        let mut register_with_body = Message::register(1, "alice");
        register_with_body.content = Bytes::from("x");
        assert_eq!(status(register_with_body), Status::InvalidRequest);
        // A key of the wrong length; credentials in a version 1 registration.
        let mut short_key = Message::register(1, "alice");
        short_key.content = Bytes::from(vec![1u8; 95]);
        assert_eq!(status(short_key), Status::InvalidRequest);
        let v1_key = Message::register_with_key(1, "alice", [1; 96]).with_version(1);
        assert_eq!(status(v1_key), Status::InvalidRequest);
        assert_eq!(status(Message::hello(1).with_version(1)), Status::InvalidRequest);
        assert_eq!(
            status(Message::greeting(
                1,
                &crate::Greeting::new(
                    crate::AuthMode::None,
                    [0; 32],
                    1024,
                    1024,
                    std::time::Duration::ZERO,
                    std::time::Duration::ZERO,
                    std::time::Duration::ZERO,
                )
            )),
            Status::InvalidRequest
        );

        let mut flagged_ping = Message::ping(1);
        flagged_ping.register = true;
        assert_eq!(status(flagged_ping), Status::InvalidRequest);

        assert_eq!(status(Message::reply(1, Status::Registered, "", "")), Status::InvalidRequest);
        assert_eq!(status(Message::user_list(1, [], 1024, None).remove(0)), Status::InvalidRequest);
        assert_eq!(status(Message::list_users_after(1, "a b")), Status::InvalidName);
    }

    #[test]
    fn bad_names_and_destinations() {
        for bad in ["", "a b", "a\u{1}", &"x".repeat(65), "10.0.0.1:1", "a:b", "a\u{200b}"] {
            let rejection = Request::parse(Message::register(9, bad).as_ref()).unwrap_err();
            assert_eq!(rejection.status, Status::InvalidName, "{bad:?}");
            assert_eq!(rejection.id, 9);
        }
        for bad in ["", "a b", &"x".repeat(65)] {
            let rejection = Request::parse(Message::send(9, bad, "x").as_ref()).unwrap_err();
            assert_eq!(rejection.status, Status::InvalidName, "{bad:?}");
            assert_eq!(rejection.to, bad);
        }
    }

    #[test]
    fn a_huge_destination_is_quoted_short() {
        let long = "é".repeat(30_000);
        let rejection = Request::parse(Message::send(1, long.as_str(), "x").as_ref()).unwrap_err();
        assert_eq!(rejection.status, Status::InvalidName);
        assert!(
            rejection.to.len() <= MAX_QUOTED && rejection.to.ends_with('…'),
            "{}",
            rejection.to
        );
        assert!(long.starts_with(rejection.to.trim_end_matches('…')));
        let reply = rejection.to_message();
        assert!(crate::encoded_len(&reply) < 400);
    }

    #[test]
    fn other_versions_are_refused_at_registration() {
        let mut msg = Message::register(1, "alice");
        msg.version = PROTOCOL_VERSION + 1;
        assert_eq!(status(msg), Status::UnsupportedVersion);
        assert_eq!(
            status(Message::register(1, "alice").with_version(0)),
            Status::UnsupportedVersion
        );
    }
}
