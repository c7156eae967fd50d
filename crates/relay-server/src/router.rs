//! The routing seam: the only place that decides where a message goes and who owns a name.
//!
//! Connection handling talks to [`Routing`] alone: it claims a name, routes messages, lists
//! users. [`LocalRouter`] is the one-node implementation (the in-memory [`Registry`] over a
//! [`NameStore`]); a cluster mode is a second implementation of the same trait, with remote
//! routes and broker-backed claims, and no change to connection code.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use relay_proto::{
    AuthMode, Destination, Message, MessageRef, NameKey, PublicKey, Status, canonical_name,
    encoded_len_ref, parse_destination,
};

use crate::names::{Claimed, GuestCheck, KeyClaim, NameRecord, NameStore, StoreError};
use crate::outbox::{Outbox, PushError, Unwritten};
use crate::registry::{Conflict, Entry, Registry};

/// Why a message was not delivered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Undelivered {
    /// Nobody by that name or address is online. (The durable-delivery step stores a message
    /// for a bound name here; today the sender is told `NotFound`.)
    NotOnline,
    /// The receiver's outbox stayed full for the send wait (or it is stalled): it is not
    /// keeping up. Nothing was queued.
    ReceiverFull,
    /// The message would be over the frame limit once the sender's name is stamped on it.
    TooLarge,
}

/// What became of a routed message.
pub(crate) enum Routed {
    /// Queued for the receiver.
    Queued,
    /// The receiver cannot take it now; await this (it waits a bounded time for room) to
    /// learn its fate.
    Full(Pending),
}

/// A message waiting for a busy receiver. It owns a copy of the message: the frame it came in
/// is not kept while the sender waits.
pub(crate) type Pending = BoxFuture<'static, Result<(), (Undelivered, String)>>;

/// Why a name could not be claimed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Refused {
    /// Someone online holds the name.
    Taken,
    /// The name is bound to another key (or to a key, for a guest); its display form.
    Owned(String),
    /// A name that looks like it is bound or online; its display form.
    LooksLike(String),
    /// The server only takes keyed registrations.
    AuthRequired,
    /// The name table failed.
    Unavailable(String),
}

/// A request to claim a name for a connection.
#[derive(Debug)]
pub(crate) struct ClaimRequest<'a> {
    /// The name as sent.
    pub(crate) name: &'a str,
    /// Its canonical form and skeleton.
    pub(crate) key: NameKey,
    /// The key the client proved, if any (a guest has none).
    pub(crate) proof: Option<PublicKey>,
    pub(crate) addr: SocketAddr,
    pub(crate) outbox: Outbox,
    /// The client's protocol version: its outbox encodes in that layout.
    pub(crate) version: u16,
}

/// Bits of a sequence number below the session's epoch: 2^40 messages per session.
const SEQ_EPOCH_SHIFT: u32 = 40;

/// Epochs that fit above the session's count: 2^24 logins of one name.
const MAX_EPOCH: u64 = (1 << (64 - SEQ_EPOCH_SHIFT)) - 1;

/// The first sequence number of a session in `epoch`.
pub(crate) fn first_seq(epoch: u64) -> u64 {
    if epoch > MAX_EPOCH {
        // 16.7 million logins of one name: its numbers stop growing across sessions (still
        // in order within each). Documented as a limit.
        tracing::error!(epoch, "a name's login count is past 2^24; sequence numbers repeat");
    }
    (epoch.min(MAX_EPOCH) << SEQ_EPOCH_SHIFT) | 1
}

/// The routing seam: who holds which name, and where a message goes. Connection handling
/// talks to this alone. Claims and releases are async and can fail (a store or a broker can
/// say no); routing a message is synchronous and never waits (the fast path), handing back a
/// [`Pending`] future when the receiver is busy.
pub(crate) trait Routing: Send + Sync + std::fmt::Debug + 'static {
    /// Claims a name for a connection.
    fn claim<'a>(
        self: Arc<Self>,
        request: ClaimRequest<'a>,
    ) -> BoxFuture<'a, Result<Claim, Refused>>;

    /// Releases a claim: the name goes offline. Explicit, because a store or broker release
    /// can await; [`Claim`]'s `Drop` is the last-resort net for the in-memory part.
    fn release(&self, claim: Claim) -> BoxFuture<'_, ()>;

    /// Forgets a claim in memory at once (the `Drop` net).
    fn forget(&self, canonical: &str, token: u64);

    /// Opens a claimed name to routing. A connection claims, queues its client's welcome,
    /// then opens, so nothing routed to the name overtakes the welcome. False if the claim
    /// was lost meanwhile (a key holder displaced the guest).
    fn open(&self, claim: &Claim) -> bool;

    /// Routes a message from the holder of `from` to `to` (a name or an `ip:port`), stamping
    /// its name and `time` on it; `routes` is the sender's [`RouteCache`]. Never waits. On
    /// failure, gives back the destination so the reply can name it.
    fn route(
        &self,
        from: &Claim,
        id: u64,
        to: &str,
        content: &[u8],
        time: u64,
        routes: &mut RouteCache,
    ) -> Result<Routed, (Undelivered, String)>;

    /// Tells the senders of `undelivered` messages (chat messages that were queued for a
    /// receiver whose connection then failed) that they were not delivered.
    fn report_undelivered(&self, undelivered: Vec<Unwritten>);

    /// Everyone online as `(name, address)`, sorted by name.
    fn users(&self) -> Vec<(Arc<str>, SocketAddr)>;

    /// How many names are online.
    fn online(&self) -> usize;

    /// Unbinds a name from its key (the operator's `release`), disconnecting its holder if
    /// online; returns what was bound.
    fn unbind<'a>(&'a self, name: &'a str)
    -> BoxFuture<'a, Result<Option<NameRecord>, StoreError>>;

    /// The server has stopped: finish pending store writes and let go of the store.
    fn close(&self) -> BoxFuture<'_, ()>;
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

/// The local router: the in-memory [`Registry`] of who is online, and the name table.
#[derive(Debug)]
pub(crate) struct LocalRouter {
    registry: Registry,
    /// `None` with `--auth none`: nothing is stored and every name is a guest name.
    store: Option<Arc<dyn NameStore>>,
    auth: AuthMode,
    max_frame_len: usize,
    /// How long a message waits for room in a full receiver's outbox.
    send_wait: Duration,
}

/// A guest's sessions have no stored epoch: its sequence numbers are ordered within a session.
const GUEST_EPOCH: u64 = 0;

/// A claimed name, held by its connection. Release it with [`Routing::release`]; dropping it
/// unclaimed frees the name in memory, so every way a connection can end unregisters it.
#[derive(Debug)]
pub(crate) struct Claim {
    router: Arc<dyn Routing>,
    /// The name as shown.
    display: Arc<str>,
    canonical: Arc<str>,
    token: u64,
    /// The key that holds the name; `None` for a guest.
    key: Option<PublicKey>,
    /// The name was bound to the key by this claim.
    first: bool,
    released: bool,
}

impl Claim {
    /// The name as shown.
    pub(crate) fn name(&self) -> &Arc<str> {
        &self.display
    }

    /// The key holding the name, for a keyed claim.
    pub(crate) fn key(&self) -> Option<PublicKey> {
        self.key
    }

    /// Whether this claim bound the name for the first time.
    pub(crate) fn first(&self) -> bool {
        self.first
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        if !self.released {
            self.router.forget(&self.canonical, self.token);
        }
    }
}

/// Now, in milliseconds since the Unix epoch.
pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl LocalRouter {
    pub(crate) fn new(
        store: Option<Arc<dyn NameStore>>,
        auth: AuthMode,
        max_frame_len: usize,
        send_wait: Duration,
    ) -> LocalRouter {
        LocalRouter { registry: Registry::default(), store, auth, max_frame_len, send_wait }
    }

    /// The outbox of whoever is registered under the name or address `to`.
    fn lookup(&self, to: &str) -> Option<Outbox> {
        // The handle is cloned so the shard lock is held only for the lookup, not the push.
        match parse_destination(to) {
            Ok(Destination::Name(name)) => {
                self.registry.with_name(&canonical_name(name), |e| e.outbox.clone())
            }
            Ok(Destination::Addr(addr)) => self.registry.with_addr(addr, |e| e.outbox.clone()),
            Err(_) => None,
        }
    }

    /// Registers the connection online and opens its session; the claim's epoch gives its
    /// sequence numbers.
    fn go_online(
        self: &Arc<Self>,
        request: &ClaimRequest<'_>,
        display: &str,
        key: Option<PublicKey>,
        epoch: u64,
    ) -> Result<Claim, Refused> {
        request.outbox.set_session(request.version, first_seq(epoch));
        // A key holder is online under the name as bound (`alice`, though it logged in as
        // `ALICE`), and so is its look-alike key.
        let bound_key;
        let name_key = match relay_proto::name_key(display) {
            Ok(key) if display != request.name => {
                bound_key = key;
                &bound_key
            }
            _ => &request.key,
        };
        let entry = Entry {
            key: name_key,
            display,
            addr: request.addr,
            outbox: request.outbox.clone(),
            guest: key.is_none(),
        };
        let (display, token) = self.registry.insert(entry).map_err(|conflict| match conflict {
            Conflict::Taken => Refused::Taken,
            Conflict::LooksLike(other) => Refused::LooksLike(other.to_string()),
        })?;
        Ok(Claim {
            router: self.clone(),
            display,
            canonical: Arc::from(request.key.canonical.as_str()),
            token,
            key,
            first: false,
            released: false,
        })
    }
}

impl Routing for LocalRouter {
    fn claim<'a>(
        self: Arc<Self>,
        request: ClaimRequest<'a>,
    ) -> BoxFuture<'a, Result<Claim, Refused>> {
        Box::pin(async move {
            let store = match (&self.store, self.auth) {
                (Some(store), AuthMode::Optional | AuthMode::Required) => store.clone(),
                // No keys: names are first come, first served, as in protocol version 1.
                _ => return self.go_online(&request, request.name, None, GUEST_EPOCH),
            };
            match request.proof {
                Some(key) => {
                    let claim = KeyClaim {
                        display: request.name.to_string(),
                        canonical: request.key.canonical.clone(),
                        skeleton: request.key.skeleton.clone(),
                        key,
                        now: now_ms(),
                    };
                    match store.claim(claim).await {
                        Ok(Claimed::Bound { record, first }) => {
                            let mut claim =
                                self.go_online(&request, &record.display, Some(key), record.epoch)?;
                            claim.first = first;
                            Ok(claim)
                        }
                        Ok(Claimed::Owned { display }) => Err(Refused::Owned(display)),
                        Ok(Claimed::Confusable { display }) => Err(Refused::LooksLike(display)),
                        Err(e) => Err(Refused::Unavailable(e.to_string())),
                    }
                }
                None if self.auth == AuthMode::Required => Err(Refused::AuthRequired),
                None => {
                    // Online first, then the table: a key holder who binds the name meanwhile
                    // displaces this guest (see `Registry::insert`), so the key always wins.
                    let online = self.go_online(&request, request.name, None, GUEST_EPOCH);
                    let canonical = request.key.canonical.clone();
                    let checked = store.check_guest(canonical, request.key.skeleton.clone()).await;
                    // A bound name is refused as bound, whether or not its owner is online.
                    match checked {
                        Ok(GuestCheck::Free) => online,
                        Ok(GuestCheck::Owned { display }) => Err(Refused::Owned(display)),
                        Ok(GuestCheck::Confusable { display }) => Err(Refused::LooksLike(display)),
                        Err(e) => Err(Refused::Unavailable(e.to_string())),
                    }
                }
            }
        })
    }

    fn release(&self, mut claim: Claim) -> BoxFuture<'_, ()> {
        claim.released = true;
        self.registry.remove(&claim.canonical, claim.token);
        Box::pin(async move {
            if let (Some(store), Some(_)) = (&self.store, claim.key) {
                let canonical = claim.canonical.to_string();
                if let Err(e) = store.seen(canonical, now_ms()).await {
                    tracing::warn!(name = %claim.display, error = %e, "could not record last seen");
                }
            }
        })
    }

    fn forget(&self, canonical: &str, token: u64) {
        self.registry.remove(canonical, token);
    }

    fn open(&self, claim: &Claim) -> bool {
        self.registry.open(&claim.canonical, claim.token)
    }

    fn route(
        &self,
        from: &Claim,
        id: u64,
        to: &str,
        content: &[u8],
        time: u64,
        routes: &mut RouteCache,
    ) -> Result<Routed, (Undelivered, String)> {
        let sender = from.token;
        let mut msg = MessageRef::deliver(id, &from.display, to, content);
        msg.time = time;
        // Checked in the larger (version 2) layout, whatever the receiver speaks.
        let len = encoded_len_ref(&msg);
        if len > self.max_frame_len {
            return Err((Undelivered::TooLarge, to.to_owned()));
        }
        let Some(outbox) = routes.resolve(to, |to| self.lookup(to)) else {
            return Err((Undelivered::NotOnline, to.to_owned()));
        };
        match outbox.push_from(&msg, sender) {
            Ok(()) => Ok(Routed::Queued),
            Err(PushError::Full) if !self.send_wait.is_zero() => {
                let (outbox, msg, wait) = (outbox.clone(), msg.to_message(), self.send_wait);
                Ok(Routed::Full(Box::pin(async move {
                    match outbox.wait_for_room(&msg.as_ref(), wait, sender).await {
                        Ok(()) => Ok(()),
                        Err(PushError::Full | PushError::Stalled) => {
                            Err((Undelivered::ReceiverFull, msg.to))
                        }
                        Err(PushError::Closed) => Err((Undelivered::NotOnline, msg.to)),
                    }
                })))
            }
            Err(PushError::Full | PushError::Stalled) => {
                Err((Undelivered::ReceiverFull, to.to_owned()))
            }
            // The receiver is closing: as far as the sender is concerned it is gone.
            Err(PushError::Closed) => Err((Undelivered::NotOnline, to.to_owned())),
        }
    }

    fn report_undelivered(&self, undelivered: Vec<Unwritten>) {
        for (msg, sender) in undelivered {
            let detail = format!("{} disconnected before the message reached it", msg.to);
            let reply = Message::reply(msg.id, Status::NotDelivered, msg.to, detail);
            // Only the connection that sent it: a later holder of the name never gets
            // replies about its predecessor's messages. If the sender is gone too, or not
            // reading either, there is no one left to tell.
            let from = canonical_name(&msg.from);
            let _ = self.registry.with_name(&from, |e| {
                if e.token == sender {
                    let _ = e.outbox.push(&reply.as_ref());
                }
            });
        }
    }

    fn users(&self) -> Vec<(Arc<str>, SocketAddr)> {
        self.registry.list()
    }

    fn online(&self) -> usize {
        self.registry.len()
    }

    fn unbind<'a>(
        &'a self,
        name: &'a str,
    ) -> BoxFuture<'a, Result<Option<NameRecord>, StoreError>> {
        Box::pin(async move {
            let Some(store) = &self.store else {
                return Err(StoreError(
                    "the server runs with --auth none: no names are bound".into(),
                ));
            };
            let canonical = canonical_name(name).into_owned();
            let released = store.release(canonical.clone()).await?;
            if released.is_some() {
                // Its holder, if online, loses the name now, not at its next login.
                let online = self.registry.with_name(&canonical, |e| (e.token, e.outbox.clone()));
                if let Some((token, outbox)) = online {
                    self.registry.remove(&canonical, token);
                    let detail = format!("the operator released the name {name}");
                    outbox
                        .close(Some(&Message::reply(0, Status::NameOwned, name, detail).closing()));
                }
            }
            Ok(released)
        })
    }

    fn close(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            if let Some(store) = &self.store {
                store.close().await;
            }
        })
    }
}
