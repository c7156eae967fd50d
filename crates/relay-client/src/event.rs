//! What the connection reports to the program: [`Event`].

use std::sync::Arc;

use bytes::Bytes;
use relay_proto::{Status, User};

/// Something that happened on the connection, in the order it happened. New kinds of event
/// may be added: match with a `_` arm.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Event {
    /// A message from another user.
    Message {
        /// The sender's id for the message.
        id: u64,
        /// The sender's name, as registered (the server stamps it; it cannot be forged).
        /// Shared between consecutive messages from the same sender.
        from: Arc<str>,
        /// The message body.
        content: Bytes,
        /// Its sequence number for this recipient: only grows, across reconnects and server
        /// restarts for a name bound to a key (within one session for a guest).
        seq: u64,
        /// When the server received it from its sender, in ms since the Unix epoch.
        time: u64,
    },
    /// The message with this id is stored on the server (on disk) for `to`, who is offline;
    /// it is delivered when they log in, and [`Event::Delivered`] follows then.
    Stored {
        /// Id returned by [`Client::send`](crate::Client::send).
        id: u64,
        /// The receiver.
        to: String,
    },
    /// A receipt: `to`'s client took the messages with these ids (sent by this name, in
    /// this session or an earlier one). Messages to names bound to a key get receipts.
    Delivered {
        /// The receiver.
        to: String,
        /// Ids returned by [`Client::send`](crate::Client::send), in the order sent.
        ids: Vec<u64>,
        /// When the receiver's client took them, in ms since the Unix epoch.
        time: u64,
        /// The receipt's sequence number if it waited in this name's inbox (0 otherwise).
        seq: u64,
    },
    /// The message with this id was not delivered: nobody by that name or address is online.
    NotFound {
        /// Id returned by [`Client::send`](crate::Client::send).
        id: u64,
        /// The destination as sent.
        to: String,
    },
    /// The server refused the message with this id for another reason, such as
    /// [`Status::NotDelivered`] (the receiver is not keeping up), [`Status::InboxFull`] (an
    /// offline receiver's inbox is full), [`Status::Expired`] (a stored message grew too old
    /// before its receiver logged in) or [`Status::InvalidName`].
    Rejected {
        /// Id of the refused message.
        id: u64,
        /// Why.
        status: Status,
        /// The destination the refusal is about.
        to: String,
        /// The server's explanation.
        detail: String,
    },
    /// The users online, answering [`Client::list_users`](crate::Client::list_users): one page
    /// of them, sorted by name.
    Users {
        /// Id returned by `list_users`.
        id: u64,
        /// The users on this page.
        users: Vec<User>,
        /// More users follow (the server pages long listings): ask for them with
        /// [`Client::list_users_after`](crate::Client::list_users_after) and this name.
        next: Option<String>,
    },
    /// The server is shutting down. No more events follow.
    ServerShutdown {
        /// The server's explanation.
        detail: String,
    },
    /// The server ended this session for a reason (for example the client stopped reading
    /// and became a slow consumer). No more events follow.
    Closed {
        /// Why.
        status: Status,
        /// The server's explanation.
        detail: String,
    },
    /// The connection was lost without a reason from the server. No more events follow.
    Disconnected {
        /// What went wrong.
        reason: String,
    },
}

impl Event {
    /// The event's sequence number for this recipient (a message, or a stored receipt); 0
    /// for everything else.
    pub fn seq(&self) -> u64 {
        match self {
            Event::Message { seq, .. } | Event::Delivered { seq, .. } => *seq,
            _ => 0,
        }
    }
}
