//! The typed view of what a client sends: [`Request::parse`] checks a message's flags and
//! fields and says what the client asked for, or why it is refused.
//!
//! A request borrows its text and content from the decoded frame, so the server can route a
//! message without copying it first.

use crate::limits::PROTOCOL_VERSION;
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

    /// The reply to send the client.
    pub fn to_message(&self) -> Message {
        Message::reply(self.id, self.status, self.to.clone(), self.detail.clone())
    }
}

impl<'a> Request<'a> {
    /// The id of the message this request came in.
    pub fn id(&self) -> u64 {
        match self {
            Request::Register { id, .. }
            | Request::Send { id, .. }
            | Request::ListUsers { id }
            | Request::Offline { id }
            | Request::Ping { id }
            | Request::Pong { id } => *id,
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
            Kind::Users | Kind::Reply(_) => return invalid("only the server sends this kind"),
            Kind::ListUsers | Kind::Ping | Kind::Pong if msg.register || msg.exit => {
                return invalid("control messages take no register or exit flag");
            }
            Kind::ListUsers => return Ok(Request::ListUsers { id }),
            Kind::Ping => return Ok(Request::Ping { id }),
            Kind::Pong => return Ok(Request::Pong { id }),
        }
        match (msg.register, msg.exit) {
            (true, true) => invalid("register and exit cannot both be set"),
            (true, false) => {
                if msg.version != PROTOCOL_VERSION {
                    return Err(Rejection::new(
                        id,
                        Status::UnsupportedVersion,
                        format!(
                            "protocol version {} is not supported; this server speaks {}",
                            msg.version, PROTOCOL_VERSION
                        ),
                    ));
                }
                if !msg.to.is_empty() || !msg.content.is_empty() {
                    return invalid("a registration carries only the name, in `from`");
                }
                match validate_name(msg.from) {
                    Ok(()) => Ok(Request::Register { id, name: msg.from }),
                    Err(e) => Err(Rejection {
                        to: msg.from.to_owned(),
                        ..Rejection::new(id, Status::InvalidName, e.to_string())
                    }),
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
                Err(e) => Err(Rejection {
                    to: msg.to.to_owned(),
                    ..Rejection::new(id, Status::InvalidName, format!("bad destination: {e}"))
                }),
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
            Ok(Request::Register { id: 1, name: "alice" })
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
            Ok(Request::ListUsers { id: 5 })
        );
        assert_eq!(Request::parse(Message::ping(6).as_ref()), Ok(Request::Ping { id: 6 }));
        assert_eq!(Request::parse(Message::pong(7).as_ref()), Ok(Request::Pong { id: 7 }));
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

        let mut flagged_ping = Message::ping(1);
        flagged_ping.register = true;
        assert_eq!(status(flagged_ping), Status::InvalidRequest);

        assert_eq!(status(Message::reply(1, Status::Registered, "", "")), Status::InvalidRequest);
        assert_eq!(status(Message::user_list(1, [], 1024).remove(0)), Status::InvalidRequest);
    }

    #[test]
    fn bad_names_and_destinations() {
        for bad in ["", "a b", "a\u{1}", &"x".repeat(65), "10.0.0.1:1"] {
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
    fn other_versions_are_refused_at_registration() {
        let mut msg = Message::register(1, "alice");
        msg.version = PROTOCOL_VERSION + 1;
        assert_eq!(status(msg), Status::UnsupportedVersion);
    }
}
