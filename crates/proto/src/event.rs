//! The typed view of what a server sends: [`ServerEvent::parse`] turns a [`Message`] from the
//! server into what it means for the client.

use bytes::Bytes;

use crate::greeting::Greeting;
use crate::message::{Kind, Message, Status};

/// One online user in a [`ServerEvent::Users`] listing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct User {
    /// Registered name.
    pub name: String,
    /// The client's address as the server sees it; messages may be addressed to it.
    pub addr: String,
}

/// A valid server-to-client message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ServerEvent {
    /// A chat message from another user (or from this client to itself).
    Message {
        /// The sender's id for the message.
        id: u64,
        /// The sender's registered name, stamped by the server.
        from: String,
        /// Message body.
        content: Bytes,
        /// Version 2: the per-recipient sequence number (0 in version 1).
        seq: u64,
        /// Version 2: when the server received it, in ms since the Unix epoch (0 in version 1).
        time: u64,
    },
    /// Version 2: the server's greeting, answering the client's hello.
    Greeting {
        /// Id of the hello.
        id: u64,
        /// What the server says.
        greeting: Greeting,
    },
    /// Part of the answer to a user listing.
    Users {
        /// Id of the listing request.
        id: u64,
        /// Users in this part.
        users: Vec<User>,
        /// True on the last part.
        complete: bool,
        /// On the last part of one page of a longer listing: the name to list after for the
        /// next page.
        next: Option<String>,
    },
    /// A typed reply about the message with this id.
    Reply {
        /// Id of the message the reply is about (0 when about the connection itself).
        id: u64,
        /// What happened.
        status: Status,
        /// The destination or name the reply is about.
        to: String,
        /// Detail for people.
        detail: String,
        /// The server closes the connection after this message.
        closing: bool,
    },
    /// Version 2: a delivery receipt: the messages with `ids`, sent by this client to `to`,
    /// were taken by `to`'s client.
    Delivered {
        /// The receiver.
        to: String,
        /// The ids of the messages, in the order they were sent.
        ids: Vec<u64>,
        /// When they were taken, in ms since the Unix epoch.
        time: u64,
        /// The receipt's own sequence number when it waited in this client's inbox (acknowledge
        /// it like a message's); 0 otherwise.
        seq: u64,
    },
    /// The server checks that the client is alive; answer with a pong of the same id.
    Ping {
        /// Probe id.
        id: u64,
    },
    /// Answer to a ping the client sent.
    Pong {
        /// Probe id.
        id: u64,
    },
}

impl ServerEvent {
    /// Interprets a message received from the server.
    ///
    /// # Errors
    /// A description of what makes the message invalid from a server (for example a
    /// registration flag, or a user listing that is not UTF-8).
    pub fn parse(msg: Message) -> Result<ServerEvent, String> {
        if msg.register {
            return Err("server message with the register flag".into());
        }
        if msg.exit && !matches!(msg.kind, Kind::Reply(_)) {
            return Err("server closing message without a reason".into());
        }
        Ok(match msg.kind {
            Kind::Chat => ServerEvent::Message {
                id: msg.id,
                from: msg.from,
                content: msg.content,
                seq: msg.seq,
                time: msg.time,
            },
            Kind::Greeting => {
                ServerEvent::Greeting { id: msg.id, greeting: Greeting::parse(&msg.content)? }
            }
            Kind::Users => {
                let text = std::str::from_utf8(&msg.content)
                    .map_err(|_| "user listing is not UTF-8".to_string())?;
                let complete = text.ends_with("\n\n") || text == "\n";
                let users = text
                    .lines()
                    .filter(|line| !line.is_empty())
                    .map(|line| {
                        let (name, addr) = line.split_once(' ').unwrap_or((line, ""));
                        User { name: name.to_string(), addr: addr.to_string() }
                    })
                    .collect();
                let next = (complete && !msg.to.is_empty()).then_some(msg.to);
                ServerEvent::Users { id: msg.id, users, complete, next }
            }
            Kind::Reply(status) => ServerEvent::Reply {
                id: msg.id,
                status,
                to: msg.to,
                detail: String::from_utf8_lossy(&msg.content).into_owned(),
                closing: msg.exit,
            },
            Kind::Ping => ServerEvent::Ping { id: msg.id },
            Kind::Pong => ServerEvent::Pong { id: msg.id },
            Kind::Delivered => {
                if !msg.content.len().is_multiple_of(8) {
                    return Err("a receipt's ids are not whole u64s".into());
                }
                let ids = msg
                    .content
                    .chunks_exact(8)
                    .map(|id| u64::from_le_bytes(id.try_into().unwrap_or_default()))
                    .collect();
                ServerEvent::Delivered { to: msg.to, ids, time: msg.time, seq: msg.seq }
            }
            Kind::ListUsers | Kind::Hello | Kind::Ack => {
                return Err("only clients send this kind".into());
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(name: &str, addr: &str) -> User {
        User { name: name.into(), addr: addr.into() }
    }

    #[test]
    fn user_lists_split_to_fit_frames_and_mark_the_last_part() {
        let names: Vec<String> = (0..100).map(|i| format!("user{i:03}")).collect();
        let parts = Message::user_list(
            4,
            names.iter().map(|n| (n.as_str(), "127.0.0.1:40000".to_string())),
            256,
            None,
        );
        assert!(parts.len() > 1);
        let mut all = Vec::new();
        for (i, part) in parts.iter().enumerate() {
            assert!(crate::encoded_len(part) <= 256);
            match ServerEvent::parse(part.clone()).unwrap() {
                ServerEvent::Users { id: 4, users, complete, next: None } => {
                    assert_eq!(complete, i == parts.len() - 1);
                    all.extend(users);
                }
                other => panic!("{other:?}"),
            }
        }
        let expected: Vec<User> = names.iter().map(|n| user(n, "127.0.0.1:40000")).collect();
        assert_eq!(all, expected);
    }

    #[test]
    fn empty_user_list_is_complete() {
        let part = Message::user_list(1, [], 1024, None).remove(0);
        assert_eq!(
            ServerEvent::parse(part).unwrap(),
            ServerEvent::Users { id: 1, users: vec![], complete: true, next: None }
        );
        let paged = Message::user_list(2, [("bo", "h:1".to_string())], 1024, Some("bo")).remove(0);
        assert_eq!(
            ServerEvent::parse(paged).unwrap(),
            ServerEvent::Users {
                id: 2,
                users: vec![user("bo", "h:1")],
                complete: true,
                next: Some("bo".into())
            }
        );
    }

    #[test]
    fn replies_and_closing() {
        let msg = Message::reply(3, Status::ShuttingDown, "", "bye").closing();
        assert_eq!(
            ServerEvent::parse(msg).unwrap(),
            ServerEvent::Reply {
                id: 3,
                status: Status::ShuttingDown,
                to: String::new(),
                detail: "bye".into(),
                closing: true
            }
        );
        assert!(ServerEvent::parse(Message::register(1, "x")).is_err());
        assert!(ServerEvent::parse(Message::ack(1)).is_err());
        assert_eq!(
            ServerEvent::parse(Message::delivered("bob", &[4, 5], 6)).unwrap(),
            ServerEvent::Delivered { to: "bob".into(), ids: vec![4, 5], time: 6, seq: 0 }
        );
        let mut ragged = Message::delivered("bob", &[4], 6);
        ragged.content = ragged.content.slice(..7);
        assert!(ServerEvent::parse(ragged).is_err());
        assert!(ServerEvent::parse(Message::list_users(1)).is_err());
        assert!(ServerEvent::parse(Message::ping(1).closing()).is_err());
    }
}
