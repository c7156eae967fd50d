//! The one struct that travels on the wire, and its constructors.
//!
//! [`Message`] keeps the flat shape of the Go seed's gob struct (`to`, `from`, `content` and the
//! `register`/`exit` flags) and adds only what the protocol needs: a version, a per-message id
//! that replies echo, and a [`Kind`] that tells chat traffic from control traffic and carries
//! the server's typed [`Status`] replies.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::limits::PROTOCOL_VERSION;

/// One protocol message. Field order is the encoding order; see `docs/PROTOCOL.md`.
///
/// Build messages with the constructors ([`Message::register`], [`Message::send`], ...) rather
/// than by hand, and read received ones through [`Request::parse`](crate::Request::parse) or
/// [`ServerEvent::parse`](crate::ServerEvent::parse), which validate flag combinations.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// Protocol version of the sender ([`PROTOCOL_VERSION`]). Checked on registration.
    pub version: u16,
    /// Chosen by the client for each message it sends; every reply about that message carries
    /// the same id. Server-initiated messages use the id of the message that caused them
    /// (a delivered chat message keeps its sender's id) or 0.
    pub id: u64,
    /// What this message is: chat traffic, a control message, or a typed reply.
    pub kind: Kind,
    /// Set by a client to claim the name in `from`.
    pub register: bool,
    /// Set by a client to go offline; set by the server on its last message before it closes
    /// the connection (with the reason in `kind`).
    pub exit: bool,
    /// Destination: a registered name or a client's `ip:port` as the server sees it.
    /// On a reply, the destination the reply is about.
    pub to: String,
    /// Sender's name. Set by the server on everything it forwards; ignored from clients except
    /// on registration, where it is the name being claimed.
    pub from: String,
    /// Message body: arbitrary bytes (the interactive client sends UTF-8). On a reply, a
    /// human-readable detail; on a user list, one `name address` line per user.
    pub content: Bytes,
    /// Version 2 only (absent from the version 1 layout): on a chat message delivered to a
    /// version 2 client, its per-recipient sequence number, which only grows for that
    /// recipient (see `docs/PROTOCOL.md`). 0 everywhere else.
    pub seq: u64,
    /// Version 2 only: on a delivered chat message, when the server received it from its
    /// sender, in milliseconds since the Unix epoch. 0 everywhere else.
    pub time: u64,
}

/// A [`Message`] with borrowed text and content: the same fields in the same order, so it
/// encodes to the same bytes. Senders use it to encode a message without building an owned
/// one (no allocation for `to` or `from`); see
/// [`MessageCodec::encode_ref`](crate::MessageCodec::encode_ref).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageRef<'a> {
    /// See [`Message::version`].
    pub version: u16,
    /// See [`Message::id`].
    pub id: u64,
    /// See [`Message::kind`].
    pub kind: Kind,
    /// See [`Message::register`].
    pub register: bool,
    /// See [`Message::exit`].
    pub exit: bool,
    /// See [`Message::to`].
    pub to: &'a str,
    /// See [`Message::from`].
    pub from: &'a str,
    /// See [`Message::content`].
    #[serde(borrow, with = "as_bytes")]
    pub content: &'a [u8],
    /// See [`Message::seq`].
    pub seq: u64,
    /// See [`Message::time`].
    pub time: u64,
}

/// Serde's default for `&[u8]` is a sequence of `u8`; `Bytes` is a byte string. bincode writes
/// both the same way, but byte strings in one call, so the borrowed view uses bytes too.
mod as_bytes {
    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(bytes: &&[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(bytes)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<&'de [u8], D::Error> {
        <&'de [u8]>::deserialize(d)
    }
}

impl<'a> MessageRef<'a> {
    /// A chat message to `to` (a name or `ip:port`), as [`Message::send`] builds it.
    pub fn send(id: u64, to: &'a str, content: &'a [u8]) -> MessageRef<'a> {
        MessageRef {
            version: PROTOCOL_VERSION,
            id,
            kind: Kind::Chat,
            register: false,
            exit: false,
            to,
            from: "",
            content,
            seq: 0,
            time: 0,
        }
    }

    /// A chat message from `from` delivered to its receiver, as [`Message::deliver`] builds
    /// it. The server stamps `from` this way without building an owned message.
    pub fn deliver(id: u64, from: &'a str, to: &'a str, content: &'a [u8]) -> MessageRef<'a> {
        MessageRef { from, ..MessageRef::send(id, to, content) }
    }

    /// An owned copy.
    pub fn to_message(&self) -> Message {
        Message {
            version: self.version,
            id: self.id,
            kind: self.kind,
            register: self.register,
            exit: self.exit,
            to: self.to.to_owned(),
            from: self.from.to_owned(),
            content: Bytes::copy_from_slice(self.content),
            seq: self.seq,
            time: self.time,
        }
    }
}

impl Message {
    /// The message as a borrowed view.
    pub fn as_ref(&self) -> MessageRef<'_> {
        MessageRef {
            version: self.version,
            id: self.id,
            kind: self.kind,
            register: self.register,
            exit: self.exit,
            to: &self.to,
            from: &self.from,
            content: &self.content,
            seq: self.seq,
            time: self.time,
        }
    }
}

/// What a [`Message`] is. The encoding is the variant's index, so new variants go at the end.
#[non_exhaustive]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Kind {
    /// A chat message; with `register` or `exit` set, a registration or an offline notice.
    Chat,
    /// Client asks for the users online now.
    ListUsers,
    /// Server's answer to [`Kind::ListUsers`]: `content` holds one `name address` line each.
    Users,
    /// Liveness probe; the peer answers with [`Kind::Pong`] carrying the same id.
    Ping,
    /// Answer to [`Kind::Ping`].
    Pong,
    /// A typed server reply about the message with the same id.
    Reply(Status),
    /// Version 2, client to server, as the first frame: "I speak version 2; greet me". The
    /// server answers with [`Kind::Greeting`].
    Hello,
    /// Version 2, server to client: the answer to [`Kind::Hello`]. `content` holds the
    /// [`Greeting`](crate::Greeting): versions, auth mode, limits, and the nonce a key signs.
    Greeting,
    /// Version 2, client to server: "I have handed every message numbered up to `seq` to my
    /// application". Cumulative; the server forgets those messages (moving nothing to the
    /// inbox for them) and sends their senders [`Kind::Delivered`] receipts.
    Ack,
    /// Version 2, server to client: a delivery receipt. The messages whose ids `content`
    /// holds (each a `u64`, little-endian, back to back), sent by this client to `to`, were
    /// taken by `to`'s client; `time` is when, in ms since the Unix epoch.
    Delivered,
}

/// The typed outcome in a server reply. Programs branch on this, never on the detail text.
/// The encoding is the variant's index (a `u32`), so new variants go at the end; an index this
/// version does not know reads as [`Status::Other`].
#[non_exhaustive]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Status {
    /// The name was registered; the session is open.
    Registered,
    /// Nobody with the name or address in `to` is online. The message was not delivered.
    NotFound,
    /// Another client holds the requested name. The connection closes.
    NameTaken,
    /// The name (or destination) is empty, too long, or has whitespace or control characters.
    InvalidName,
    /// The message was not valid here (bad flag combination, a second registration, a kind
    /// only the server sends, a message before registering).
    InvalidRequest,
    /// The client speaks a protocol version the server does not. The connection closes.
    UnsupportedVersion,
    /// The server is shutting down; the connection closes after this message.
    ShuttingDown,
    /// The message was not delivered because the receiver in `to` is not keeping up (its
    /// outbox is full). Nothing was queued; the sender may retry later.
    NotDelivered,
    /// The server is at its connection limit. The connection closes.
    ServerFull,
    /// A frame was longer than the limit. The connection closes without reading it.
    FrameTooLarge,
    /// A frame did not decode as a message. The connection closes.
    Malformed,
    /// The client did not register in time. The connection closes.
    RegistrationTimeout,
    /// The client stopped reading what the server sent it. The connection closes.
    SlowConsumer,
    /// The client sent nothing, not even a pong, for too long. The connection closes.
    IdleTimeout,
    /// The name (or a name with the same canonical form) is bound to a key, and the
    /// registration did not prove that key. The connection closes.
    NameOwned,
    /// The name looks like (has the same TR39 skeleton as) another name that is bound or
    /// online; `content` names it. The connection closes.
    NameConfusable,
    /// The registration's signature does not verify (wrong key, another nonce or another
    /// name), or a key was sent without a [`Kind::Hello`] first. The connection closes.
    AuthFailed,
    /// The server only accepts registrations with a key (`--auth required`). The connection
    /// closes.
    AuthRequired,
    /// The server cannot serve the request right now (its name table failed); try again
    /// later. The connection closes.
    Unavailable,
    /// A frame that had started did not finish within the server's frame timeout (a client
    /// trickling bytes). The connection closes.
    FrameTimeout,
    /// The request was refused because this connection sent too many of its kind lately
    /// (user listings); try again in a moment. The connection stays open.
    RateLimited,
    /// The receiver in `to` is offline (a name bound to a key): the message is stored on the
    /// server's disk, and delivered when the receiver logs in; a [`Kind::Delivered`] receipt
    /// follows then. Sent only once the message is durable.
    Stored,
    /// The message was not stored: the receiver's inbox (or the server's store) is at its
    /// limit; the detail says which. Nothing was stored; the sender may retry later.
    InboxFull,
    /// A stored message waited longer than the server keeps messages and was removed before
    /// its receiver logged in. The reply's id is the message's.
    Expired,
    /// The operator disconnected this client (the console's `kick`); `content` says why. The
    /// connection closes. A client should not reconnect by itself.
    Kicked,
    /// A status this version does not know, by its index (from a newer server). Treat it as
    /// a refusal of the message with the reply's id (closing, if the reply has `exit` set).
    /// Only ever made for an index past the known ones (see [`Status::from_index`]).
    Other(u32),
}

/// Every known [`Status`] at its index.
const STATUSES: [Status; 25] = [
    Status::Registered,
    Status::NotFound,
    Status::NameTaken,
    Status::InvalidName,
    Status::InvalidRequest,
    Status::UnsupportedVersion,
    Status::ShuttingDown,
    Status::NotDelivered,
    Status::ServerFull,
    Status::FrameTooLarge,
    Status::Malformed,
    Status::RegistrationTimeout,
    Status::SlowConsumer,
    Status::IdleTimeout,
    Status::NameOwned,
    Status::NameConfusable,
    Status::AuthFailed,
    Status::AuthRequired,
    Status::Unavailable,
    Status::FrameTimeout,
    Status::RateLimited,
    Status::Stored,
    Status::InboxFull,
    Status::Expired,
    Status::Kicked,
];

impl Status {
    /// The status's index on the wire.
    pub fn index(self) -> u32 {
        match self {
            Status::Other(index) => index,
            known => STATUSES.iter().position(|&s| s == known).map_or(u32::MAX, |i| i as u32),
        }
    }

    /// The status with this index on the wire: a known one, or [`Status::Other`].
    pub fn from_index(index: u32) -> Status {
        STATUSES.get(index as usize).copied().unwrap_or(Status::Other(index))
    }
}

/// A status is its index, a `u32`: the same bytes serde's derive gave the unit variants, plus
/// a way to carry an index this version does not know.
impl Serialize for Status {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u32(self.index())
    }
}

impl<'de> Deserialize<'de> for Status {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Status, D::Error> {
        u32::deserialize(d).map(Status::from_index)
    }
}

impl Status {
    /// A short, stable, human-readable name for logs and the interactive client.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Registered => "registered",
            Status::NotFound => "not found",
            Status::NameTaken => "name taken",
            Status::InvalidName => "invalid name",
            Status::InvalidRequest => "invalid request",
            Status::UnsupportedVersion => "unsupported protocol version",
            Status::ShuttingDown => "server shutting down",
            Status::NotDelivered => "not delivered: receiver is not keeping up",
            Status::ServerFull => "server full",
            Status::FrameTooLarge => "frame too large",
            Status::Malformed => "malformed message",
            Status::RegistrationTimeout => "registration timed out",
            Status::SlowConsumer => "slow consumer",
            Status::IdleTimeout => "idle timeout",
            Status::NameOwned => "name belongs to a key",
            Status::NameConfusable => "name looks like another",
            Status::AuthFailed => "authentication failed",
            Status::AuthRequired => "a key is required",
            Status::Unavailable => "server unavailable",
            Status::FrameTimeout => "frame not finished in time",
            Status::RateLimited => "too many requests; try again in a moment",
            Status::Stored => "stored for an offline receiver",
            Status::InboxFull => "not stored: inbox full",
            Status::Expired => "expired before it was delivered",
            Status::Kicked => "disconnected by the operator",
            Status::Other(_) => "unknown status",
        }
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Status::Other(index) => write!(f, "unknown status {index}"),
            known => f.write_str(known.as_str()),
        }
    }
}

impl Message {
    fn new(id: u64, kind: Kind) -> Message {
        Message {
            version: PROTOCOL_VERSION,
            id,
            kind,
            register: false,
            exit: false,
            to: String::new(),
            from: String::new(),
            content: Bytes::new(),
            seq: 0,
            time: 0,
        }
    }

    /// Client → server: claim `name` as a guest (no key).
    pub fn register(id: u64, name: impl Into<String>) -> Message {
        Message { register: true, from: name.into(), ..Message::new(id, Kind::Chat) }
    }

    /// Client → server: claim `name` proving a key: `credentials` are the public key and the
    /// signature over the greeting's nonce (see [`Identity::credentials`](crate::Identity)).
    pub fn register_with_key(id: u64, name: impl Into<String>, credentials: [u8; 96]) -> Message {
        Message { content: Bytes::copy_from_slice(&credentials), ..Message::register(id, name) }
    }

    /// Client → server: the first frame of a version 2 client, asking for the greeting.
    pub fn hello(id: u64) -> Message {
        Message::new(id, Kind::Hello)
    }

    /// Server → client: the answer to [`Message::hello`].
    pub fn greeting(id: u64, greeting: &crate::Greeting) -> Message {
        Message { content: Bytes::from(greeting.to_content()), ..Message::new(id, Kind::Greeting) }
    }

    /// The same message in another protocol version's layout.
    pub fn with_version(mut self, version: u16) -> Message {
        self.version = version;
        self
    }

    /// Client → server: send `content` to the user or address `to`.
    pub fn send(id: u64, to: impl Into<String>, content: impl Into<Bytes>) -> Message {
        Message { to: to.into(), content: content.into(), ..Message::new(id, Kind::Chat) }
    }

    /// Client → server: go offline; the server frees the name and closes the connection.
    pub fn offline(id: u64) -> Message {
        Message { exit: true, ..Message::new(id, Kind::Chat) }
    }

    /// Client → server: ask for the users online.
    pub fn list_users(id: u64) -> Message {
        Message::new(id, Kind::ListUsers)
    }

    /// Client → server: ask for the next page of users online, those listed after `after`
    /// (the name a paged listing gave as its next).
    pub fn list_users_after(id: u64, after: impl Into<String>) -> Message {
        Message { to: after.into(), ..Message::new(id, Kind::ListUsers) }
    }

    /// Either direction: a liveness probe.
    pub fn ping(id: u64) -> Message {
        Message::new(id, Kind::Ping)
    }

    /// Either direction: the answer to [`Message::ping`] with the same id.
    pub fn pong(id: u64) -> Message {
        Message::new(id, Kind::Pong)
    }

    /// Server → client: a chat message from `from`, keeping the sender's id.
    pub fn deliver(
        id: u64,
        from: impl Into<String>,
        to: impl Into<String>,
        content: impl Into<Bytes>,
    ) -> Message {
        Message {
            from: from.into(),
            to: to.into(),
            content: content.into(),
            ..Message::new(id, Kind::Chat)
        }
    }

    /// Server → client: a typed reply about message `id`. `to` names what the reply is about
    /// (the destination for [`Status::NotFound`], the name for [`Status::Registered`]).
    pub fn reply(
        id: u64,
        status: Status,
        to: impl Into<String>,
        detail: impl Into<String>,
    ) -> Message {
        Message {
            to: to.into(),
            content: Bytes::from(detail.into()),
            ..Message::new(id, Kind::Reply(status))
        }
    }

    /// Server → client: the users online, as `(name, address)` pairs, split into as many
    /// [`Kind::Users`] messages as needed to keep each within `max_frame_len`.
    ///
    /// Each message holds one `name address` line per user; the last one ends with an empty
    /// line, so a reader knows the listing is complete. If the listing is one page of a
    /// longer one, `next` is the name to ask to list after for the next page: the last
    /// message carries it in `to`.
    pub fn user_list<'a>(
        id: u64,
        users: impl IntoIterator<Item = (&'a str, String)>,
        max_frame_len: usize,
        next: Option<&str>,
    ) -> Vec<Message> {
        // Room for the fixed fields and the final blank line, with margin.
        let budget = max_frame_len.saturating_sub(64).max(1);
        let mut chunks = Vec::new();
        let mut content = String::new();
        for (name, addr) in users {
            let line_len = name.len() + 1 + addr.len() + 1;
            if !content.is_empty() && content.len() + line_len > budget {
                chunks.push(std::mem::take(&mut content));
            }
            content.push_str(name);
            content.push(' ');
            content.push_str(&addr);
            content.push('\n');
        }
        content.push('\n');
        chunks.push(content);
        let mut parts: Vec<Message> = chunks
            .into_iter()
            .map(|content| Message {
                content: Bytes::from(content),
                ..Message::new(id, Kind::Users)
            })
            .collect();
        if let (Some(next), Some(last)) = (next, parts.last_mut()) {
            last.to = next.to_string();
        }
        parts
    }

    /// Client → server: every message numbered up to `seq` was handed to the application.
    pub fn ack(seq: u64) -> Message {
        Message { seq, ..Message::new(0, Kind::Ack) }
    }

    /// Server → client: the messages with `ids`, sent to `to`, were taken by its client at
    /// `time` (ms since the Unix epoch).
    pub fn delivered(to: impl Into<String>, ids: &[u64], time: u64) -> Message {
        let mut content = Vec::with_capacity(ids.len() * 8);
        for id in ids {
            content.extend_from_slice(&id.to_le_bytes());
        }
        Message {
            to: to.into(),
            content: Bytes::from(content),
            time,
            ..Message::new(0, Kind::Delivered)
        }
    }

    /// Marks a server message as the last one before the server closes the connection.
    pub fn closing(mut self) -> Message {
        self.exit = true;
        self
    }
}
