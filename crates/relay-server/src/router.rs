//! The routing seam: the only place that decides where a message goes and who owns a name.
//!
//! Connection handling talks to [`Router`] alone: it claims a name, routes messages, lists
//! users. Today every route is local (the in-memory [`Registry`]); a cluster mode adds remote
//! routes and broker-backed name claims here without touching connection code.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use relay_proto::{Destination, Kind, Message, Status, encoded_len, parse_destination};

use crate::outbox::{Outbox, PushError, wire_size};
use crate::registry::{NameTaken, Registry};

/// Why a message was not delivered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Undelivered {
    /// Nobody by that name or address is online.
    NotFound,
    /// The receiver's outbox stayed full for the send wait (or it is stalled): it is not
    /// keeping up. Nothing was queued.
    ReceiverFull,
    /// The message would be over the frame limit once the sender's name is stamped on it.
    TooLarge,
}

/// What became of a routed message.
#[derive(Debug)]
pub(crate) enum Routed {
    /// Queued for the receiver.
    Queued,
    /// The receiver's outbox is full; wait for room with [`Pending::wait`].
    Full(Pending),
}

/// A message waiting for room in a full receiver's outbox.
#[derive(Debug)]
pub(crate) struct Pending {
    outbox: Outbox,
    msg: Message,
    size: usize,
    wait: Duration,
}

impl Pending {
    /// Waits up to the send wait for room, then queues the message or gives up.
    pub(crate) async fn wait(self) -> Result<(), (Undelivered, String)> {
        match self.outbox.wait_for_room(self.msg, self.size, self.wait).await {
            Ok(()) => Ok(()),
            Err((PushError::Full, msg)) => Err((Undelivered::ReceiverFull, msg.to)),
            Err((PushError::Closed, msg)) => Err((Undelivered::NotFound, msg.to)),
        }
    }
}

/// Routes messages between registered clients.
#[derive(Debug)]
pub(crate) struct Router {
    registry: Registry,
    max_frame_len: usize,
    /// How long a message waits for room in a full receiver's outbox.
    send_wait: Duration,
}

/// A registered name, held by its connection. Dropping it frees the name, so every way a
/// connection can end (offline, error, disconnect, shutdown) unregisters it.
#[derive(Debug)]
pub(crate) struct Claim {
    router: Arc<Router>,
    name: Arc<str>,
    token: u64,
}

impl Claim {
    /// The registered name.
    pub(crate) fn name(&self) -> &Arc<str> {
        &self.name
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        self.router.registry.remove(&self.name, self.token);
    }
}

impl Router {
    pub(crate) fn new(max_frame_len: usize, send_wait: Duration) -> Router {
        Router { registry: Registry::default(), max_frame_len, send_wait }
    }

    /// Claims `name` for the connection at `addr`, whose outbox receives its messages.
    pub(crate) fn claim(
        self: &Arc<Self>,
        name: &str,
        addr: SocketAddr,
        outbox: Outbox,
    ) -> Result<Claim, NameTaken> {
        let (name, token) = self.registry.insert(name, addr, outbox)?;
        Ok(Claim { router: self.clone(), name, token })
    }

    /// Routes a message from the client registered as `from` to `to` (a name or an
    /// `ip:port`), stamping `from` on it. Never waits: if the receiver's outbox is full, the
    /// message comes back as [`Routed::Full`], for the caller to wait on (see
    /// [`Pending::wait`]). Waiting is the backpressure that slows a sender to its receiver's
    /// pace (the sender's connection reads nothing meanwhile, so TCP pushes back on it).
    ///
    /// On failure, gives back the destination so the reply can name it.
    pub(crate) fn route(
        &self,
        from: &str,
        id: u64,
        to: String,
        content: Bytes,
    ) -> Result<Routed, (Undelivered, String)> {
        let msg = Message::deliver(id, from, to, content);
        let len = encoded_len(&msg);
        if len > self.max_frame_len {
            return Err((Undelivered::TooLarge, msg.to));
        }
        // Clone the receiver's outbox handle and push after the read lock is released, so
        // the registry lock is held only for the lookup.
        let outbox = match parse_destination(&msg.to) {
            Ok(Destination::Name(name)) => self.registry.with_name(name, |e| e.outbox.clone()),
            Ok(Destination::Addr(addr)) => self.registry.with_addr(addr, |_, e| e.outbox.clone()),
            Err(_) => None,
        };
        let Some(outbox) = outbox else {
            return Err((Undelivered::NotFound, msg.to));
        };
        let size = wire_size(len);
        match outbox.try_push(msg, size) {
            Ok(None) => Ok(Routed::Queued),
            Ok(Some(msg)) if self.send_wait.is_zero() => Err((Undelivered::ReceiverFull, msg.to)),
            Ok(Some(msg)) => Ok(Routed::Full(Pending { outbox, msg, size, wait: self.send_wait })),
            Err((PushError::Full, msg)) => Err((Undelivered::ReceiverFull, msg.to)),
            // The receiver is closing: as far as the sender is concerned it is gone.
            Err((PushError::Closed, msg)) => Err((Undelivered::NotFound, msg.to)),
        }
    }

    /// Tells the senders of `undelivered` messages (chat messages that were queued for a
    /// receiver whose connection then failed) that they were not delivered.
    pub(crate) fn report_undelivered(&self, undelivered: Vec<Message>) {
        for msg in undelivered {
            if msg.kind != Kind::Chat || msg.from.is_empty() {
                continue; // Replies and pings for the failed connection itself.
            }
            let detail = format!("{} disconnected before the message reached it", msg.to);
            let reply = Message::reply(msg.id, Status::NotDelivered, msg.to, detail);
            // If the sender is gone too, or not reading either, there is no one left to tell.
            let _ = self.registry.with_name(&msg.from, |e| e.outbox.push(reply));
        }
    }

    /// Everyone online as `(name, address)`, sorted by name.
    pub(crate) fn users(&self) -> Vec<(Arc<str>, SocketAddr)> {
        self.registry.list()
    }

    /// How many names are registered.
    pub(crate) fn online(&self) -> usize {
        self.registry.len()
    }
}
