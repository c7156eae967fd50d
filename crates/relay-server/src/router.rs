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
use std::sync::Weak;

use bytes::{Bytes, BytesMut};
use relay_proto::{
    AuthMode, Destination, Message, MessageRef, NameKey, PublicKey, Status, canonical_name,
    encode_body_ref, encoded_len_ref, parse_destination,
};

use crate::inbox::{Appended, Envelope, InboxStore, SenderRef, Totals};
use crate::metrics::Metrics;
use crate::names::{Claimed, GuestCheck, KeyClaim, NameRecord, NameStore, StoreError};
use crate::outbox::{Delivery, Outbox, Overflow, PushError, Unacked, Unwritten};
use crate::redb_store::SEQ_EPOCH_SHIFT;
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
    /// The receiver is on another node and the cluster link is down (or too busy to take
    /// the message within the send wait).
    Unreachable,
}

/// What became of a routed message.
pub(crate) enum Routed {
    /// Queued for the receiver.
    Queued,
    /// Sent to the receiver's inbox; the store answers the sender when it is durable.
    Stored,
    /// The receiver cannot take it now; await this (it waits a bounded time for room) to
    /// learn its fate.
    Full(Pending),
}

/// A message waiting for a busy receiver. It owns a copy of the message: the frame it came in
/// is not kept while the sender waits.
pub(crate) type Pending = BoxFuture<'static, Result<(), (Undelivered, String)>>;

/// What became of a message another node forwarded.
pub(crate) enum Forwarded {
    /// Queued for its receiver (or dropped as undecodable).
    Queued,
    /// Not queued; this reply goes back to its sender.
    Refused(Message),
    /// The receiver's outbox is full: it may take it within the send wait.
    Full,
}

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

    /// The holder of `claim` acknowledged everything numbered up to `upto`: receipts go to
    /// the senders, and what came from its inbox is removed there.
    fn acked(&self, claim: &Claim, upto: u64);

    /// Tells the senders of `undelivered` messages (chat messages that were queued for a
    /// receiver whose connection then failed) that they were not delivered.
    fn report_undelivered(&self, undelivered: Vec<Unwritten>);

    /// Everyone online as `(name, address)`, sorted by name.
    fn users(&self) -> Vec<(Arc<str>, SocketAddr)>;

    /// How many names are online.
    fn online(&self) -> usize;

    /// Disconnects `name`'s holder, telling it `detail` (the operator's `kick`); `false` if
    /// nobody by that name is online.
    fn kick(&self, name: &str, detail: &str) -> bool;

    /// What is known of `name`'s holder, if online (the operator's `who`).
    fn who(&self, name: &str) -> Option<Who>;

    /// Bytes queued for the clients online and not yet written to them.
    fn queued_bytes(&self) -> u64;

    /// Whether this node's link to the rest of the cluster is up; `None` for a server alone.
    fn cluster_connected(&self) -> Option<bool>;

    /// Unbinds a name from its key (the operator's `release`), disconnecting its holder if
    /// online; returns what was bound.
    fn unbind<'a>(&'a self, name: &'a str)
    -> BoxFuture<'a, Result<Option<NameRecord>, StoreError>>;

    /// What the inboxes hold (the console's `inboxes`).
    fn inbox_totals(&self) -> BoxFuture<'_, Result<Totals, StoreError>>;

    /// Empties `name`'s inbox (the console's `purge`); how many messages it held.
    fn purge<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<u64, StoreError>>;

    /// Removes stored messages past the age limit, telling their senders if online.
    fn expire(&self) -> BoxFuture<'_, ()>;

    /// The server has stopped: finish pending store writes and let go of the store.
    fn close(&self) -> BoxFuture<'_, ()>;
}

/// The rest of the cluster, as this node's router sees it: names held on other nodes, and the
/// way to reach them. A server alone has none; in cluster mode it is the NATS link
/// (`cluster::Link`). Everything on this node (the registry, the fast path, the stores) stays
/// in [`LocalRouter`], which asks its peers only where this node has no answer of its own: a
/// claim (is the name held elsewhere?), a destination not online here, a sender to tell who
/// is not connected here, the listing, the console's `kick` and `who`.
pub(crate) trait Peers: Send + Sync + std::fmt::Debug + 'static {
    /// Claims the name cluster-wide for `claim`, a registration already holding it on this
    /// node (not yet open to routing). Dropping the claim after a refusal releases it here.
    fn claim<'a>(
        &'a self,
        claim: &'a Claim,
        addr: SocketAddr,
    ) -> BoxFuture<'a, Result<(), Refused>>;

    /// Registration `token` of `canonical` left this node: its cluster-wide claim goes too.
    fn release(&self, canonical: &str, token: u64);

    /// Changes whenever what the link knows of who is where changes, and at least every
    /// quarter second (a lease lapses by time): a [`PeerRoute`] found under another stamp is
    /// stale.
    fn stamp(&self) -> u64;

    /// Where `to` leads if another (live) node holds it; `None` if none does.
    fn route(&self, to: &str) -> Option<PeerRoute>;

    /// Forwards `msg` from `from` along `route`; `None` if it cannot be written.
    fn forward(
        &self,
        from: &Claim,
        route: &PeerRoute,
        msg: &MessageRef<'_>,
    ) -> Option<Result<Routed, (Undelivered, String)>>;

    /// Pushes `msg` to `sender` if it is online on another node; false if not (or the link
    /// is down).
    fn tell(&self, sender: &SenderRef, msg: &MessageRef<'_>) -> bool;

    /// Everyone online on other nodes as `(name, address)`, in no order.
    fn users(&self) -> Vec<(Arc<str>, SocketAddr)>;

    /// Disconnects `name`'s holder on another node; false if no other node holds it.
    fn kick(&self, name: &str, detail: &str) -> bool;

    /// What is known of `name`'s holder on another node.
    fn who(&self, name: &str) -> Option<Who>;

    /// Whether the link to the rest of the cluster is up now.
    fn connected(&self) -> bool;

    /// The server has stopped: give up this node's lease and stop the link's tasks.
    fn close(&self) -> BoxFuture<'_, ()>;
}

/// A user online, as the operator's `who` shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Who {
    /// The name as shown.
    pub name: String,
    /// The client's address.
    pub addr: SocketAddr,
    /// The node it is connected to.
    pub node: String,
    /// When it registered, in ms since the Unix epoch.
    pub since: u64,
    /// Bytes queued for it and not yet written.
    pub queued_bytes: u64,
    /// Messages delivered to it and not yet acknowledged (a key holder's).
    pub unacked: u64,
    /// Its protocol version.
    pub version: u16,
}

impl Who {
    /// A user online on another node of the cluster (what its queues hold is not known here).
    pub(crate) fn remote(
        name: String,
        addr: SocketAddr,
        node: String,
        since: u64,
        version: u16,
    ) -> Who {
        Who { name, addr, node, since, queued_bytes: 0, unacked: 0, version }
    }
}

/// One connection's last destination and the outbox it led to. A sender mostly writes to the
/// same receiver many times in a row; remembering where the last message went skips the
/// registry lookup (a hash and a shard lock) for the next one. The entry is dropped as soon as
/// that outbox turns out to be closed, so a name freed and claimed again is looked up afresh.
/// In a cluster, the last destination on another node is remembered the same way, while the
/// link's stamp stays the same.
#[derive(Debug, Default)]
pub(crate) struct RouteCache {
    to: String,
    outbox: Option<Outbox>,
    /// The last destination not found here, and the registry's count of opened names then:
    /// it is not here either while that count has not moved (a destination on another node
    /// is not looked up here for every message).
    missed: Option<(String, u64)>,
    peer: Option<PeerRoute>,
}

/// Where a destination on another node leads, as the cluster link found it (see
/// [`Peers::route`]).
#[derive(Clone, Debug)]
pub(crate) struct PeerRoute {
    /// The destination as the sender wrote it.
    pub(crate) to: Arc<str>,
    /// The receiver's canonical name.
    pub(crate) recipient: Arc<str>,
    /// The receiver's node.
    pub(crate) node: Arc<str>,
    /// The link's stamp when it was found.
    pub(crate) stamp: u64,
}

impl RouteCache {
    /// The outbox of the destination last resolved here, and that destination as written, if
    /// it is still open: where the rest of a run of messages to it can go at once.
    pub(crate) fn run_target(&self) -> Option<(&Outbox, &str)> {
        self.outbox.as_ref().filter(|outbox| !outbox.is_closed()).map(|o| (o, self.to.as_str()))
    }

    /// Whether `to` is the destination last resolved here: it passed the name rules then.
    pub(crate) fn is_last_destination(&self, to: &str) -> bool {
        !self.to.is_empty() && self.to == to
    }

    /// The outbox for `to`: the remembered one if it is still open, otherwise whatever
    /// `lookup` finds (remembered for next time).
    fn resolve(
        &mut self,
        to: &str,
        opened: u64,
        lookup: impl FnOnce(&str) -> Option<Outbox>,
    ) -> Option<&Outbox> {
        let hit = self.outbox.as_ref().is_some_and(|outbox| self.to == to && !outbox.is_closed());
        if !hit {
            self.outbox = None;
            if self.missed.as_ref().is_some_and(|(missed, at)| *at == opened && missed == to) {
                return None;
            }
            let Some(found) = lookup(to) else {
                let missed = self.missed.get_or_insert_with(|| (String::new(), opened));
                missed.0.clear();
                missed.0.push_str(to);
                missed.1 = opened;
                return None;
            };
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
    /// The inboxes; `None` with `--auth none`.
    inbox: Option<Arc<dyn InboxStore>>,
    /// Most bytes a keyed session may have delivered and not acknowledged.
    unacked_window: usize,
    /// The server's counters (stored messages, and those the store refused).
    metrics: Arc<Metrics>,
    /// Itself, for what outlives a call (a closing session's hand-over, store answers).
    me: Weak<LocalRouter>,
    /// The other nodes of the cluster, in cluster mode.
    peers: Option<Arc<dyn Peers>>,
    /// This node's name, as `who` shows it.
    node: String,
}

/// Where a router keeps names and messages, and the rest of the cluster.
#[derive(Default)]
pub(crate) struct Stores {
    /// The name table; `None` with `--auth none`.
    pub(crate) names: Option<Arc<dyn NameStore>>,
    /// The inboxes; `None` with `--auth none`.
    pub(crate) inbox: Option<Arc<dyn InboxStore>>,
    /// The other nodes, in cluster mode.
    pub(crate) peers: Option<Arc<dyn Peers>>,
    /// This node's name, in cluster mode.
    pub(crate) node: Option<String>,
}

/// A router's settings.
#[derive(Clone, Copy, Debug)]
pub(crate) struct RouterLimits {
    pub(crate) auth: AuthMode,
    pub(crate) max_frame_len: usize,
    /// How long a message waits for room in a full receiver's outbox.
    pub(crate) send_wait: Duration,
    /// Most bytes a keyed session may have delivered and not acknowledged.
    pub(crate) unacked_window: usize,
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
    /// The connection's outbox.
    outbox: Outbox,
    /// Who this is as a sender (for receipts and store answers); made when first needed, so
    /// an idle client holds no copy of its name for it.
    origin: std::sync::OnceLock<Arc<SenderRef>>,
    /// The client's protocol version.
    version: u16,
    /// A keyed session: acknowledgements, receipts, and an inbox to read.
    tracked: bool,
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

    /// The name's canonical form.
    pub(crate) fn canonical(&self) -> &str {
        &self.canonical
    }

    /// The registration's token on this node.
    pub(crate) fn token(&self) -> u64 {
        self.token
    }

    /// The client's protocol version.
    pub(crate) fn version(&self) -> u16 {
        self.version
    }

    /// Whether this claim bound the name for the first time.
    pub(crate) fn first(&self) -> bool {
        self.first
    }

    /// Who this is as a sender.
    pub(crate) fn origin(&self) -> &Arc<SenderRef> {
        self.origin.get_or_init(|| {
            Arc::new(SenderRef {
                canonical: self.canonical.to_string(),
                token: self.token,
                keyed: self.key.is_some(),
                receipt: self.version >= 2,
            })
        })
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        if !self.released {
            self.outbox.seal();
            self.router.forget(&self.canonical, self.token);
        }
    }
}

/// The most bytes of a stored inbox queued for a client in one read.
const DRAIN_PAGE: usize = 256 * 1024;

/// The sender of what the server itself stores (a receipt): nobody to tell.
fn nobody() -> Arc<SenderRef> {
    Arc::new(SenderRef { canonical: String::new(), token: 0, keyed: false, receipt: false })
}

/// A forwarded frame body, decoded; `None` (logged) if it does not decode.
fn decode_forwarded(body: &[u8]) -> Option<MessageRef<'_>> {
    match relay_proto::decode_ref(body) {
        Ok(msg) => Some(msg),
        Err(e) => {
            tracing::warn!(error = %e, "a forwarded message does not decode; dropped");
            None
        }
    }
}

/// `msg` as a stored frame body: the version 2 layout, its number left for the store to set.
pub(crate) fn stored_body(msg: &MessageRef<'_>) -> Option<Bytes> {
    let msg = MessageRef { version: relay_proto::PROTOCOL_VERSION, seq: 0, ..*msg };
    let mut body = BytesMut::with_capacity(encoded_len_ref(&msg));
    encode_body_ref(&msg, &mut body).ok()?;
    Some(body.freeze())
}

/// The detail of a `Stored` reply.
const STORED_DETAIL: &str = "offline; stored on the server, delivered when they log in";

/// Now, in milliseconds since the Unix epoch.
pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// What storing a message needs of its sender, owned (a wait for a busy receiver outlives the
/// borrow of the sender's claim).
struct Sender {
    origin: Arc<SenderRef>,
    /// Where the store's answer goes.
    outbox: Outbox,
    version: u16,
}

impl Sender {
    fn of(claim: &Claim) -> Sender {
        Sender {
            origin: claim.origin().clone(),
            outbox: claim.outbox.clone(),
            version: claim.version,
        }
    }
}

impl LocalRouter {
    /// A receiver had no room for `msg` within the send wait: a keyed session's inbox takes it
    /// (and what follows, until a drain catches up; see [`Outbox::overflow`]), the sender
    /// learning nothing new, as for a delivered message; anyone else's is refused as not
    /// keeping up.
    fn overflow(
        &self,
        from: &Sender,
        outbox: &Outbox,
        msg: &MessageRef<'_>,
    ) -> Result<Routed, (Undelivered, String)> {
        let mut stored = Err(());
        let overflow = outbox.overflow(msg, |m, recipient| {
            stored = self.store_for(from, m, recipient.to_owned(), false);
        });
        match overflow {
            Overflow::Started { after, recipient } => {
                tracing::debug!(%recipient, "receiver not keeping up; its messages go to its inbox");
                self.spawn_drain(outbox.clone(), recipient.to_string(), after);
            }
            Overflow::Storing => {}
            Overflow::NotTracked => return Err((Undelivered::ReceiverFull, msg.to.to_owned())),
            // Gone meanwhile: as far as the sender knows, it was not online.
            Overflow::Closed => return Err((Undelivered::NotOnline, msg.to.to_owned())),
        }
        match stored {
            Ok(()) => Ok(Routed::Stored),
            Err(()) => Err((Undelivered::ReceiverFull, msg.to.to_owned())),
        }
    }

    pub(crate) fn new(
        stores: Stores,
        limits: RouterLimits,
        metrics: Arc<Metrics>,
    ) -> Arc<LocalRouter> {
        let Stores { names: store, inbox, peers, node } = stores;
        let RouterLimits { auth, max_frame_len, send_wait, unacked_window } = limits;
        Arc::new_cyclic(|me| LocalRouter {
            registry: Registry::default(),
            store,
            auth,
            max_frame_len,
            send_wait,
            inbox,
            unacked_window,
            metrics,
            me: me.clone(),
            peers,
            node: node.unwrap_or_else(|| "this server".into()),
        })
    }

    /// Stores `msg` from `from` for `recipient` (a canonical name); the store answers the
    /// sender. `Err` if nothing can be stored for it (a version 1 sender, which cannot be
    /// told, or no store).
    fn store_for(
        &self,
        from: &Sender,
        msg: &MessageRef<'_>,
        recipient: String,
        told: bool,
    ) -> Result<(), ()> {
        let Some(inbox) = &self.inbox else { return Err(()) };
        let Some(body) = stored_body(msg) else { return Err(()) };
        let envelope = Envelope {
            recipient,
            body,
            seq: None,
            id: msg.id,
            time: msg.time,
            sender: from.origin.clone(),
        };
        let outbox = from.outbox.clone();
        let metrics = self.metrics.clone();
        let (id, to) = (msg.id, msg.to.to_owned());
        // A version 1 sender knows none of the store's answers: it is told only of failure,
        // as it would be of a receiver not keeping up.
        let v2 = from.version >= 2;
        outbox.storing();
        inbox.append(
            envelope,
            Box::new(move |appended| {
                if let Ok(Appended::Stored(_)) = appended {
                    metrics.stored.inc();
                }
                let (status, detail) = match appended {
                    Ok(Appended::Stored(_)) if !told || !v2 => {
                        outbox.stored_reply(None);
                        return;
                    }
                    // The common answer is built without allocating: there is one per message.
                    Ok(Appended::Stored(_)) => {
                        let reply = MessageRef {
                            kind: relay_proto::Kind::Reply(Status::Stored),
                            ..MessageRef::send(id, &to, STORED_DETAIL.as_bytes())
                        };
                        outbox.stored_reply(Some(&reply));
                        return;
                    }
                    Ok(Appended::NotBound) => (Status::NotFound, format!("{to} is not online")),
                    Ok(Appended::Full(full)) => {
                        let status = if v2 { Status::InboxFull } else { Status::NotDelivered };
                        (status, format!("not stored for {to}: {full}"))
                    }
                    Err(e) => (Status::NotDelivered, format!("not stored for {to}: {e}")),
                };
                metrics.refused(status);
                let reply = Message::reply(id, status, to, detail);
                outbox.stored_reply(Some(&reply.as_ref()));
            }),
        );
        Ok(())
    }

    /// A message for someone not online: stored if `to` is a name (the store knows whether
    /// it is bound) and the sender can be told.
    fn store_offline(
        &self,
        from: &Claim,
        msg: &MessageRef<'_>,
        to: &str,
    ) -> Result<Routed, (Undelivered, String)> {
        let not_online = || Err((Undelivered::NotOnline, to.to_owned()));
        if from.version < 2 {
            return not_online();
        }
        let Ok(Destination::Name(name)) = parse_destination(to) else { return not_online() };
        match self.store_for(&Sender::of(from), msg, canonical_name(name).into_owned(), true) {
            Ok(()) => Ok(Routed::Stored),
            Err(()) => not_online(),
        }
    }

    /// The hand-over of a keyed session that ended: its unacknowledged messages go to its
    /// inbox with the numbers they were delivered with. A sender whose message cannot be
    /// stored is told it was not delivered.
    fn move_to_inbox(&self, recipient: &str, entries: Vec<(Unacked, Bytes)>) {
        let Some(inbox) = &self.inbox else { return };
        // What came from the inbox is still there (only acknowledged messages are removed).
        for (entry, body) in entries.into_iter().filter(|(e, _)| !e.stored) {
            let time = relay_proto::decode_ref(&body).map_or(0, |m| m.time);
            let sender = entry.sender.clone().unwrap_or_else(nobody);
            let envelope = Envelope {
                recipient: recipient.to_owned(),
                body,
                seq: Some(entry.seq),
                id: entry.id,
                time,
                sender: sender.clone(),
            };
            let me = self.me.clone();
            let recipient = recipient.to_owned();
            inbox.append(
                envelope,
                Box::new(move |appended| {
                    let why = match appended {
                        Ok(Appended::Stored(_)) => return,
                        Ok(Appended::NotBound) => format!("{recipient} is no longer bound"),
                        Ok(Appended::Full(full)) => full.to_string(),
                        Err(e) => e.to_string(),
                    };
                    // Debug, not warn: a failing store is logged once per cause by the store.
                    tracing::debug!(%recipient, id = entry.id, reason = %why,
                        "an unacknowledged message could not be kept");
                    if let Some(router) = me.upgrade() && sender.receipt {
                        let detail = format!(
                            "{recipient} disconnected before taking the message, and it could not be stored: {why}"
                        );
                        let reply = Message::reply(entry.id, Status::NotDelivered, recipient, detail);
                        router.tell(&sender, &reply.as_ref());
                    }
                }),
            );
        }
    }

    /// Pushes `msg` to `sender` if that registration (or, for a keyed sender, its name) is
    /// online here or on another node; false if not.
    fn tell(&self, sender: &SenderRef, msg: &MessageRef<'_>) -> bool {
        self.tell_here(sender, msg)
            || self.peers.as_ref().is_some_and(|peers| peers.tell(sender, msg))
    }

    /// [`LocalRouter::tell`], on this node only (also the cluster link telling a sender here
    /// the fate of a message it forwarded).
    pub(crate) fn tell_here(&self, sender: &SenderRef, msg: &MessageRef<'_>) -> bool {
        let outbox = self
            .registry
            .with_name(&sender.canonical, |e| {
                (sender.keyed || e.token == sender.token).then(|| e.outbox.clone())
            })
            .flatten();
        match outbox {
            Some(outbox) => outbox
                .push_routed(msg, 0, None, |m, recipient| {
                    self.store_receipt(m, recipient);
                })
                .is_ok(),
            None => false,
        }
    }

    /// Stores a receipt (or another notice) in a keyed sender's inbox.
    fn store_receipt(&self, msg: &MessageRef<'_>, recipient: &str) {
        let Some(inbox) = &self.inbox else { return };
        let Some(body) = stored_body(msg) else { return };
        let envelope = Envelope {
            recipient: recipient.to_owned(),
            body,
            seq: None,
            id: 0,
            time: msg.time,
            sender: nobody(),
        };
        let recipient = recipient.to_owned();
        inbox.append(
            envelope,
            Box::new(move |appended| match appended {
                Ok(Appended::Stored(_)) => {}
                other => {
                    // Debug: a failing store is logged once per cause by the store.
                    tracing::debug!(%recipient, result = ?other, "a receipt could not be stored")
                }
            }),
        );
    }

    /// Sends receipts for `ids` (messages `sender` sent to `recipient`).
    fn receipt(&self, sender: &SenderRef, recipient: &str, ids: &[u64]) {
        // A version 1 sender knows no receipts (its messages to key holders are kept until
        // acknowledged all the same).
        if !sender.receipt {
            return;
        }
        // One frame holds this many ids with room to spare.
        let per_frame = (self.max_frame_len.saturating_sub(256) / 8).max(1);
        let now = now_ms();
        let mut content = Vec::with_capacity(ids.len().min(per_frame) * 8);
        for ids in ids.chunks(per_frame) {
            content.clear();
            for id in ids {
                content.extend_from_slice(&id.to_le_bytes());
            }
            // The layout `Message::delivered` gives, borrowed: one buffer for the ids is all
            // a receipt allocates.
            let msg = MessageRef {
                kind: relay_proto::Kind::Delivered,
                time: now,
                ..MessageRef::send(0, recipient, &content)
            };
            if !self.tell(sender, &msg) && sender.keyed {
                self.store_receipt(&msg, &sender.canonical);
            }
        }
    }

    /// Reads a keyed session's inbox into its outbox, then opens it to live traffic.
    /// Starts after number `after` (what the session was given already).
    fn spawn_drain(&self, outbox: Outbox, recipient: String, mut after: u64) {
        let Some(inbox) = self.inbox.clone() else { return };
        tokio::spawn(async move {
            let mut pause = Duration::from_millis(100);
            while !outbox.is_closed() {
                let submitted = outbox.submitted();
                match inbox.read(recipient.clone(), after, DRAIN_PAGE, true).await {
                    Ok(page) => {
                        for item in page.items {
                            after = item.seq;
                            if outbox.push_stored(item).await.is_err() {
                                return;
                            }
                        }
                        if let Some(epoch) = page.live_epoch
                            && outbox.go_live(submitted, first_seq(epoch))
                        {
                            return;
                        }
                    }
                    Err(e) => {
                        tracing::warn!(%recipient, error = %e, "could not read the inbox; retrying");
                        tokio::time::sleep(pause).await;
                        pause = (pause * 2).min(Duration::from_secs(5));
                    }
                }
            }
        });
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

    /// A message another node forwarded for `recipient` (a canonical name it saw online
    /// here), queued at once if its outbox has room. If not: a key holder's inbox takes it;
    /// for anyone else [`Forwarded::Full`], and the link parks it (see
    /// [`LocalRouter::deliver_forwarded`]) rather than make the other receivers wait behind it.
    pub(crate) fn try_deliver_forwarded(
        &self,
        recipient: &str,
        body: &[u8],
        origin: &Arc<SenderRef>,
        routes: &mut RouteCache,
    ) -> Forwarded {
        let Some(msg) = decode_forwarded(body) else { return Forwarded::Queued };
        // The link's last recipient, as a connection remembers its last destination.
        let opened = self.registry.opened();
        let found = routes.resolve(recipient, opened, |recipient| {
            self.registry.with_name(recipient, |e| e.outbox.clone())
        });
        let Some(outbox) = found else {
            return Forwarded::Refused(self.forward_refusal(&msg, PushError::Closed));
        };
        // The sender's token at its node: if this connection fails with the message unwritten,
        // that registration is told through the cluster (see `report_undelivered`). Its
        // origin is kept for a key holder's receipts, which go back through the cluster too.
        let pushed = outbox.push_routed(&msg, origin.token, Some(origin), |m, recipient| {
            self.store_forwarded(origin, m, recipient);
        });
        match pushed {
            Ok(_) => Forwarded::Queued,
            // A guest's waits (parked by the link) for room, as a sender here would wait; a key
            // holder's goes to its inbox at once, with what follows, in order (parking it
            // would let later messages overtake it once the parking is full).
            Err(PushError::Full) if !self.send_wait.is_zero() && !outbox.is_tracked() => {
                Forwarded::Full
            }
            Err(e) => match self.overflow_forwarded(outbox, &msg, origin, e) {
                Ok(()) => Forwarded::Queued,
                Err(reply) => Forwarded::Refused(reply),
            },
        }
    }

    /// A forwarded message that found no room: a key holder's inbox takes it (and what follows,
    /// until a drain catches up), as for a sender on this node (see [`LocalRouter::overflow`]);
    /// anyone else's is refused, the reply for its sender returned.
    fn overflow_forwarded(
        &self,
        outbox: &Outbox,
        msg: &MessageRef<'_>,
        origin: &Arc<SenderRef>,
        why: PushError,
    ) -> Result<(), Message> {
        let overflow = outbox.overflow(msg, |m, recipient| {
            self.store_forwarded(origin, m, recipient);
        });
        match overflow {
            Overflow::Started { after, recipient } => {
                tracing::debug!(%recipient, "receiver not keeping up; its messages go to its inbox");
                self.spawn_drain(outbox.clone(), recipient.to_string(), after);
                Ok(())
            }
            Overflow::Storing => Ok(()),
            Overflow::NotTracked => Err(self.forward_refusal(msg, why)),
            Overflow::Closed => Err(self.forward_refusal(msg, PushError::Closed)),
        }
    }

    /// [`LocalRouter::try_deliver_forwarded`], waiting up to the send wait for room in a full
    /// receiver's outbox, as a sender on this node would wait. `Err` with the reply its
    /// sender should get if it cannot be queued.
    pub(crate) async fn deliver_forwarded(
        &self,
        recipient: &str,
        body: &[u8],
        origin: &Arc<SenderRef>,
    ) -> Result<(), Message> {
        let Some((msg, outbox)) = self.forwarded_to(recipient, body) else { return Ok(()) };
        let outbox = outbox?;
        let pushed = outbox.push_routed(&msg, origin.token, Some(origin), |m, recipient| {
            self.store_forwarded(origin, m, recipient);
        });
        let pushed = match pushed {
            Err(PushError::Full) if !self.send_wait.is_zero() => {
                outbox.wait_for_room(&msg, self.send_wait, origin.token, Some(origin)).await
            }
            other => other.map(drop),
        };
        match pushed {
            Ok(()) => Ok(()),
            Err(e @ (PushError::Full | PushError::Stalled)) => {
                self.overflow_forwarded(&outbox, &msg, origin, e)
            }
            Err(e) => Err(self.forward_refusal(&msg, e)),
        }
    }

    /// Stores a forwarded message for a key holder whose session is reading its inbox (it
    /// goes in behind what is stored). Its sender, on another node, learns nothing new, as for
    /// a delivered message, unless it cannot be stored.
    fn store_forwarded(&self, origin: &Arc<SenderRef>, msg: &MessageRef<'_>, recipient: &str) {
        let (Some(inbox), Some(body)) = (&self.inbox, stored_body(msg)) else { return };
        let envelope = Envelope {
            recipient: recipient.to_owned(),
            body,
            seq: None,
            id: msg.id,
            time: msg.time,
            sender: origin.clone(),
        };
        let (me, origin, to, id) = (self.me.clone(), origin.clone(), msg.to.to_owned(), msg.id);
        inbox.append(
            envelope,
            Box::new(move |appended| {
                let (status, detail) = match appended {
                    Ok(Appended::Stored(_)) => return,
                    Ok(Appended::NotBound) => (Status::NotFound, format!("{to} is not online")),
                    // A version 1 sender (no receipts) knows no `InboxFull`.
                    Ok(Appended::Full(full)) => {
                        let status =
                            if origin.receipt { Status::InboxFull } else { Status::NotDelivered };
                        (status, format!("not stored for {to}: {full}"))
                    }
                    Err(e) => (Status::NotDelivered, format!("not stored for {to}: {e}")),
                };
                if let Some(router) = me.upgrade() {
                    router.metrics.refused(status);
                    let reply = Message::reply(id, status, to, detail);
                    router.tell(&origin, &reply.as_ref());
                }
            }),
        );
    }

    /// A forwarded message, decoded, and its recipient's outbox (or the reply for a
    /// recipient not here). `None` if it does not decode (logged and dropped).
    fn forwarded_to<'b>(
        &self,
        recipient: &str,
        body: &'b [u8],
    ) -> Option<(MessageRef<'b>, Result<Outbox, Message>)> {
        let msg = decode_forwarded(body)?;
        let outbox = self.registry.with_name(recipient, |e| e.outbox.clone());
        let outbox = outbox.ok_or_else(|| self.forward_refusal(&msg, PushError::Closed));
        Some((msg, outbox))
    }

    /// The reply to the sender of a forwarded message refused because its receiver is not
    /// keeping up; `None` if it does not decode.
    pub(crate) fn refuse_forwarded(&self, body: &[u8]) -> Option<Message> {
        let msg = relay_proto::decode_ref(body).ok()?;
        Some(self.forward_refusal(&msg, PushError::Full))
    }

    /// The reply to the sender of a forwarded message that could not be queued.
    fn forward_refusal(&self, msg: &MessageRef<'_>, why: PushError) -> Message {
        let (status, detail) = match why {
            PushError::Closed => (Status::NotFound, format!("{} is not online", msg.to)),
            PushError::Full | PushError::Stalled => (
                Status::NotDelivered,
                format!("{} is not keeping up; the message was not delivered", msg.to),
            ),
        };
        self.metrics.refused(status);
        Message::reply(msg.id, status, msg.to, detail)
    }

    /// A reply or receipt another node sent for a sender online here.
    pub(crate) fn tell_forwarded(&self, canonical: &str, token: u64, keyed: bool, body: &[u8]) {
        let Ok(msg) = relay_proto::decode_ref(body) else {
            tracing::warn!("a forwarded reply does not decode; dropped");
            return;
        };
        let sender = SenderRef { canonical: canonical.to_owned(), token, keyed, receipt: true };
        self.tell_here(&sender, &msg);
    }

    /// Disconnects registration `token` of `canonical` (any registration if 0), telling it
    /// `status` and `detail`; false if it is not here.
    pub(crate) fn evict(&self, canonical: &str, token: u64, status: Status, detail: &str) -> bool {
        let online =
            self.registry.with_name(canonical, |e| (e.token, e.outbox.clone(), e.display.clone()));
        let Some((held, outbox, display)) = online.filter(|o| token == 0 || o.0 == token) else {
            return false;
        };
        self.registry.remove(canonical, held);
        // A version 1 client knows no `Kicked`: it is told its session was refused.
        let status = match status {
            Status::Kicked if outbox.queue().version < 2 => Status::InvalidRequest,
            other => other,
        };
        if status == Status::Kicked {
            self.metrics.kicked.inc();
        }
        outbox.close(Some(&Message::reply(0, status, &*display, detail).closing()));
        true
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
        let tracked = key.is_some() && request.version >= 2 && self.inbox.is_some();
        let canonical: Arc<str> = Arc::from(request.key.canonical.as_str());
        if tracked {
            let me = self.me.clone();
            request.outbox.track(
                canonical.clone(),
                self.unacked_window,
                Box::new(move |recipient, entries| {
                    if let Some(router) = me.upgrade() {
                        router.move_to_inbox(recipient, entries);
                    }
                }),
            );
        }
        let (display, token) = self.registry.insert(entry).map_err(|conflict| match conflict {
            Conflict::Taken => Refused::Taken,
            Conflict::LooksLike(other) => Refused::LooksLike(other.to_string()),
        })?;
        Ok(Claim {
            router: self.clone(),
            display,
            canonical,
            token,
            key,
            first: false,
            released: false,
            outbox: request.outbox.clone(),
            origin: std::sync::OnceLock::new(),
            version: request.version,
            tracked,
        })
    }

    /// Claims a name on this node: the name table, then the registry.
    async fn claim_here(self: Arc<Self>, request: ClaimRequest<'_>) -> Result<Claim, Refused> {
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
    }
}

impl Routing for LocalRouter {
    fn claim<'a>(
        self: Arc<Self>,
        request: ClaimRequest<'a>,
    ) -> BoxFuture<'a, Result<Claim, Refused>> {
        Box::pin(async move {
            let addr = request.addr;
            let claim = self.clone().claim_here(request).await?;
            // Held here; now across the cluster. A refusal drops the claim, which frees the
            // name here again.
            if let Some(peers) = &self.peers {
                peers.claim(&claim, addr).await?;
            }
            Ok(claim)
        })
    }

    fn release(&self, mut claim: Claim) -> BoxFuture<'_, ()> {
        claim.released = true;
        // What it was not acknowledged is stored before anything routed after it leaves.
        claim.outbox.seal();
        self.registry.remove(&claim.canonical, claim.token);
        if let Some(peers) = &self.peers {
            peers.release(&claim.canonical, claim.token);
        }
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
        if let Some(peers) = &self.peers {
            peers.release(canonical, token);
        }
    }

    fn open(&self, claim: &Claim) -> bool {
        if !self.registry.open(&claim.canonical, claim.token) {
            return false;
        }
        if claim.tracked {
            self.spawn_drain(claim.outbox.clone(), claim.canonical.to_string(), 0);
        }
        true
    }

    fn acked(&self, claim: &Claim, upto: u64) {
        let acked = claim.outbox.ack(upto);
        if let (Some(upto), Some(inbox)) = (acked.stored_upto, &self.inbox) {
            inbox.remove(claim.canonical.to_string(), upto);
        }
        for (sender, ids) in acked.receipts {
            self.receipt(&sender, &claim.display, &ids);
        }
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
        let opened = self.registry.opened();
        let Some(outbox) = routes.resolve(to, opened, |to| self.lookup(to)) else {
            if let Some(peers) = &self.peers {
                // Not here: the last remote route if the link's view is unchanged, otherwise
                // a fresh look (parsing the destination, and the view's lookups, once per
                // change rather than once per message).
                let stamp = peers.stamp();
                if !routes.peer.as_ref().is_some_and(|r| r.stamp == stamp && *r.to == *to) {
                    routes.peer = peers.route(to);
                }
                if let Some(route) = &routes.peer
                    && let Some(forwarded) = peers.forward(from, route, &msg)
                {
                    return forwarded;
                }
            }
            return self.store_offline(from, &msg, to);
        };
        let mut stored = Ok(());
        let pushed = outbox.push_routed(&msg, sender, Some(from.origin()), |m, recipient| {
            // Reading its inbox: the sender learns nothing new (it is as good as delivered).
            stored = self.store_for(&Sender::of(from), m, recipient.to_owned(), false);
        });
        match pushed {
            Ok(Delivery::Queued) => Ok(Routed::Queued),
            Ok(Delivery::Storing) if stored.is_ok() => Ok(Routed::Stored),
            Ok(Delivery::Storing) => Err((Undelivered::ReceiverFull, to.to_owned())),
            Err(PushError::Full) if !self.send_wait.is_zero() => {
                let (outbox, msg, wait) = (outbox.clone(), msg.to_message(), self.send_wait);
                let (me, from) = (self.me.clone(), Sender::of(from));
                Ok(Routed::Full(Box::pin(async move {
                    match outbox
                        .wait_for_room(&msg.as_ref(), wait, sender, Some(&from.origin))
                        .await
                    {
                        Ok(()) => Ok(()),
                        Err(PushError::Full | PushError::Stalled) => match me.upgrade() {
                            Some(router) => {
                                router.overflow(&from, &outbox, &msg.as_ref()).map(drop)
                            }
                            None => Err((Undelivered::ReceiverFull, msg.to)),
                        },
                        // Gone meanwhile: as far as the sender knows, it was not online.
                        Err(PushError::Closed) => Err((Undelivered::NotOnline, msg.to)),
                    }
                })))
            }
            Err(PushError::Full | PushError::Stalled) => {
                self.overflow(&Sender::of(from), outbox, &msg)
            }
            // The receiver is closing: as far as the sender is concerned it is gone.
            Err(PushError::Closed) => self.store_offline(from, &msg, to),
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
            let here = self.registry.with_name(&from, |e| {
                if e.token == sender {
                    let _ = e.outbox.push(&reply.as_ref());
                }
            });
            // Not on this node: a message forwarded from another, which keeps its sender's
            // registration there; told through the cluster if it is still online (never
            // stored: a guest's refusal, or a live notice).
            if here.is_none()
                && let Some(peers) = &self.peers
            {
                let sender = SenderRef {
                    canonical: from.into_owned(),
                    token: sender,
                    keyed: false,
                    receipt: false,
                };
                peers.tell(&sender, &reply.as_ref());
            }
        }
    }

    fn users(&self) -> Vec<(Arc<str>, SocketAddr)> {
        let mut users = self.registry.list();
        if let Some(peers) = &self.peers {
            users.extend(peers.users());
            users.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        }
        users
    }

    fn online(&self) -> usize {
        self.registry.len()
    }

    fn kick(&self, name: &str, detail: &str) -> bool {
        self.evict(&canonical_name(name), 0, Status::Kicked, detail)
            || self.peers.as_ref().is_some_and(|peers| peers.kick(name, detail))
    }

    fn who(&self, name: &str) -> Option<Who> {
        let canonical = canonical_name(name);
        let Some((display, addr, since, outbox)) = self
            .registry
            .with_name(&canonical, |e| (e.display.clone(), e.addr, e.since, e.outbox.clone()))
        else {
            return self.peers.as_ref().and_then(|peers| peers.who(name));
        };
        let queue = outbox.queue();
        Some(Who {
            name: display.to_string(),
            addr,
            node: self.node.clone(),
            since,
            queued_bytes: queue.bytes,
            unacked: queue.unacked,
            version: queue.version,
        })
    }

    fn queued_bytes(&self) -> u64 {
        self.registry.queued_bytes()
    }

    fn cluster_connected(&self) -> Option<bool> {
        self.peers.as_ref().map(|peers| peers.connected())
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

    fn inbox_totals(&self) -> BoxFuture<'_, Result<Totals, StoreError>> {
        Box::pin(async move {
            match &self.inbox {
                Some(inbox) => inbox.totals().await,
                None => Ok(Totals::default()),
            }
        })
    }

    fn purge<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<u64, StoreError>> {
        Box::pin(async move {
            let Some(inbox) = &self.inbox else {
                return Err(StoreError(
                    "the server runs with --auth none: nothing is stored".into(),
                ));
            };
            inbox.purge(canonical_name(name).into_owned()).await
        })
    }

    fn expire(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let Some(inbox) = &self.inbox else { return };
            match inbox.expire(now_ms()).await {
                Ok(expired) if !expired.is_empty() => {
                    tracing::info!(count = expired.len(), "stored messages expired");
                    for gone in expired {
                        self.metrics.refused(Status::Expired);
                        if gone.sender.receipt {
                            let to = gone.recipient;
                            let detail = format!(
                                "{to} did not log in before the message expired; it was removed"
                            );
                            let reply = Message::reply(gone.id, Status::Expired, to, detail);
                            // A sender who is offline is not told later: the notice is not
                            // kept (a receipt-like notice for every expired message would
                            // itself fill inboxes).
                            self.tell(&gone.sender, &reply.as_ref());
                        }
                    }
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "could not expire stored messages"),
            }
        })
    }

    fn close(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            if let Some(store) = &self.store {
                store.close().await;
            }
            if let Some(peers) = &self.peers {
                peers.close().await;
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missed_destination_is_looked_up_again_only_once_a_name_was_opened() {
        let mut routes = RouteCache::default();
        let lookups = std::cell::Cell::new(0);
        let lookup = |found: Option<Outbox>| {
            lookups.set(lookups.get() + 1);
            found
        };
        assert!(routes.resolve("bob", 7, |_| lookup(None)).is_none());
        // Nothing opened since: not looked up again.
        assert!(routes.resolve("bob", 7, |_| lookup(None)).is_none());
        assert_eq!(lookups.get(), 1);
        // Another destination is looked up.
        assert!(routes.resolve("carol", 7, |_| lookup(None)).is_none());
        assert_eq!(lookups.get(), 2);
        // A name opened since: bob is looked up, found, and remembered.
        let outbox = Outbox::new(1024);
        assert!(routes.resolve("bob", 8, |_| lookup(Some(outbox.clone()))).is_some());
        assert!(routes.resolve("bob", 8, |_| lookup(None)).is_some());
        assert_eq!(lookups.get(), 3);
        // Its outbox closed: looked up afresh.
        outbox.close(None);
        assert!(routes.resolve("bob", 8, |_| lookup(None)).is_none());
        assert_eq!(lookups.get(), 4);
    }
}
