//! The routing seam: the only place that decides where a message goes and who owns a name.
//!
//! Connection handling talks to [`Router`] alone: it claims a name, routes messages, lists
//! users. Today every route is local (the in-memory [`Registry`]); a cluster mode adds remote
//! routes and broker-backed name claims here without touching connection code.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use relay_proto::{
    Destination, Kind, Message, MessageRef, Status, encoded_len_ref, parse_destination,
};

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

/// A message waiting for room in a full receiver's outbox. It owns a copy of the message: the
/// frame it came in is not kept while the sender waits.
#[derive(Debug)]
pub(crate) struct Pending {
    outbox: Outbox,
    msg: Message,
    wait: Duration,
}

impl Pending {
    /// Waits up to the send wait for room, then queues the message or gives up.
    pub(crate) async fn wait(self) -> Result<(), (Undelivered, String)> {
        match self.outbox.wait_for_room(&self.msg.as_ref(), self.wait).await {
            Ok(()) => Ok(()),
            Err(PushError::Full | PushError::Stalled) => {
                Err((Undelivered::ReceiverFull, self.msg.to))
            }
            Err(PushError::Closed) => Err((Undelivered::NotFound, self.msg.to)),
        }
    }
}

/// One connection's last destination and the outbox it led to. A sender mostly writes to the
/// same receiver many times in a row; remembering where the last message went skips the
/// registry lookup (a hash and a shard lock) for the next one. The entry is dropped as soon as
/// that outbox turns out to be closed, so a name freed and claimed again is looked up afresh.
#[derive(Debug, Default)]
pub(crate) struct RouteCache {
    to: String,
    outbox: Option<Outbox>,
}

impl RouteCache {
    /// The outbox for `to`: the remembered one if it is still open, otherwise whatever
    /// `lookup` finds (remembered for next time).
    fn resolve(
        &mut self,
        to: &str,
        lookup: impl FnOnce(&str) -> Option<Outbox>,
    ) -> Option<&Outbox> {
        let hit = self.outbox.as_ref().is_some_and(|outbox| self.to == to && !outbox.is_closed());
        if !hit {
            self.outbox = None;
            let found = lookup(to)?;
            // Reuses the string's buffer: no allocation while destinations stay short.
            self.to.clear();
            self.to.push_str(to);
            self.outbox = Some(found);
        }
        self.outbox.as_ref()
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
    /// `ip:port`), stamping `from` on it; `routes` is the sender's [`RouteCache`]. Never
    /// waits: if the receiver's outbox is full, the message comes back as [`Routed::Full`],
    /// for the caller to wait on (see [`Pending::wait`]). Waiting is the backpressure that
    /// slows a sender to its receiver's pace (the sender's connection reads nothing
    /// meanwhile, so TCP pushes back on it).
    ///
    /// On failure, gives back the destination so the reply can name it.
    pub(crate) fn route(
        &self,
        from: &str,
        id: u64,
        to: &str,
        content: &[u8],
        routes: &mut RouteCache,
    ) -> Result<Routed, (Undelivered, String)> {
        let msg = MessageRef::deliver(id, from, to, content);
        let len = encoded_len_ref(&msg);
        if len > self.max_frame_len {
            return Err((Undelivered::TooLarge, to.to_owned()));
        }
        let Some(outbox) = routes.resolve(to, |to| self.lookup(to)) else {
            return Err((Undelivered::NotFound, to.to_owned()));
        };
        match outbox.push_sized(&msg, wire_size(len)) {
            Ok(()) => Ok(Routed::Queued),
            Err(PushError::Full) if !self.send_wait.is_zero() => Ok(Routed::Full(Pending {
                outbox: outbox.clone(),
                msg: msg.to_message(),
                wait: self.send_wait,
            })),
            Err(PushError::Full | PushError::Stalled) => {
                Err((Undelivered::ReceiverFull, to.to_owned()))
            }
            // The receiver is closing: as far as the sender is concerned it is gone.
            Err(PushError::Closed) => Err((Undelivered::NotFound, to.to_owned())),
        }
    }

    /// The outbox of whoever is registered under the name or address `to`.
    fn lookup(&self, to: &str) -> Option<Outbox> {
        // The handle is cloned so the shard lock is held only for the lookup, not the push.
        match parse_destination(to) {
            Ok(Destination::Name(name)) => self.registry.with_name(name, |e| e.outbox.clone()),
            Ok(Destination::Addr(addr)) => self.registry.with_addr(addr, |_, e| e.outbox.clone()),
            Err(_) => None,
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
            let _ = self.registry.with_name(&msg.from, |e| e.outbox.push(&reply.as_ref()));
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
