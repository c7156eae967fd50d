//! The inbox seam: messages kept on disk for a name bound to a key while its owner is offline
//! (or has not acknowledged them), and the receipts owed to their senders.
//!
//! The server talks to it only through [`InboxStore`]; the embedded implementation is
//! [`RedbStore`](crate::redb_store::RedbStore). The calls are shaped so that a NATS JetStream
//! implementation fits them too: an inbox is a subject per recipient in one stream, an append
//! is a publish acknowledged once stored, a read is a fetch from a durable consumer, `remove` is
//! an acknowledgement of everything up to a sequence number.
//!
//! # Sequence numbers
//!
//! Every message (and stored receipt) a keyed recipient gets has a sequence number unique to
//! that recipient, `epoch << 40 | n`, and a recipient gets them in increasing order, across
//! reconnects and restarts, which is what lets its client drop redelivered duplicates by
//! number. The store hands out epochs from the name's record:
//!
//! - a message stored for a recipient who is not taking live traffic is numbered from the
//!   name's *offline epoch*, taken fresh (the record's epoch plus one) the first time one is
//!   needed after the recipient last went live;
//! - when a recipient has drained its inbox and goes live, [`InboxStore::read`] with `live`
//!   reserves a new epoch for its live session (and ends the offline epoch), so everything
//!   delivered live is numbered after everything stored before;
//! - a message that was delivered live but not acknowledged when the session ended is stored
//!   with the number it was delivered with.
//!
//! Appends are applied in the order they are made, so an inbox read in sequence order is the
//! order each sender sent in.

use std::fmt;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::future::BoxFuture;

use crate::names::StoreError;

/// Who sent a stored message, so its receipt (or a notice that it expired) can find them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SenderRef {
    /// The sender's canonical name.
    pub canonical: String,
    /// The sender's registration (a guest is told only while that registration lasts).
    pub token: u64,
    /// The sender's name is bound to a key: receipts wait in its inbox if it is offline.
    pub keyed: bool,
    /// The sender wants a [`Delivered`](relay_proto::Kind::Delivered) receipt (a version 2
    /// client). A stored receipt itself wants none.
    pub receipt: bool,
}

/// A message to store.
#[derive(Clone, Debug)]
pub struct Envelope {
    /// The recipient's canonical name.
    pub recipient: String,
    /// The frame body to deliver (version 2 layout; its `seq` is set by the store).
    pub body: Bytes,
    /// The sequence number it was delivered with, for a message moved from a session that
    /// ended before its client acknowledged it; `None` to number it from the offline epoch.
    pub seq: Option<u64>,
    /// The sender's id for the message.
    pub id: u64,
    /// When the server received it, in ms since the Unix epoch (what age limits count from).
    pub time: u64,
    /// Who sent it (shared: a sender's messages all carry the same).
    pub sender: Arc<SenderRef>,
}

/// Why a message was not stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Full {
    /// The recipient's inbox holds its limit of messages.
    Messages(u64),
    /// The recipient's inbox holds its limit of bytes.
    Bytes(u64),
    /// The server's store holds its limit of bytes.
    Store(u64),
}

impl fmt::Display for Full {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Full::Messages(n) => write!(f, "the inbox holds its limit of {n} messages"),
            Full::Bytes(n) => write!(f, "the inbox holds its limit of {n} bytes"),
            Full::Store(n) => write!(f, "the server's store holds its limit of {n} bytes"),
        }
    }
}

/// What became of an [`Envelope`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Appended {
    /// On disk (synced) with this sequence number.
    Stored(u64),
    /// No key holds the recipient's name: nothing is stored for it.
    NotBound,
    /// Over a limit; nothing was stored.
    Full(Full),
}

/// Called with the fate of an append, once it is durable (or failed). Runs on the store's
/// thread: it must not block.
pub type AppendDone = Box<dyn FnOnce(Result<Appended, StoreError>) + Send>;

/// One stored message, as read back.
#[derive(Clone, Debug)]
pub struct Stored {
    /// Its sequence number (also set in `body`).
    pub seq: u64,
    /// The frame body to deliver.
    pub body: Bytes,
    /// The sender's id for it.
    pub id: u64,
    /// Who sent it (consecutive messages from one sender share it).
    pub sender: Arc<SenderRef>,
}

/// A page of an inbox.
#[derive(Clone, Debug, Default)]
pub struct Page {
    /// Messages after the asked-for sequence number, in order.
    pub items: Vec<Stored>,
    /// More follow.
    pub more: bool,
    /// Asked for with `live` and nothing more follows: the epoch reserved for the live
    /// session's numbers.
    pub live_epoch: Option<u64>,
}

/// A stored message that was removed because it grew too old.
#[derive(Clone, Debug)]
pub struct ExpiredMessage {
    /// Its recipient's canonical name.
    pub recipient: String,
    /// The sender's id for it.
    pub id: u64,
    /// Who sent it.
    pub sender: SenderRef,
}

/// What the inboxes hold.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Totals {
    /// Recipients with at least one message waiting.
    pub recipients: u64,
    /// Messages waiting.
    pub messages: u64,
    /// Their bytes.
    pub bytes: u64,
}

/// Limits on what is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InboxLimits {
    /// Most messages one inbox holds.
    pub messages: u64,
    /// Most bytes one inbox holds.
    pub bytes: u64,
    /// Most bytes all inboxes hold together.
    pub store_bytes: u64,
    /// Oldest a message may get, in ms; older ones are removed.
    pub max_age_ms: u64,
}

impl Default for InboxLimits {
    fn default() -> InboxLimits {
        InboxLimits {
            messages: 10_000,
            bytes: 64 << 20,
            store_bytes: 1 << 30,
            max_age_ms: 7 * 24 * 3600 * 1000,
        }
    }
}

/// The inboxes. An append answers through a callback (no task or future per message on the
/// hot path of a sender storing many); the rest are futures.
pub trait InboxStore: Send + Sync + fmt::Debug + 'static {
    /// Stores a message; `done` learns its fate once it is durable.
    fn append(&self, envelope: Envelope, done: AppendDone);

    /// Messages for `recipient` numbered after `after`, about `max_bytes` of them (at least
    /// one). With `live`, if nothing follows this page, reserves the live session's epoch.
    fn read(
        &self,
        recipient: String,
        after: u64,
        max_bytes: usize,
        live: bool,
    ) -> BoxFuture<'static, Result<Page, StoreError>>;

    /// Forgets `recipient`'s messages numbered up to `upto` (its client acknowledged them).
    /// Not awaited: if it is lost in a crash, they are delivered again, and the client drops
    /// them by number.
    fn remove(&self, recipient: String, upto: u64);

    /// Empties `recipient`'s inbox (the operator's `purge`); returns how many were removed.
    fn purge(&self, recipient: String) -> BoxFuture<'static, Result<u64, StoreError>>;

    /// What the inboxes hold.
    fn totals(&self) -> BoxFuture<'static, Result<Totals, StoreError>>;

    /// Removes messages older than the age limit and returns them, so their senders can be
    /// told.
    fn expire(&self, now: u64) -> BoxFuture<'static, Result<Vec<ExpiredMessage>, StoreError>>;
}
