//! A node's link to the rest of the cluster: the [`Peers`] of its router.
//!
//! It claims names in the presence bucket, keeps a view of who is online on which node (by
//! watching the presence and lease buckets), forwards messages for names on other nodes to
//! their node's subject, and takes in what other nodes forward here.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError, RwLock, Weak};
use std::time::{Duration, Instant};

use async_nats::jetstream::kv::{self, CreateErrorKind, Operation, UpdateErrorKind};
use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use futures_util::future::BoxFuture;
use relay_proto::{Destination, Message, MessageRef, Status, canonical_name, parse_destination};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::layout;
use super::wire::{Batch, Gaps, Origin, Presence, Record, decode_lease, encode_lease, kv_key};
use crate::inbox::SenderRef;
use crate::router::{
    Claim, Forwarded, LocalRouter, PeerRoute, Peers, Refused, RouteCache, Routed, Undelivered, Who,
    now_ms,
};

/// How many times a claim reads again after losing a compare-and-set race.
const RACES: usize = 16;

/// The most bytes of records in one NATS message.
const BATCH_BYTES: usize = 256 * 1024;

/// What the NATS client's events tell the link.
#[derive(Debug, Default)]
pub(crate) struct LinkState {
    /// Connected to NATS now.
    up: AtomicBool,
    /// Has been disconnected since the last re-assertion of claims.
    lost: AtomicBool,
    /// Wakes the re-assertion after a reconnect.
    reconnected: Notify,
    /// When the connection to NATS last came up: a forwarded message's wait for its
    /// acknowledgement counts from then at the earliest (see [`Link::expire_unacked`]).
    up_since: Mutex<Option<Instant>>,
}

impl LinkState {
    pub(crate) fn event(&self, event: async_nats::Event) {
        match event {
            async_nats::Event::Connected => {
                *lock(&self.up_since) = Some(Instant::now());
                self.up.store(true, Ordering::Release);
                if self.lost.load(Ordering::Acquire) {
                    tracing::info!("reconnected to NATS; re-asserting this node's names");
                    self.reconnected.notify_one();
                }
            }
            async_nats::Event::Disconnected => {
                self.up.store(false, Ordering::Release);
                self.lost.store(true, Ordering::Release);
                tracing::warn!(
                    "lost the connection to NATS; serving this node's clients only until it is back"
                );
            }
            other => tracing::debug!(event = %other, "NATS event"),
        }
    }
}

/// A name this node holds in the presence bucket.
#[derive(Debug)]
struct Held {
    key: String,
    token: u64,
    /// Held by a guest: a key holder of the name displaces it.
    guest: bool,
    revision: u64,
    value: Bytes,
}

#[derive(Debug, Default)]
struct Holdings {
    /// By canonical name.
    by_name: HashMap<String, Held>,
    /// Presence key → canonical name.
    by_key: HashMap<String, String>,
}

/// A presence entry as the view keeps it: shared, with its node's name ready for queuing.
#[derive(Debug)]
struct Remote {
    presence: Presence,
    node_name: Arc<str>,
    /// The holder's canonical name, shared by the routes that lead to it.
    canonical: Arc<str>,
}

impl std::ops::Deref for Remote {
    type Target = Presence;

    fn deref(&self) -> &Presence {
        &self.presence
    }
}

/// Who is online on which node, as the watched buckets say.
#[derive(Debug, Default)]
struct View {
    /// Presence key → entry.
    by_key: HashMap<String, Arc<Remote>>,
    /// Canonical name → presence key.
    by_name: HashMap<String, String>,
    by_addr: HashMap<SocketAddr, String>,
    /// Node → (incarnation, when its lease was last renewed).
    nodes: HashMap<String, (u64, Instant)>,
}

impl View {
    fn put(&mut self, key: String, presence: Presence) {
        self.remove(&key);
        self.by_name.insert(presence.canonical.clone(), key.clone());
        self.by_addr.insert(presence.addr, key.clone());
        let node_name = Arc::from(presence.node.as_str());
        let canonical = Arc::from(presence.canonical.as_str());
        self.by_key.insert(key, Arc::new(Remote { presence, node_name, canonical }));
    }

    fn remove(&mut self, key: &str) {
        if let Some(old) = self.by_key.remove(key) {
            if self.by_name.get(&*old.canonical).is_some_and(|k| k == key) {
                self.by_name.remove(&*old.canonical);
            }
            if self.by_addr.get(&old.addr).is_some_and(|k| k == key) {
                self.by_addr.remove(&old.addr);
            }
        }
    }

    fn alive(&self, node: &str, incarnation: u64, lease: Duration) -> bool {
        self.nodes.get(node).is_some_and(|&(i, at)| i == incarnation && at.elapsed() < lease)
    }
}

/// What [`Link::start`] needs.
pub(crate) struct Parts {
    pub(crate) client: async_nats::Client,
    pub(crate) online: kv::Store,
    pub(crate) nodes: kv::Store,
    pub(crate) node: String,
    pub(crate) lease: Duration,
    pub(crate) outage_wait: Duration,
    pub(crate) max_payload: usize,
    pub(crate) state: Arc<LinkState>,
}

/// A forwarded chat message not yet acknowledged by the node it went to.
struct Pending {
    sender: Arc<SenderRef>,
    id: u64,
    to: Arc<str>,
}

/// One NATS message's chat messages, until the receiving node acknowledges it.
struct Unacked {
    number: u64,
    sent: Instant,
    pending: Vec<Pending>,
    /// Their bytes, counted in the window.
    bytes: usize,
}

/// Bytes of chat messages forwarded to other nodes and not yet acknowledged, past which
/// senders wait (up to the send wait) as they would for a full receiver here: the
/// cluster's flow control, so a busy link slows its senders instead of refusing them.
const WINDOW: usize = 8 << 20;

/// How long a forwarded message may go unacknowledged, while this node is connected to NATS,
/// before its sender is told it was not delivered (the other node died, or never got it).
const ACK_TIMEOUT: Duration = Duration::from_secs(5);

/// One NATS message being filled for a node: its records, written in place by the senders
/// (no copy or allocation per message), and the chat messages among them.
struct Filling {
    /// Starts with the [`Batch`] head, its number patched in when it is sealed.
    payload: BytesMut,
    pending: Vec<Pending>,
    /// Bytes of chat messages in it, counted in the window.
    pending_bytes: usize,
}

/// What is queued for one node.
#[derive(Default)]
struct NodeQueue {
    /// The NATS message being filled, if any.
    filling: Option<Filling>,
    /// Full ones, in order, waiting to be published.
    sealed: std::collections::VecDeque<Filling>,
    /// The number of the last NATS message sealed for this node.
    number: u64,
}

/// Where a batch head's number sits: after the layout byte, the node name and the
/// incarnation.
fn number_at(node: &str) -> usize {
    1 + 2 + node.len() + 8
}

/// Most nodes whose numbering [`Received`] follows.
const MAX_NODES_SEEN: usize = 1024;

/// The numbers of the NATS messages received from each other node, as far as gaps go.
#[derive(Default)]
struct Received {
    /// Per node: its incarnation, the highest number received from it, and the latest gaps.
    nodes: HashMap<String, (u64, u64, Gaps)>,
}

impl Received {
    /// Notes `batch`; returns the gaps to report with its acknowledgement. The first message
    /// seen from a node's incarnation (this node restarted, or it did) counts everything
    /// numbered before it as not received: what was on its way to this node's previous run
    /// was lost with it.
    fn saw(&mut self, batch: &Batch) -> Gaps {
        // Node names come from the network: a bounded map, started afresh if something
        // invents names (every node then counts as first seen again).
        if self.nodes.len() >= MAX_NODES_SEEN && !self.nodes.contains_key(&batch.node) {
            self.nodes.clear();
        }
        let seen = match self.nodes.get_mut(&batch.node) {
            Some(seen) => seen,
            None => self.nodes.entry(batch.node.clone()).or_default(),
        };
        let (incarnation, last, gaps) = seen;
        if *incarnation != batch.incarnation {
            (*incarnation, *last, *gaps) = (batch.incarnation, 0, Gaps::default());
        }
        if batch.number > last.saturating_add(1) {
            gaps.push(*last + 1, batch.number - 1);
        }
        *last = (*last).max(batch.number);
        *gaps
    }

    /// Notes `batch` as received but dropped: it is reported as never received.
    fn dropped(&mut self, batch: &Batch) -> Gaps {
        self.saw(batch);
        match self.nodes.get_mut(&batch.node) {
            Some((_, _, gaps)) => {
                gaps.push(batch.number, batch.number);
                *gaps
            }
            None => Gaps::default(),
        }
    }
}

/// Whether `batch` arrived past its deadline, at `now` (ms since the Unix epoch).
fn too_late(batch: &Batch, now: u64) -> bool {
    batch.deliver_by != 0 && now > batch.deliver_by
}

/// The wall clock, in ms since the Unix epoch (0 if it is set before it).
fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Where a batch head's deadline sits: right after its number.
fn deliver_by_at(node: &str) -> usize {
    number_at(node) + 8
}

/// Who to tell about a forwarded message: an owned [`Origin`].
#[derive(Clone, Debug)]
struct ReplyTo {
    node: String,
    canonical: String,
    token: u64,
    keyed: bool,
}

impl From<&Origin<'_>> for ReplyTo {
    fn from(origin: &Origin<'_>) -> ReplyTo {
        ReplyTo {
            node: origin.node.to_owned(),
            canonical: origin.canonical.to_owned(),
            token: origin.token,
            keyed: origin.keyed,
        }
    }
}

/// A forwarded message parked for a receiver whose outbox was full.
#[derive(Debug)]
struct Parked {
    body: Bytes,
    reply_to: ReplyTo,
    /// Its sender, for a key holder's receipt.
    sender: Arc<SenderRef>,
}

/// The sender of a forwarded message as the router keeps it (for receipts, and stored with
/// what a key holder did not acknowledge): the previous one's if the same, so a busy sender's
/// messages share one.
fn sender_of(last: &mut Option<Arc<SenderRef>>, origin: &Origin<'_>) -> Arc<SenderRef> {
    match last {
        Some(sender)
            if sender.token == origin.token
                && sender.canonical == origin.canonical
                && sender.keyed == origin.keyed
                && sender.receipt == origin.v2 =>
        {
            sender.clone()
        }
        _ => last
            .insert(Arc::new(SenderRef {
                canonical: origin.canonical.to_owned(),
                token: origin.token,
                keyed: origin.keyed,
                receipt: origin.v2,
            }))
            .clone(),
    }
}

/// What the receiving side holds back: messages for full receivers, parked so that the link
/// keeps flowing for everyone else, each receiver's in the order they came. A parked message
/// is in this node's hands, as one queued in an outbox is: its NATS message is acknowledged,
/// and its sender is told if it is refused in the end.
#[derive(Debug, Default)]
struct Parking {
    queues: HashMap<String, std::collections::VecDeque<Arc<Parked>>>,
    /// Bytes parked, all receivers together (at most [`PARKED_BYTES`]).
    bytes: usize,
}

/// The most bytes of forwarded messages parked for full receivers on this node; past it, a
/// message for a full receiver is refused at once (`NotDelivered`, its sender told), as one
/// for a receiver not keeping up is on one server.
const PARKED_BYTES: usize = 4 << 20;

/// The link. See the module docs.
pub(crate) struct Link {
    node: Arc<str>,
    incarnation: u64,
    client: async_nats::Client,
    online: kv::Store,
    nodes: kv::Store,
    lease: Duration,
    /// See [`ClusterConfig::outage_wait`](super::ClusterConfig::outage_wait).
    outage_wait: Duration,
    state: Arc<LinkState>,
    view: RwLock<View>,
    /// Bumped whenever `view` changes and every sweep (see [`Peers::stamp`]).
    stamp: std::sync::atomic::AtomicU64,
    held: Mutex<Holdings>,
    /// What is queued for each node, filled by the senders, published by one task.
    queues: Mutex<HashMap<Arc<str>, NodeQueue>>,
    /// Wakes that task.
    queued: Notify,
    router: OnceLock<Weak<LocalRouter>>,
    send_wait: OnceLock<Duration>,
    /// The most bytes of records in one NATS message.
    batch_bytes: usize,
    /// What each node has not yet acknowledged, oldest first.
    unacked: Mutex<HashMap<Arc<str>, std::collections::VecDeque<Unacked>>>,
    /// Bytes of chat messages queued or unacknowledged (see [`WINDOW`]).
    inflight: std::sync::atomic::AtomicUsize,
    /// Wakes senders waiting for the window.
    room: Notify,
    /// Forwarded messages waiting for full receivers here.
    parking: Mutex<Parking>,
    me: Weak<Link>,
    stop: CancellationToken,
    tasks: TaskTracker,
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Link").field("node", &self.node).finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn unavailable(e: impl std::fmt::Display) -> Refused {
    Refused::Unavailable(format!("the cluster's NATS: {e}"))
}

/// When an entry was written, as an instant on this machine (its age by the NATS server's
/// clock, so a lease replayed at start is not taken as fresh).
fn written_at(entry: &kv::Entry) -> Instant {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i128);
    let age = u64::try_from((now - entry.created.unix_timestamp_nanos()).max(0)).unwrap_or(0);
    Instant::now().checked_sub(Duration::from_nanos(age)).unwrap_or_else(Instant::now)
}

/// A bucket holds nothing, so a watch of it has nothing to catch up on.
async fn is_empty(kv: &kv::Store) -> bool {
    kv.status().await.is_ok_and(|status| status.values() == 0)
}

/// A random incarnation: a node restarted under the same name is told apart from its past.
fn incarnation() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.write_u32(std::process::id());
    h.finish() | 1
}

impl Link {
    /// Starts following the buckets (returning once the view has caught up) and renewing the
    /// lease.
    pub(crate) async fn start(parts: Parts) -> Result<Arc<Link>, String> {
        let link = Arc::new_cyclic(|me| Link {
            node: Arc::from(parts.node.as_str()),
            incarnation: incarnation(),
            client: parts.client,
            online: parts.online,
            nodes: parts.nodes,
            lease: parts.lease,
            outage_wait: parts.outage_wait,
            state: parts.state,
            view: RwLock::default(),
            stamp: std::sync::atomic::AtomicU64::new(0),
            held: Mutex::default(),
            queues: Mutex::default(),
            queued: Notify::new(),
            router: OnceLock::new(),
            send_wait: OnceLock::new(),
            batch_bytes: BATCH_BYTES.min(parts.max_payload / 2).max(4096),
            unacked: Mutex::default(),
            inflight: std::sync::atomic::AtomicUsize::new(0),
            room: Notify::new(),
            parking: Mutex::default(),
            me: me.clone(),
            stop: CancellationToken::new(),
            tasks: TaskTracker::new(),
        });
        link.state.up.store(true, Ordering::Release);
        link.refuse_a_live_namesake().await?;
        // The lease first: this node is alive before it claims anything.
        link.nodes
            .put(link.node.as_ref(), encode_lease(link.incarnation))
            .await
            .map_err(|e| format!("could not write this node's lease: {e}"))?;
        let (nodes_ready, presence_ready) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
        let (nodes, online) = (link.nodes.clone(), link.online.clone());
        // Leases are kept across restarts of the watch: they are renewed often, and expire
        // by the time they carry.
        let keep = |_: &Link| {};
        let follow_leases =
            link.clone().follow(nodes, "leases", nodes_ready.clone(), keep, Link::lease_changed);
        let follow_online = link.clone().follow(
            online,
            "presence",
            presence_ready.clone(),
            Link::presence_restarted,
            Link::presence_changed,
        );
        link.tasks.spawn(follow_leases);
        link.tasks.spawn(follow_online);
        let caught_up = async {
            nodes_ready.notified().await;
            presence_ready.notified().await;
        };
        if tokio::time::timeout(Duration::from_secs(10), caught_up).await.is_err() {
            link.stop.cancel();
            return Err("could not read who is online in the cluster within 10 s".into());
        }
        link.tasks.spawn(link.clone().renew_lease());
        link.tasks.spawn(link.clone().reassert_after_reconnects());
        link.forget_previous_run().await;
        tracing::info!(node = %link.node, lease = ?link.lease, "joined the cluster");
        Ok(link)
    }

    /// Refuses to start if a running node already uses this node's name (two nodes sharing a
    /// subject and each other's names would corrupt both). A lease left by an earlier run of
    /// this node is told apart by not being renewed: this waits up to half the lease (a live
    /// node renews every quarter) when such a lease is there.
    async fn refuse_a_live_namesake(&self) -> Result<(), String> {
        let read = || async {
            match self.nodes.entry(self.node.to_string()).await {
                Ok(Some(e)) if e.operation == Operation::Put => Ok(Some(e.revision)),
                Ok(_) => Ok(None),
                Err(e) => Err(format!("could not read the nodes' leases: {e}")),
            }
        };
        let Some(first) = read().await? else { return Ok(()) };
        let deadline = Instant::now() + self.lease / 2;
        while Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
            match read().await? {
                Some(revision) if revision != first => {
                    return Err(format!(
                        "node name {} is in use by a running node; give this one another --node",
                        self.node
                    ));
                }
                Some(_) => {}
                None => return Ok(()),
            }
        }
        Ok(())
    }

    /// This node's name.
    pub(crate) fn node(&self) -> &str {
        &self.node
    }

    /// Connects the link to this node's router: forwarded records are taken in from here on.
    pub(crate) async fn attach(
        self: &Arc<Self>,
        router: &Arc<LocalRouter>,
        send_wait: Duration,
    ) -> Result<(), String> {
        let _ = self.router.set(Arc::downgrade(router));
        let _ = self.send_wait.set(send_wait);
        let subscriber = self
            .client
            .subscribe(layout::node_subject(&self.node))
            .await
            .map_err(|e| format!("could not subscribe to this node's subject: {e}"))?;
        self.tasks.spawn(self.clone().receive(subscriber));
        self.tasks.spawn(self.clone().forward_out());
        // What was published so far reaches the server before the first client is served.
        let _ = self.client.flush().await;
        Ok(())
    }

    fn router(&self) -> Option<Arc<LocalRouter>> {
        self.router.get().and_then(Weak::upgrade)
    }

    /// Names this node held in a previous run (same node name, another incarnation) are
    /// freed at once rather than after the lease.
    async fn forget_previous_run(&self) {
        let stale: Vec<String> = {
            let view = self.view.read().unwrap_or_else(PoisonError::into_inner);
            view.by_key
                .iter()
                .filter(|(_, p)| *p.node == *self.node && p.incarnation != self.incarnation)
                .map(|(k, _)| k.clone())
                .collect()
        };
        for key in stale {
            if let Ok(Some(entry)) = self.online.entry(key.clone()).await
                && entry.operation == Operation::Put
                && Presence::decode(&entry.value)
                    .is_ok_and(|p| *p.node == *self.node && p.incarnation != self.incarnation)
            {
                let _ = self.online.delete_expect_revision(&key, Some(entry.revision)).await;
            }
        }
    }

    /// Renews this node's lease every quarter of it.
    async fn renew_lease(self: Arc<Self>) {
        let mut tick = tokio::time::interval(self.lease / 4);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut failing = false;
        loop {
            tokio::select! {
                () = self.stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            match self.nodes.put(self.node.as_ref(), encode_lease(self.incarnation)).await {
                Ok(_) if failing => {
                    failing = false;
                    tracing::info!("the node's lease is renewed again");
                }
                Ok(_) => {}
                Err(e) if !failing => {
                    failing = true;
                    tracing::warn!(error = %e, "could not renew the node's lease; past {:?} other nodes may take over its names", self.lease);
                }
                Err(_) => {}
            }
        }
    }

    /// Follows a bucket: calls `restart` each time its watch (re)starts, then `apply` for
    /// every entry, from what is there to every change; notifies `ready` once it has read
    /// what was there. A watch that ends (NATS gone) is started again a second later.
    async fn follow(
        self: Arc<Self>,
        kv: kv::Store,
        what: &'static str,
        ready: Arc<Notify>,
        restart: fn(&Link),
        apply: fn(&Link, &kv::Entry),
    ) {
        let mut ready = Some(ready);
        while !self.stop.is_cancelled() {
            match kv.watch_with_history(">").await {
                Ok(mut watch) => {
                    restart(&self);
                    if is_empty(&kv).await
                        && let Some(ready) = ready.take()
                    {
                        ready.notify_one();
                    }
                    loop {
                        let entry = tokio::select! {
                            () = self.stop.cancelled() => return,
                            entry = watch.next() => entry,
                        };
                        let Some(Ok(entry)) = entry else { break };
                        apply(&self, &entry);
                        if entry.delta == 0
                            && let Some(ready) = ready.take()
                        {
                            ready.notify_one();
                        }
                    }
                }
                Err(e) => tracing::warn!(error = %e, bucket = what, "could not watch; retrying"),
            }
            tokio::select! {
                () = self.stop.cancelled() => return,
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }

    /// Reads the presence bucket afresh: what was deleted while its watch was down is not
    /// replayed.
    fn presence_restarted(&self) {
        let mut view = self.view.write().unwrap_or_else(PoisonError::into_inner);
        let nodes = std::mem::take(&mut view.nodes);
        *view = View { nodes, ..View::default() };
        self.stamp.fetch_add(1, Ordering::AcqRel);
    }

    /// A node's lease was renewed, or removed.
    fn lease_changed(&self, entry: &kv::Entry) {
        let mut view = self.view.write().unwrap_or_else(PoisonError::into_inner);
        match entry.operation {
            Operation::Put => match decode_lease(&entry.value) {
                Ok(incarnation) => {
                    view.nodes.insert(entry.key.clone(), (incarnation, written_at(entry)));
                }
                Err(_) => tracing::warn!(node = %entry.key, "unreadable lease"),
            },
            Operation::Delete | Operation::Purge => {
                view.nodes.remove(&entry.key);
            }
        }
        self.stamp.fetch_add(1, Ordering::AcqRel);
    }

    fn presence_changed(&self, entry: &kv::Entry) {
        let presence = match entry.operation {
            Operation::Put => match Presence::decode(&entry.value) {
                Ok(presence) => Some(presence),
                Err(_) => {
                    tracing::warn!(key = %entry.key, "unreadable presence entry; ignored");
                    None
                }
            },
            Operation::Delete | Operation::Purge => None,
        };
        // A name this node holds, taken over elsewhere (after this node's lease lapsed): its
        // holder here loses it.
        let moved = presence.as_ref().and_then(|p| {
            let mut held = lock(&self.held);
            let canonical = held.by_key.get(&entry.key)?.clone();
            let mine = held.by_name.get(&canonical)?;
            let ours =
                *p.node == *self.node && p.incarnation == self.incarnation && p.token == mine.token;
            if ours || entry.revision <= mine.revision {
                return None;
            }
            let (token, displaced) = (mine.token, mine.guest && !p.guest);
            held.by_name.remove(&canonical);
            held.by_key.remove(&entry.key);
            Some((canonical, token, p.node.clone(), displaced))
        });
        if let Some((canonical, token, node, displaced)) = moved
            && let Some(router) = self.router()
        {
            if displaced {
                // The key holder's node sends the same eviction; whichever arrives first.
                let detail = format!("{canonical} now belongs to a key; you were a guest");
                router.evict(&canonical, token, Status::NameOwned, &detail);
            } else {
                tracing::warn!(name = %canonical, %node, "a name held here was claimed on another node (this node's lease had lapsed); disconnecting its holder");
                let detail = format!(
                    "{canonical} was claimed through another server of the cluster while this one was cut off"
                );
                router.evict(&canonical, token, Status::NameTaken, &detail);
            }
        }
        let mut view = self.view.write().unwrap_or_else(PoisonError::into_inner);
        match presence {
            Some(presence) => view.put(entry.key.clone(), presence),
            None => view.remove(&entry.key),
        }
        self.stamp.fetch_add(1, Ordering::AcqRel);
    }

    /// After NATS comes back, checks every name this node holds is still its own in the
    /// presence bucket (writing it again if it is gone), and disconnects the holders of those
    /// that moved.
    async fn reassert_after_reconnects(self: Arc<Self>) {
        loop {
            tokio::select! {
                () = self.stop.cancelled() => return,
                () = self.state.reconnected.notified() => {}
            }
            self.state.lost.store(false, Ordering::Release);
            self.probe_after_reconnect();
            let held: Vec<(String, String, u64, Bytes)> = lock(&self.held)
                .by_name
                .iter()
                .map(|(c, h)| (c.clone(), h.key.clone(), h.token, h.value.clone()))
                .collect();
            let count = held.len();
            for (canonical, key, token, value) in held {
                let current = match self.online.entry(key.clone()).await {
                    Ok(current) => current,
                    Err(e) => {
                        tracing::warn!(error = %e, "could not re-assert names; will retry after the next reconnect");
                        self.state.lost.store(true, Ordering::Release);
                        break;
                    }
                };
                let revision = match current {
                    Some(e) if e.operation == Operation::Put => {
                        if e.value == value {
                            Some(e.revision)
                        } else {
                            None
                        }
                    }
                    _ => self.online.create(&key, value.clone()).await.ok(),
                };
                match revision {
                    Some(revision) => {
                        if let Some(h) = lock(&self.held).by_name.get_mut(&canonical) {
                            h.revision = revision;
                        }
                    }
                    None => {
                        let detail = format!(
                            "{canonical} was claimed through another server of the cluster while this one was cut off"
                        );
                        if let Some(router) = self.router() {
                            router.evict(&canonical, token, Status::NameTaken, &detail);
                        }
                        let mut held = lock(&self.held);
                        held.by_name.remove(&canonical);
                        held.by_key.remove(&key);
                    }
                }
            }
            tracing::info!(names = count, "re-asserted this node's names");
        }
    }

    /// Sends an empty NATS message to every node that owes this one acknowledgements: each
    /// acknowledges it with everything it got before it and the gaps, which settles the fate
    /// of what was on its way when the link dropped (their acknowledgements, sent while this
    /// node was away, were lost; what sat in the client's buffer was sent before this).
    fn probe_after_reconnect(&self) {
        let owed: Vec<Arc<str>> = lock(&self.unacked)
            .iter()
            .filter(|(_, queue)| !queue.is_empty())
            .map(|(node, _)| node.clone())
            .collect();
        for node in owed {
            self.append(&node, |_| Ok(()), None);
        }
    }

    /// Takes in what other nodes forward here.
    async fn receive(self: Arc<Self>, mut subscriber: async_nats::Subscriber) {
        let mut received = Received::default();
        let mut last_sender = None;
        let mut routes = RouteCache::default();
        loop {
            let message = tokio::select! {
                () = self.stop.cancelled() => return,
                message = subscriber.next() => message,
            };
            let Some(message) = message else { return };
            let Some(router) = self.router() else { return };
            let Ok((batch, start)) = Batch::decode(&message.payload) else {
                tracing::warn!("a malformed message from the cluster was dropped");
                continue;
            };
            let (records, malformed) = Record::decode_all(&message.payload, start);
            if malformed.is_some() {
                tracing::warn!(node = %batch.node, "a malformed record from the cluster was dropped");
            }
            // Held up past its deadline (in a NATS client's buffer through a long outage):
            // its senders are told, or will be, that it was not delivered, so it is not.
            let late = too_late(&batch, unix_ms());
            let mut dropped = 0usize;
            for record in records {
                match record {
                    Record::Deliver { .. } if late => dropped += 1,
                    Record::Deliver { recipient, origin, body } => {
                        let sender = sender_of(&mut last_sender, &origin);
                        // Behind messages already parked for this receiver, in order.
                        let behind = lock(&self.parking).queues.contains_key(recipient);
                        let forwarded = match behind {
                            true => Forwarded::Full,
                            false => {
                                router.try_deliver_forwarded(recipient, body, &sender, &mut routes)
                            }
                        };
                        match forwarded {
                            Forwarded::Queued => {}
                            Forwarded::Refused(reply) => {
                                self.reply_to(&ReplyTo::from(&origin), &reply)
                            }
                            Forwarded::Full => {
                                if !self.park(recipient, body, &origin, sender)
                                    && let Some(reply) = router.refuse_forwarded(body)
                                {
                                    self.reply_to(&ReplyTo::from(&origin), &reply);
                                }
                            }
                        }
                    }
                    Record::Tell { canonical, token, keyed, body } => {
                        router.tell_forwarded(canonical, token, keyed, body);
                    }
                    Record::Evict { canonical, token, status, detail } => {
                        router.evict(canonical, token, Status::from_index(status), detail);
                    }
                    Record::Ack { incarnation, upto, lost } if incarnation == self.incarnation => {
                        self.acked(&batch.node, upto, &lost);
                    }
                    Record::Ack { .. } => {}
                }
            }
            // Everything in it is in this node's hands (queued for its receivers, parked, or
            // answered). Numbers skipped since the last message from that node never arrived
            // (a NATS connection died with them; or they were never sent, when that node's
            // link was down): say so, or the cumulative acknowledgement would cover them.
            let lost = match late {
                true => {
                    tracing::warn!(node = %batch.node, messages = dropped,
                        "forwarded messages arrived after their deadline and were dropped; their senders are told they were not delivered");
                    received.dropped(&batch)
                }
                false => received.saw(&batch),
            };
            let ack = Record::Ack { incarnation: batch.incarnation, upto: batch.number, lost };
            self.send(&batch.node, &ack);
        }
    }

    /// Parks a message for `recipient`, whose outbox is full, starting its drain if it is the
    /// first; false if the parking is full.
    fn park(
        &self,
        recipient: &str,
        body: &[u8],
        origin: &Origin<'_>,
        sender: Arc<SenderRef>,
    ) -> bool {
        let first = {
            let mut parking = lock(&self.parking);
            if parking.bytes + body.len() > PARKED_BYTES {
                return false;
            }
            parking.bytes += body.len();
            let parked = Parked {
                body: Bytes::copy_from_slice(body),
                reply_to: ReplyTo::from(origin),
                sender,
            };
            let first = !parking.queues.contains_key(recipient);
            parking.queues.entry(recipient.to_owned()).or_default().push_back(Arc::new(parked));
            first
        };
        if first && let Some(link) = self.me.upgrade() {
            self.tasks.spawn(link.drain_parked(recipient.to_owned()));
        }
        true
    }

    /// Delivers what is parked for `recipient`, in order, each waiting up to the send wait
    /// for room (then refused, its sender told).
    async fn drain_parked(self: Arc<Self>, recipient: String) {
        loop {
            let next = {
                let mut parking = lock(&self.parking);
                let next = parking.queues.get(&recipient).and_then(|q| q.front().cloned());
                if next.is_none() {
                    parking.queues.remove(&recipient);
                }
                next
            };
            let Some(parked) = next else { return };
            let Some(router) = self.router() else { return };
            let delivered = tokio::select! {
                () = self.stop.cancelled() => return,
                delivered = router.deliver_forwarded(&recipient, &parked.body, &parked.sender) => delivered,
            };
            if let Err(reply) = delivered {
                self.reply_to(&parked.reply_to, &reply);
            }
            let mut parking = lock(&self.parking);
            if let Some(queue) = parking.queues.get_mut(&recipient) {
                queue.pop_front();
            }
            parking.bytes = parking.bytes.saturating_sub(parked.body.len());
        }
    }

    /// `node` took in everything numbered up to `upto`, except the numbers in `lost`: their
    /// senders are told their messages were not delivered (first, so a cumulative
    /// acknowledgement never counts a message that never arrived as taken in).
    fn acked(&self, node: &str, upto: u64, lost: &Gaps) {
        let (mut freed, mut failed) = (0, Vec::new());
        {
            let mut unacked = lock(&self.unacked);
            if let Some(queue) = unacked.get_mut(node) {
                // The gaps are repeated in every acknowledgement: look through the queue only
                // if one reaches what is still waiting.
                if queue.front().is_some_and(|first| lost.reaches(first.number)) {
                    queue.retain_mut(|u| {
                        if !lost.contains(u.number) {
                            return true;
                        }
                        failed.append(&mut u.pending);
                        freed += u.bytes;
                        false
                    });
                }
                while queue.front().is_some_and(|u| u.number <= upto) {
                    freed += queue.pop_front().map_or(0, |u| u.bytes);
                }
            }
        }
        self.free(freed);
        if !failed.is_empty() {
            tracing::warn!(%node, messages = failed.len(),
                "forwarded messages never reached the other node; their senders are told");
            self.fail(failed, "its server never got it");
        }
    }

    /// `bytes` of the window are free again.
    fn free(&self, bytes: usize) {
        if bytes > 0 {
            self.inflight.fetch_sub(bytes, Ordering::AcqRel);
            self.room.notify_waiters();
        }
    }

    /// Tells the senders of `pending` their messages were not delivered.
    fn fail(&self, pending: Vec<Pending>, why: &str) {
        let Some(router) = self.router() else { return };
        for p in pending {
            let detail =
                format!("{} is on another node and {why}; the message was not delivered", p.to);
            let reply = Message::reply(p.id, Status::NotDelivered, &*p.to, detail);
            router.tell_here(&p.sender, &reply.as_ref());
        }
    }

    /// Fails what has waited past [`ACK_TIMEOUT`] for its acknowledgement while the link was
    /// up (counted from the last reconnect for what was sent before it), or past the outage
    /// wait in all.
    fn expire_unacked(&self) {
        let (mut expired, mut freed) = (Vec::new(), 0);
        let up_since = *lock(&self.state.up_since);
        let up = self.state.up.load(Ordering::Acquire);
        let overdue = |u: &Unacked| {
            let waited = u.sent.elapsed();
            if waited > self.outage_wait {
                return true;
            }
            if !up {
                // The wait goes on: what was buffered is sent on reconnecting.
                return false;
            }
            // Sent before the last reconnect: its wait counts from the reconnect.
            let since = up_since.filter(|&since| since > u.sent).map_or(waited, |s| s.elapsed());
            since > ACK_TIMEOUT
        };
        {
            let mut unacked = lock(&self.unacked);
            for queue in unacked.values_mut() {
                while queue.front().is_some_and(overdue) {
                    if let Some(u) = queue.pop_front() {
                        expired.extend(u.pending);
                        freed += u.bytes;
                    }
                }
            }
        }
        self.free(freed);
        if !expired.is_empty() {
            tracing::warn!(
                messages = expired.len(),
                "forwarded messages were not acknowledged in time; their senders are told they were not delivered"
            );
            self.fail(expired, "its server did not confirm taking it");
        }
    }

    /// Queues `record` (not a chat message: a reply, an acknowledgement, an eviction) for
    /// `node`. These are not held back by the window: they are what frees it.
    fn send(&self, node: &str, record: &Record<'_>) {
        self.append(
            node,
            |out| {
                record.encode_into(out);
                Ok(())
            },
            None,
        );
    }

    /// Sends `reply` (about a message it forwarded) back to `origin`'s node.
    fn reply_to(&self, to: &ReplyTo, reply: &Message) {
        self.send_tell(&to.node, &to.canonical, to.token, to.keyed, &reply.as_ref());
    }

    /// Sends `msg` to `node` for the sender `canonical` (registration `token`) there; false if
    /// it does not encode.
    fn send_tell(
        &self,
        node: &str,
        canonical: &str,
        token: u64,
        keyed: bool,
        msg: &MessageRef<'_>,
    ) -> bool {
        let Some(body) = crate::router::stored_body(msg) else { return false };
        self.send(node, &Record::Tell { canonical, token, keyed, body: &body });
        true
    }

    /// Writes a record for `node` into the NATS message being filled for it (starting one,
    /// or sealing a full one, as needed) and wakes the publisher. `write` may fail, leaving
    /// nothing written. A chat message's `pending` is counted in the window.
    fn append(
        &self,
        node: &str,
        write: impl FnOnce(&mut BytesMut) -> Result<(), relay_proto::ProtoError>,
        pending: Option<Pending>,
    ) -> bool {
        let mut queues = lock(&self.queues);
        if !queues.contains_key(node) {
            queues.insert(Arc::from(node), NodeQueue::default());
        }
        let Some(queue) = queues.get_mut(node) else { return false };
        // The publisher is woken for the first record of a NATS message only: it takes the
        // whole message, with whatever was added after that wake-up.
        let fresh = queue.filling.is_none();
        let filling = queue.filling.get_or_insert_with(|| {
            let mut payload = BytesMut::with_capacity(self.batch_bytes.min(64 * 1024));
            let head = Batch {
                node: self.node.to_string(),
                incarnation: self.incarnation,
                number: 0,
                deliver_by: 0,
            };
            head.encode_into(&mut payload);
            Filling { payload, pending: Vec::new(), pending_bytes: 0 }
        });
        let before = filling.payload.len();
        if write(&mut filling.payload).is_err() {
            filling.payload.truncate(before);
            if fresh {
                // Nothing in it: no publisher was woken for it.
                queue.filling = None;
            }
            return false;
        }
        if let Some(pending) = pending {
            let bytes = filling.payload.len() - before;
            filling.pending.push(pending);
            filling.pending_bytes += bytes;
            self.inflight.fetch_add(bytes, Ordering::AcqRel);
        }
        if filling.payload.len() >= self.batch_bytes
            && let Some(full) = queue.filling.take()
        {
            queue.sealed.push_back(full);
        }
        drop(queues);
        if fresh {
            self.queued.notify_one();
        }
        true
    }

    /// Publishes what is queued, as many records per NATS message as are waiting for one
    /// node, and fails what other nodes do not acknowledge in time.
    async fn forward_out(self: Arc<Self>) {
        let mut sweep = tokio::time::interval(Duration::from_millis(250));
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = self.stop.cancelled() => return,
                _ = sweep.tick() => {
                    self.expire_unacked();
                    // Routes found before now are looked at again: a lease may have lapsed.
                    self.stamp.fetch_add(1, Ordering::AcqRel);
                    continue;
                }
                () = self.queued.notified() => {}
            }
            // One yield: senders woken with this task add to the messages before they go,
            // so a busy link sends fewer, fuller NATS messages (no added wait when idle).
            tokio::task::yield_now().await;
            loop {
                let ready: Vec<(Arc<str>, u64, Filling)> = {
                    let mut queues = lock(&self.queues);
                    let mut ready = Vec::new();
                    for (node, queue) in queues.iter_mut() {
                        if let Some(filling) = queue.filling.take() {
                            queue.sealed.push_back(filling);
                        }
                        while let Some(mut filling) = queue.sealed.pop_front() {
                            queue.number += 1;
                            let at = number_at(&self.node);
                            filling.payload[at..at + 8]
                                .copy_from_slice(&queue.number.to_le_bytes());
                            ready.push((node.clone(), queue.number, filling));
                        }
                    }
                    ready
                };
                if ready.is_empty() {
                    break;
                }
                for (node, number, filling) in ready {
                    self.publish(&node, number, filling).await;
                }
            }
        }
    }

    /// Publishes one NATS message; its chat messages wait for their acknowledgement.
    async fn publish(&self, node: &Arc<str>, number: u64, filling: Filling) {
        let Filling { mut payload, pending, pending_bytes } = filling;
        if !pending.is_empty() {
            // Its chat messages are failed here after `outage_wait` unacknowledged: the
            // receiver takes them only well before that (a sixth of the wait to spare, for
            // the clocks of the two machines).
            let deadline = unix_ms().saturating_add(
                u64::try_from((self.outage_wait - self.outage_wait / 6).as_millis())
                    .unwrap_or(u64::MAX),
            );
            let at = deliver_by_at(&self.node);
            payload[at..at + 8].copy_from_slice(&deadline.to_le_bytes());
        }
        if !self.state.up.load(Ordering::Acquire) {
            self.free(pending_bytes);
            self.fail(pending, "the cluster link is down");
            return;
        }
        if let Err(e) = self.client.publish(layout::node_subject(node), payload.freeze()).await {
            tracing::warn!(%node, error = %e, "could not forward to another node");
            self.free(pending_bytes);
            self.fail(pending, "the cluster link failed");
            return;
        }
        if !pending.is_empty() {
            let unacked = Unacked { number, sent: Instant::now(), pending, bytes: pending_bytes };
            lock(&self.unacked).entry(node.clone()).or_default().push_back(unacked);
        }
    }

    /// Queues a chat message for `node`, written by `write`, at once if the window has
    /// room; otherwise a future that waits for room, up to the send wait (the message is
    /// encoded now, as it borrows from the sender's frame).
    fn enqueue(
        &self,
        node: &Arc<str>,
        write: impl Fn(&mut BytesMut) -> Result<(), relay_proto::ProtoError>,
        to: &str,
        pending: Pending,
    ) -> Option<Result<Routed, (Undelivered, String)>> {
        if self.inflight.load(Ordering::Acquire) < WINDOW {
            return self.append(node, write, Some(pending)).then_some(Ok(Routed::Queued));
        }
        let mut bytes = BytesMut::new();
        write(&mut bytes).ok()?;
        let (me, to, node) = (self.me.clone(), to.to_owned(), node.clone());
        let wait = self.send_wait.get().copied().unwrap_or(Duration::from_secs(1));
        Some(Ok(Routed::Full(Box::pin(async move {
            let Some(link) = me.upgrade() else { return Err((Undelivered::Unreachable, to)) };
            let deadline = tokio::time::Instant::now() + wait;
            loop {
                let notified = link.room.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                if link.inflight.load(Ordering::Acquire) < WINDOW {
                    break;
                }
                if tokio::time::timeout_at(deadline, notified).await.is_err() {
                    return Err((Undelivered::ReceiverFull, to));
                }
            }
            let copy = |out: &mut BytesMut| {
                out.extend_from_slice(&bytes);
                Ok(())
            };
            link.append(&node, copy, Some(pending));
            Ok(())
        }))))
    }

    /// The holder of `canonical` on another node, if its node is alive.
    fn remote(&self, canonical: &str) -> Option<Arc<Remote>> {
        let view = self.view.read().unwrap_or_else(PoisonError::into_inner);
        let key = view.by_name.get(canonical)?;
        self.remote_at(&view, key)
    }

    fn remote_at(&self, view: &View, key: &str) -> Option<Arc<Remote>> {
        let p = view.by_key.get(key)?;
        let elsewhere = *p.node != *self.node;
        (elsewhere && view.alive(&p.node, p.incarnation, self.lease)).then(|| p.clone())
    }

    /// Whether the node holding `presence` is alive, by its lease in the bucket (not the
    /// view: a claim's decision is made on what NATS says now).
    async fn holder_alive(&self, presence: &Presence) -> Result<bool, Refused> {
        match self.nodes.entry(presence.node.clone()).await.map_err(unavailable)? {
            Some(e) if e.operation == Operation::Put => {
                Ok(decode_lease(&e.value).is_ok_and(|i| i == presence.incarnation))
            }
            _ => Ok(false),
        }
    }

    fn hold(&self, presence: &Presence, key: &str, revision: u64, value: Bytes) {
        let mut held = lock(&self.held);
        let canonical = presence.canonical.clone();
        held.by_key.insert(key.to_owned(), canonical.clone());
        let token = presence.token;
        held.by_name.insert(
            canonical,
            Held { key: key.to_owned(), token, guest: presence.guest, revision, value },
        );
    }

    fn send_evict(&self, node: &str, canonical: &str, token: u64, status: Status, detail: String) {
        let record = Record::Evict { canonical, token, status: status.index(), detail: &detail };
        self.send(node, &record);
    }
}

impl Peers for Link {
    fn claim<'a>(
        &'a self,
        claim: &'a Claim,
        addr: SocketAddr,
    ) -> BoxFuture<'a, Result<(), Refused>> {
        Box::pin(async move {
            if !self.state.up.load(Ordering::Acquire) {
                return Err(Refused::Unavailable(
                    "the cluster's NATS is unreachable; try again in a moment".into(),
                ));
            }
            let display = claim.name().to_string();
            let canonical = claim.canonical().to_owned();
            let skeleton =
                relay_proto::name_key(&display).map_or_else(|_| canonical.clone(), |k| k.skeleton);
            let key = kv_key("on.", &skeleton);
            let presence = Presence {
                node: self.node.to_string(),
                incarnation: self.incarnation,
                token: claim.token(),
                guest: claim.key().is_none(),
                since: now_ms(),
                // As the registry shows it: `1.2.3.4:5`, not `[::ffff:1.2.3.4]:5`.
                addr: crate::registry::canonical_addr(addr),
                canonical: canonical.clone(),
                display,
                version: claim.version(),
            };
            let value = presence.encode();
            for _ in 0..RACES {
                match self.online.create(&key, value.clone()).await {
                    Ok(revision) => {
                        self.hold(&presence, &key, revision, value);
                        return Ok(());
                    }
                    Err(e) if e.kind() == CreateErrorKind::AlreadyExists => {}
                    Err(e) => return Err(unavailable(e)),
                }
                let current = match self.online.entry(key.clone()).await.map_err(unavailable)? {
                    Some(e) if e.operation == Operation::Put => e,
                    _ => continue,
                };
                let holder = Presence::decode(&current.value).ok();
                let mut evict = None;
                if let Some(holder) = holder {
                    let stale_here =
                        *holder.node == *self.node && holder.incarnation == self.incarnation;
                    // This node's own entry can only be stale: its registry let this claim
                    // through, so that holder has left (its release is on the way).
                    if !stale_here && self.holder_alive(&holder).await? {
                        if !(holder.guest && claim.key().is_some()) {
                            return Err(if holder.canonical == canonical {
                                Refused::Taken
                            } else {
                                Refused::LooksLike(holder.display)
                            });
                        }
                        // A key holder displaces a guest, wherever it is.
                        evict = Some(holder);
                    }
                }
                match self.online.update(&key, value.clone(), current.revision).await {
                    Ok(revision) => {
                        self.hold(&presence, &key, revision, value);
                        if let Some(guest) = evict {
                            tracing::info!(name = %guest.display, node = %guest.node, "guest on another node displaced by the name's key holder");
                            let detail =
                                format!("{} now belongs to a key; you were a guest", guest.display);
                            self.send_evict(
                                &guest.node,
                                &guest.canonical,
                                guest.token,
                                Status::NameOwned,
                                detail,
                            );
                        }
                        return Ok(());
                    }
                    Err(e) if e.kind() == UpdateErrorKind::WrongLastRevision => {}
                    Err(e) => return Err(unavailable(e)),
                }
            }
            Err(Refused::Unavailable("the name is being claimed too busily; try again".into()))
        })
    }

    fn release(&self, canonical: &str, token: u64) {
        let held = {
            let mut held = lock(&self.held);
            match held.by_name.get(canonical) {
                Some(h) if h.token == token => {
                    let h = held.by_name.remove(canonical);
                    if let Some(h) = &h {
                        held.by_key.remove(&h.key);
                    }
                    h
                }
                _ => None,
            }
        };
        let Some(held) = held else { return };
        let online = self.online.clone();
        self.tasks.spawn(async move {
            // Only this holder's entry: a later claim's (here or elsewhere) stays.
            if let Err(e) = online.delete_expect_revision(&held.key, Some(held.revision)).await {
                tracing::debug!(error = %e, "presence entry not removed (taken over, or NATS down)");
            }
        });
    }

    fn stamp(&self) -> u64 {
        self.stamp.load(Ordering::Acquire)
    }

    fn route(&self, to: &str) -> Option<PeerRoute> {
        // Taken first: a change while looking makes the route stale at once.
        let stamp = self.stamp();
        let holder = match parse_destination(to) {
            Ok(Destination::Name(name)) => self.remote(&canonical_name(name))?,
            Ok(Destination::Addr(addr)) => {
                let view = self.view.read().unwrap_or_else(PoisonError::into_inner);
                let key = view.by_addr.get(&addr)?;
                self.remote_at(&view, key)?
            }
            Err(_) => return None,
        };
        Some(PeerRoute {
            to: Arc::from(to),
            recipient: holder.canonical.clone(),
            node: holder.node_name.clone(),
            stamp,
        })
    }

    fn forward(
        &self,
        from: &Claim,
        route: &PeerRoute,
        msg: &MessageRef<'_>,
    ) -> Option<Result<Routed, (Undelivered, String)>> {
        let to = &*route.to;
        if !self.state.up.load(Ordering::Acquire) {
            return Some(Err((Undelivered::Unreachable, to.to_owned())));
        }
        let origin = Origin {
            node: &self.node,
            canonical: from.canonical(),
            token: from.token(),
            keyed: from.key().is_some(),
            v2: from.version() >= 2,
        };
        let write =
            |out: &mut BytesMut| Record::encode_deliver(out, &route.recipient, &origin, msg);
        let pending = Pending { sender: from.origin().clone(), id: msg.id, to: route.to.clone() };
        self.enqueue(&route.node, write, to, pending)
    }

    fn tell(&self, sender: &SenderRef, msg: &MessageRef<'_>) -> bool {
        let Some(holder) = self.remote(&sender.canonical) else { return false };
        if !sender.keyed && holder.token != sender.token {
            return false;
        }
        self.send_tell(&holder.node_name, &sender.canonical, sender.token, sender.keyed, msg)
    }

    fn users(&self) -> Vec<(Arc<str>, SocketAddr)> {
        let view = self.view.read().unwrap_or_else(PoisonError::into_inner);
        view.by_key
            .keys()
            .filter_map(|key| self.remote_at(&view, key))
            .map(|p| (Arc::from(p.display.as_str()), p.addr))
            .collect()
    }

    fn kick(&self, name: &str, detail: &str) -> bool {
        let Some(holder) = self.remote(&canonical_name(name)) else { return false };
        self.send_evict(
            &holder.node,
            &holder.canonical,
            holder.token,
            Status::Kicked,
            detail.to_owned(),
        );
        true
    }

    fn who(&self, name: &str) -> Option<Who> {
        let holder = self.remote(&canonical_name(name))?;
        let p = &holder.presence;
        Some(Who::remote(p.display.clone(), p.addr, p.node.clone(), p.since, p.version))
    }

    fn connected(&self) -> bool {
        self.state.up.load(Ordering::Acquire)
    }

    fn close(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            // Whatever is still held (clients that did not finish leaving) is given up now.
            let held: Vec<Held> = {
                let mut held = lock(&self.held);
                held.by_key.clear();
                held.by_name.drain().map(|(_, h)| h).collect()
            };
            // Bounded: with NATS down, each request would wait for its timeout, and the names
            // and the lease lapse by themselves anyway.
            let up = self.state.up.load(Ordering::Acquire);
            let deletes = async {
                for h in held {
                    let _ = self.online.delete_expect_revision(&h.key, Some(h.revision)).await;
                }
            };
            if up && tokio::time::timeout(Duration::from_secs(5), deletes).await.is_err() {
                tracing::warn!(
                    "not every name was removed from the cluster in time; they lapse with the lease"
                );
            }
            // The releases already under way, then the lease: other nodes see this one gone.
            self.stop.cancel();
            self.tasks.close();
            let _ = tokio::time::timeout(Duration::from_secs(3), self.tasks.wait()).await;
            if up {
                let lease = self.nodes.delete(self.node.as_ref());
                if !matches!(tokio::time::timeout(Duration::from_secs(3), lease).await, Ok(Ok(())))
                {
                    tracing::debug!("lease not removed; it lapses by itself");
                }
                let _ = tokio::time::timeout(Duration::from_secs(3), self.client.flush()).await;
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(node: &str, incarnation: u64, number: u64) -> Batch {
        Batch { node: node.into(), incarnation, number, deliver_by: 0 }
    }

    /// Numbers skipped are reported, per node and incarnation; the first message from a new
    /// incarnation of a node, or the first one seen at all, reports everything before it.
    #[test]
    fn received_numbers_report_their_gaps() {
        let mut received = Received::default();
        assert!(received.saw(&batch("a", 1, 1)).is_empty());
        assert!(received.saw(&batch("a", 1, 2)).is_empty());
        let gaps = received.saw(&batch("a", 1, 5));
        assert!(gaps.contains(3) && gaps.contains(4) && !gaps.contains(2) && !gaps.contains(5));
        // Repeated with later acknowledgements, in case one is lost.
        assert!(received.saw(&batch("a", 1, 6)).contains(4));
        // Another node's numbers are its own; one first seen at 3 lost 1 and 2.
        let other = received.saw(&batch("b", 9, 3));
        assert!(other.contains(1) && other.contains(2) && !other.contains(3));
        // Node a restarted: numbering starts again, and so do its gaps.
        assert!(received.saw(&batch("a", 2, 1)).is_empty());
        // Messages dropped on arrival (too late) are reported as never received, in one
        // range however many follow each other, and the ones after them are not.
        received.saw(&batch("a", 2, 2));
        for n in 3..=12 {
            received.dropped(&batch("a", 2, n));
        }
        let gaps = received.saw(&batch("a", 2, 13));
        assert!((3..=12).all(|n| gaps.contains(n)) && !gaps.contains(2) && !gaps.contains(13));
    }

    /// A message's chat messages are dropped once its deadline has passed, on the receiver's
    /// clock; a message without one is never too late.
    #[test]
    fn a_batch_past_its_deadline_is_too_late() {
        let at = |deliver_by| Batch { deliver_by, ..batch("a", 1, 1) };
        assert!(!too_late(&at(0), u64::MAX));
        assert!(!too_late(&at(1_000), 1_000));
        assert!(too_late(&at(1_000), 1_001));
    }
}
