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
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::layout;
use super::wire::{Batch, Origin, Presence, Record, decode_lease, encode_lease, kv_key};
use crate::inbox::SenderRef;
use crate::router::{Claim, LocalRouter, Peers, Refused, Routed, Undelivered, Who, now_ms};

/// How many times a claim reads again after losing a compare-and-set race.
const RACES: usize = 16;

/// Records waiting to be published; past this a sender waits (up to the send wait).
const QUEUE: usize = 8192;

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
}

impl LinkState {
    pub(crate) fn event(&self, event: async_nats::Event) {
        match event {
            async_nats::Event::Connected => {
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

/// Who is online on which node, as the watched buckets say.
#[derive(Debug, Default)]
struct View {
    /// Presence key → entry.
    by_key: HashMap<String, Presence>,
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
        self.by_key.insert(key, presence);
    }

    fn remove(&mut self, key: &str) {
        if let Some(old) = self.by_key.remove(key) {
            if self.by_name.get(&old.canonical).is_some_and(|k| k == key) {
                self.by_name.remove(&old.canonical);
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
    pub(crate) max_payload: usize,
    pub(crate) state: Arc<LinkState>,
}

/// Records for one node.
struct Outgoing {
    node: Arc<str>,
    bytes: Bytes,
    /// A chat message's sender, told if the other node never takes it in.
    pending: Option<Pending>,
}

/// A forwarded chat message not yet acknowledged by the node it went to.
struct Pending {
    sender: Arc<SenderRef>,
    id: u64,
    to: String,
}

/// One NATS message's chat messages, until the receiving node acknowledges it.
struct Unacked {
    number: u64,
    sent: Instant,
    pending: Vec<Pending>,
}

/// How long a forwarded message may go unacknowledged before its sender is told it was not
/// delivered (the other node died, or the link was down that long).
const ACK_TIMEOUT: Duration = Duration::from_secs(5);

/// The NATS message being filled for one node.
struct Open {
    node: Arc<str>,
    number: u64,
    payload: BytesMut,
    pending: Vec<Pending>,
}

impl Open {
    fn new(node: Arc<str>) -> Open {
        Open { node, number: 0, payload: BytesMut::new(), pending: Vec::new() }
    }
}

/// The link. See the module docs.
pub(crate) struct Link {
    node: Arc<str>,
    incarnation: u64,
    client: async_nats::Client,
    online: kv::Store,
    nodes: kv::Store,
    lease: Duration,
    state: Arc<LinkState>,
    view: RwLock<View>,
    held: Mutex<Holdings>,
    out: mpsc::Sender<Outgoing>,
    /// Taken by the forwarder task when the router attaches.
    out_rx: Mutex<Option<mpsc::Receiver<Outgoing>>>,
    router: OnceLock<Weak<LocalRouter>>,
    send_wait: OnceLock<Duration>,
    /// The most bytes of records in one NATS message.
    batch_bytes: usize,
    /// What each node has not yet acknowledged, oldest first.
    unacked: Mutex<HashMap<Arc<str>, std::collections::VecDeque<Unacked>>>,
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
        let (out, out_rx) = mpsc::channel(QUEUE);
        let link = Arc::new(Link {
            node: Arc::from(parts.node.as_str()),
            incarnation: incarnation(),
            client: parts.client,
            online: parts.online,
            nodes: parts.nodes,
            lease: parts.lease,
            state: parts.state,
            view: RwLock::default(),
            held: Mutex::default(),
            out,
            out_rx: Mutex::new(Some(out_rx)),
            router: OnceLock::new(),
            send_wait: OnceLock::new(),
            batch_bytes: BATCH_BYTES.min(parts.max_payload / 2).max(4096),
            unacked: Mutex::default(),
            stop: CancellationToken::new(),
            tasks: TaskTracker::new(),
        });
        link.state.up.store(true, Ordering::Release);
        // The lease first: this node is alive before it claims anything.
        link.nodes
            .put(link.node.as_ref(), encode_lease(link.incarnation))
            .await
            .map_err(|e| format!("could not write this node's lease: {e}"))?;
        let (nodes_ready, presence_ready) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
        link.tasks.spawn(link.clone().watch_nodes(nodes_ready.clone()));
        link.tasks.spawn(link.clone().watch_presence(presence_ready.clone()));
        let caught_up = async {
            nodes_ready.notified().await;
            presence_ready.notified().await;
        };
        if tokio::time::timeout(Duration::from_secs(10), caught_up).await.is_err() {
            return Err("could not read who is online in the cluster within 10 s".into());
        }
        link.tasks.spawn(link.clone().renew_lease());
        link.tasks.spawn(link.clone().reassert_after_reconnects());
        link.forget_previous_run().await;
        tracing::info!(node = %link.node, lease = ?link.lease, "joined the cluster");
        Ok(link)
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
        if let Some(rx) = lock(&self.out_rx).take() {
            self.tasks.spawn(self.clone().forward_out(rx));
        }
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

    /// Follows the lease bucket. Notifies `ready` once it has read what was there.
    async fn watch_nodes(self: Arc<Self>, ready: Arc<Notify>) {
        let mut ready = Some(ready);
        while !self.stop.is_cancelled() {
            match self.nodes.watch_with_history(">").await {
                // Never empty: this node's lease is written before the watch starts.
                Ok(mut watch) => loop {
                    let entry = tokio::select! {
                        () = self.stop.cancelled() => return,
                        entry = watch.next() => entry,
                    };
                    let Some(Ok(entry)) = entry else { break };
                    {
                        let mut view = self.view.write().unwrap_or_else(PoisonError::into_inner);
                        match entry.operation {
                            Operation::Put => match decode_lease(&entry.value) {
                                Ok(incarnation) => {
                                    view.nodes.insert(
                                        entry.key.clone(),
                                        (incarnation, written_at(&entry)),
                                    );
                                }
                                Err(_) => tracing::warn!(node = %entry.key, "unreadable lease"),
                            },
                            Operation::Delete | Operation::Purge => {
                                view.nodes.remove(&entry.key);
                            }
                        }
                    }
                    if entry.delta == 0
                        && let Some(ready) = ready.take()
                    {
                        ready.notify_one();
                    }
                },
                Err(e) => tracing::warn!(error = %e, "could not watch the nodes' leases; retrying"),
            }
            tokio::select! {
                () = self.stop.cancelled() => return,
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }

    /// Follows the presence bucket. Notifies `ready` once it has read what was there.
    async fn watch_presence(self: Arc<Self>, ready: Arc<Notify>) {
        let mut ready = Some(ready);
        while !self.stop.is_cancelled() {
            match self.online.watch_with_history(">").await {
                Ok(mut watch) => {
                    // Read afresh: what was deleted while the watch was down is not replayed.
                    {
                        let mut view = self.view.write().unwrap_or_else(PoisonError::into_inner);
                        let nodes = std::mem::take(&mut view.nodes);
                        *view = View { nodes, ..View::default() };
                    }
                    if is_empty(&self.online).await
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
                        self.presence_changed(&entry);
                        if entry.delta == 0
                            && let Some(ready) = ready.take()
                        {
                            ready.notify_one();
                        }
                    }
                }
                Err(e) => tracing::warn!(error = %e, "could not watch who is online; retrying"),
            }
            tokio::select! {
                () = self.stop.cancelled() => return,
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
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

    /// Takes in what other nodes forward here.
    async fn receive(self: Arc<Self>, mut subscriber: async_nats::Subscriber) {
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
            for record in records {
                match record {
                    Record::Deliver { recipient, origin, body } => {
                        if let Err(reply) = router.deliver_forwarded(&recipient, &body) {
                            self.reply_to(&origin, &reply).await;
                        }
                    }
                    Record::Tell { canonical, token, keyed, body } => {
                        router.tell_forwarded(&canonical, token, keyed, &body);
                    }
                    Record::Evict { canonical, token, status, detail } => {
                        router.evict(&canonical, token, Status::from_index(status), &detail);
                    }
                    Record::Ack { incarnation, upto } if incarnation == self.incarnation => {
                        self.acked(&batch.node, upto);
                    }
                    Record::Ack { .. } => {}
                }
            }
            // Everything in it is taken in (queued for its receivers, or answered).
            let ack = Record::Ack { incarnation: batch.incarnation, upto: batch.number };
            self.send(&batch.node, &ack, None).await;
        }
    }

    /// `node` took in everything numbered up to `upto`.
    fn acked(&self, node: &str, upto: u64) {
        let mut unacked = lock(&self.unacked);
        if let Some(queue) = unacked.get_mut(node) {
            while queue.front().is_some_and(|u| u.number <= upto) {
                queue.pop_front();
            }
        }
    }

    /// Tells the senders of `pending` their messages were not delivered.
    fn fail(&self, pending: Vec<Pending>, why: &str) {
        let Some(router) = self.router() else { return };
        for p in pending {
            let detail =
                format!("{} is on another node and {why}; the message was not delivered", p.to);
            let reply = Message::reply(p.id, Status::NotDelivered, p.to, detail);
            router.tell_local(&p.sender, &reply.as_ref());
        }
    }

    /// Fails what has waited past [`ACK_TIMEOUT`] for its acknowledgement.
    fn expire_unacked(&self) {
        let mut expired = Vec::new();
        {
            let mut unacked = lock(&self.unacked);
            for queue in unacked.values_mut() {
                while queue.front().is_some_and(|u| u.sent.elapsed() > ACK_TIMEOUT) {
                    if let Some(u) = queue.pop_front() {
                        expired.extend(u.pending);
                    }
                }
            }
        }
        if !expired.is_empty() {
            tracing::warn!(
                messages = expired.len(),
                "forwarded messages were not acknowledged in time; their senders are told they were not delivered"
            );
            self.fail(expired, "its server did not confirm taking it");
        }
    }

    /// Queues `record` for `node`, waiting for room.
    async fn send(&self, node: &str, record: &Record, pending: Option<Pending>) {
        let mut bytes = BytesMut::new();
        record.encode_into(&mut bytes);
        let _ =
            self.out.send(Outgoing { node: Arc::from(node), bytes: bytes.freeze(), pending }).await;
    }

    /// Sends `reply` (about a message it forwarded) back to `origin`'s node.
    async fn reply_to(&self, origin: &Origin, reply: &Message) {
        let Some(body) = crate::router::stored_body(&reply.as_ref()) else { return };
        let record = Record::Tell {
            canonical: origin.canonical.clone(),
            token: origin.token,
            keyed: origin.keyed,
            body,
        };
        // Waits for room: a reply is the only way its sender learns the message's fate.
        self.send(&origin.node, &record, None).await;
    }

    /// Publishes queued records, as many per NATS message as there are for one node, and
    /// fails what other nodes do not acknowledge in time.
    async fn forward_out(self: Arc<Self>, mut rx: mpsc::Receiver<Outgoing>) {
        let mut batch = Vec::with_capacity(256);
        let mut open: Vec<Open> = Vec::new();
        let mut numbers: HashMap<Arc<str>, u64> = HashMap::new();
        let mut sweep = tokio::time::interval(Duration::from_millis(250));
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let got = tokio::select! {
                () = self.stop.cancelled() => return,
                _ = sweep.tick() => {
                    self.expire_unacked();
                    continue;
                }
                got = rx.recv_many(&mut batch, 1024) => got,
            };
            if got == 0 {
                return;
            }
            for outgoing in batch.drain(..) {
                let at = match open.iter().position(|o| o.node == outgoing.node) {
                    Some(at) => at,
                    None => {
                        open.push(Open::new(outgoing.node.clone()));
                        open.len() - 1
                    }
                };
                let o = &mut open[at];
                if o.payload.is_empty() {
                    let number = numbers.entry(o.node.clone()).or_insert(0);
                    *number += 1;
                    o.number = *number;
                    let head = Batch {
                        node: self.node.to_string(),
                        incarnation: self.incarnation,
                        number: o.number,
                    };
                    head.encode_into(&mut o.payload);
                }
                o.payload.extend_from_slice(&outgoing.bytes);
                o.pending.extend(outgoing.pending);
                if o.payload.len() >= self.batch_bytes {
                    self.flush(o).await;
                }
            }
            for o in &mut open {
                if !o.payload.is_empty() {
                    self.flush(o).await;
                }
            }
        }
    }

    /// Publishes `o`'s payload; its chat messages wait for their acknowledgement.
    async fn flush(&self, o: &mut Open) {
        let payload = o.payload.split().freeze();
        let pending = std::mem::take(&mut o.pending);
        if !self.state.up.load(Ordering::Acquire) {
            self.fail(pending, "the cluster link is down");
            return;
        }
        if let Err(e) = self.client.publish(layout::node_subject(&o.node), payload).await {
            tracing::warn!(node = %o.node, error = %e, "could not forward to another node");
            self.fail(pending, "the cluster link failed");
            return;
        }
        if !pending.is_empty() {
            let unacked = Unacked { number: o.number, sent: Instant::now(), pending };
            lock(&self.unacked).entry(o.node.clone()).or_default().push_back(unacked);
        }
    }

    /// Queues `record` for `node`; a future if the queue is full.
    fn enqueue(
        &self,
        node: &str,
        record: &Record,
        to: &str,
        pending: Option<Pending>,
    ) -> Result<Routed, (Undelivered, String)> {
        let mut bytes = BytesMut::new();
        record.encode_into(&mut bytes);
        let outgoing = Outgoing { node: Arc::from(node), bytes: bytes.freeze(), pending };
        match self.out.try_send(outgoing) {
            Ok(()) => Ok(Routed::Queued),
            Err(mpsc::error::TrySendError::Full(outgoing)) => {
                let (out, to) = (self.out.clone(), to.to_owned());
                let wait = self.send_wait.get().copied().unwrap_or(Duration::from_secs(1));
                Ok(Routed::Full(Box::pin(async move {
                    match tokio::time::timeout(wait, out.send(outgoing)).await {
                        Ok(Ok(())) => Ok(()),
                        _ => Err((Undelivered::Unreachable, to)),
                    }
                })))
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                Err((Undelivered::Unreachable, to.to_owned()))
            }
        }
    }

    /// The holder of `canonical` on another node, if its node is alive.
    fn remote(&self, canonical: &str) -> Option<Presence> {
        let view = self.view.read().unwrap_or_else(PoisonError::into_inner);
        let key = view.by_name.get(canonical)?;
        self.remote_at(&view, key)
    }

    fn remote_at(&self, view: &View, key: &str) -> Option<Presence> {
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
        let record = Record::Evict {
            canonical: canonical.to_owned(),
            token,
            status: status.index(),
            detail,
        };
        let mut bytes = BytesMut::new();
        record.encode_into(&mut bytes);
        let outgoing = Outgoing { node: Arc::from(node), bytes: bytes.freeze(), pending: None };
        let out = self.out.clone();
        tokio::spawn(async move {
            let _ = out.send(outgoing).await;
        });
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
                addr,
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

    fn forward(
        &self,
        from: &Claim,
        to: &str,
        msg: &MessageRef<'_>,
    ) -> Option<Result<Routed, (Undelivered, String)>> {
        let holder = match parse_destination(to) {
            Ok(Destination::Name(name)) => self.remote(&canonical_name(name))?,
            Ok(Destination::Addr(addr)) => {
                let view = self.view.read().unwrap_or_else(PoisonError::into_inner);
                let key = view.by_addr.get(&addr)?;
                self.remote_at(&view, key)?
            }
            Err(_) => return None,
        };
        if !self.state.up.load(Ordering::Acquire) {
            return Some(Err((Undelivered::Unreachable, to.to_owned())));
        }
        let body = crate::router::stored_body(msg)?;
        let record = Record::Deliver {
            recipient: holder.canonical,
            origin: Origin {
                node: self.node.to_string(),
                canonical: from.canonical().to_owned(),
                token: from.token(),
                keyed: from.key().is_some(),
                v2: from.version() >= 2,
            },
            body,
        };
        let pending = Pending { sender: from.origin().clone(), id: msg.id, to: to.to_owned() };
        Some(self.enqueue(&holder.node, &record, to, Some(pending)))
    }

    fn tell(&self, sender: &SenderRef, msg: &MessageRef<'_>) -> bool {
        let Some(holder) = self.remote(&sender.canonical) else { return false };
        if !sender.keyed && holder.token != sender.token {
            return false;
        }
        let Some(body) = crate::router::stored_body(msg) else { return false };
        let record = Record::Tell {
            canonical: sender.canonical.clone(),
            token: sender.token,
            keyed: sender.keyed,
            body,
        };
        matches!(self.enqueue(&holder.node, &record, &sender.canonical, None), Ok(Routed::Queued))
    }

    fn users(&self) -> Vec<(Arc<str>, SocketAddr)> {
        let view = self.view.read().unwrap_or_else(PoisonError::into_inner);
        view.by_key
            .keys()
            .filter_map(|key| self.remote_at(&view, key))
            .map(|p| (Arc::from(p.display), p.addr))
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
        Some(Who::remote(holder.display, holder.addr, holder.node, holder.since, holder.version))
    }

    fn close(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            // Whatever is still held (clients that did not finish leaving) is given up now.
            let held: Vec<Held> = {
                let mut held = lock(&self.held);
                held.by_key.clear();
                held.by_name.drain().map(|(_, h)| h).collect()
            };
            for h in held {
                let _ = self.online.delete_expect_revision(&h.key, Some(h.revision)).await;
            }
            // The releases already under way, then the lease: other nodes see this one gone.
            self.stop.cancel();
            self.tasks.close();
            let _ = tokio::time::timeout(Duration::from_secs(3), self.tasks.wait()).await;
            if let Err(e) = self.nodes.delete(self.node.as_ref()).await {
                tracing::debug!(error = %e, "lease not removed; it lapses by itself");
            }
            let _ = self.client.flush().await;
        })
    }
}
