//! The cluster's inboxes: [`InboxStore`] over a NATS JetStream stream, the second
//! implementation of the seam (the embedded one is `RedbStore`), so a message stored through
//! one node is delivered when its recipient logs in at any node.
//!
//! # Layout
//!
//! One stream, `relay_inbox`, with a subject per recipient: `relay.inbox.<hex canonical>`.
//! Each stream message on it is a **segment** of one or more stored messages, in the embedded
//! store's record layout (`redb_inbox::put_record`), published in one go: the appends for one
//! recipient that arrive while the previous segment is on its way share the next one, so a
//! busy inbox costs one round trip per batch, not per message.
//!
//! # Numbering
//!
//! A recipient's messages carry sequence numbers `epoch << 40 | n` that grow across sessions
//! (see `inbox.rs`). Here the subject itself is the authority: every segment carries a
//! `Relay-State` header with the numbering after it (the offline epoch in use, the next number
//! in it, the highest epoch used on the subject), and every publish expects the subject's last
//! sequence (`Nats-Expected-Last-Subject-Sequence`), so two nodes storing for one recipient
//! at once are put in one order: the loser reads the new tail and numbers again. A recipient
//! going live publishes a **marker** (`Relay-Live: <epoch>`) the same way, so anything stored
//! after it is numbered above the live session. What acknowledgements and purges removed is
//! remembered in the names bucket (`ibox.<hex>`: the acknowledged floor and the highest epoch
//! used), so numbering survives an emptied subject.
//!
//! # What `Stored` means here
//!
//! The message is in the stream: JetStream acknowledged the publish. nats-server 2.9 writes it
//! to its file store before acknowledging, but syncs that file to disk only every two minutes
//! by default (`sync_interval`); with a replicated stream (`num_replicas` 3 on a NATS cluster)
//! it is on a majority of the NATS servers before the acknowledgement. So a `Stored` message
//! survives any relay node dying, and NATS restarting cleanly; it can be lost if the machine
//! running a single nats-server loses power within the sync interval.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::message::StreamMessage;
use async_nats::jetstream::stream::{self, DirectGetErrorKind};
use async_nats::jetstream::{self, kv};
use bytes::Bytes;
use futures_util::future::BoxFuture;

use super::names::NatsNames;
use super::wire::kv_key;
use crate::inbox::{
    AppendDone, Appended, Envelope, ExpiredMessage, Full, InboxLimits, InboxStore, Page, Stored,
    Totals,
};
use crate::names::{NameStore, StoreError};
use crate::redb_inbox::{put_record, records};
use crate::redb_store::SEQ_EPOCH_SHIFT;

/// The stream holding every inbox.
pub(crate) const STREAM: &str = "relay_inbox";
/// Its subjects.
const SUBJECTS: &str = "relay.inbox.>";
/// The numbering after a segment: `open next max`.
const STATE: &str = "Relay-State";
/// A marker: the epoch a live session reserved.
const LIVE: &str = "Relay-Live";
/// A cached tail is trusted this long; then the inbox is counted again (another node's
/// acknowledgements shrink it without this node knowing).
const TAIL_TTL: Duration = Duration::from_secs(2);
/// A refusal for a full inbox is judged on a count at most this old.
const RECOUNT: Duration = Duration::from_millis(250);
/// Lost compare-and-set races before an append gives up.
const RACES: usize = 32;

fn subject(recipient: &str) -> String {
    kv_key("relay.inbox.", recipient)
}

fn meta_key(recipient: &str) -> String {
    kv_key("ibox.", recipient)
}

fn failed(what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError(format!("NATS inbox {what}: {e}"))
}

/// How a recipient's messages are numbered after some point of its subject.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Numbering {
    /// The offline epoch in use, or 0 if the next message stored takes a fresh one.
    open: u64,
    /// The next number in `open`.
    next: u64,
    /// The highest epoch any number on the subject used.
    max: u64,
}

impl Numbering {
    fn header(&self) -> String {
        format!("{} {} {}", self.open, self.next, self.max)
    }

    fn parse(value: &str) -> Option<Numbering> {
        let mut parts = value.split(' ').map(|p| p.parse::<u64>().ok());
        let numbering =
            Numbering { open: parts.next()??, next: parts.next()??, max: parts.next()?? };
        parts.next().is_none().then_some(numbering)
    }

    /// The number for a message stored with `seq` (moved from a session) or none (a fresh
    /// one, above everything on the subject and the name's epoch `floor`).
    fn assign(&mut self, seq: Option<u64>, floor: u64) -> u64 {
        if let Some(seq) = seq {
            self.max = self.max.max(seq >> SEQ_EPOCH_SHIFT);
            return seq;
        }
        if self.open == 0 {
            self.open = self.max.max(floor) + 1;
            self.next = 1;
            self.max = self.open;
        }
        let seq = self.open << SEQ_EPOCH_SHIFT | self.next;
        self.next += 1;
        seq
    }
}

/// The acknowledged floor and the highest epoch, kept where purges cannot take them.
#[derive(Clone, Copy, Debug, Default)]
struct Meta {
    acked: u64,
    max: u64,
}

/// What one node knows of a recipient's subject.
#[derive(Clone, Copy, Debug)]
struct Tail {
    /// The subject's last stream sequence (0: empty).
    last: u64,
    numbering: Numbering,
    /// The name's epoch when this was read.
    floor: u64,
    /// Messages and bytes waiting (for the per-inbox limits).
    count: u64,
    bytes: u64,
    read_at: Instant,
}

/// A recipient's appends on this node: queued while a segment is on its way.
#[derive(Default)]
struct Appender {
    pending: Vec<(Envelope, AppendDone)>,
    busy: bool,
    tail: Option<Tail>,
    /// Appends handed in, and (shared with their answers) how many have been answered: a read
    /// waits for those handed in before it (see [`Inner::read_page`]).
    submitted: u64,
    answered: Arc<std::sync::atomic::AtomicU64>,
}

struct Inner {
    js: jetstream::Context,
    stream: stream::Stream,
    names: NatsNames,
    meta: kv::Store,
    limits: InboxLimits,
    /// Most bytes of records in one segment.
    max_segment: usize,
    appenders: Mutex<HashMap<String, Appender>>,
    /// Woken whenever an append is answered.
    answered: Arc<tokio::sync::Notify>,
    /// Per recipient, the segments this node last read: (stream sequence, highest message
    /// number in it), to turn an acknowledged number into a purge.
    read: Mutex<HashMap<String, Vec<(u64, u64)>>>,
}

/// The inboxes in a NATS JetStream stream.
#[derive(Clone)]
pub(crate) struct NatsInbox {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for NatsInbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NatsInbox")
    }
}

/// One segment as read back.
struct Segment {
    sequence: u64,
    numbering: Option<Numbering>,
    live: Option<u64>,
    payload: Bytes,
}

fn header<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    headers.get(name).map(|v| v.as_str())
}

impl NatsInbox {
    /// Opens the inbox stream, making it if this is the first node. The store-wide byte limit
    /// is the stream's (a publish over it is refused, not an old message dropped).
    pub(crate) async fn open(
        js: jetstream::Context,
        names: NatsNames,
        meta: kv::Store,
        limits: InboxLimits,
        max_payload: usize,
    ) -> Result<NatsInbox, String> {
        let config = stream::Config {
            name: STREAM.to_string(),
            subjects: vec![SUBJECTS.to_string()],
            storage: stream::StorageType::File,
            max_bytes: i64::try_from(limits.store_bytes).unwrap_or(i64::MAX),
            discard: stream::DiscardPolicy::New,
            allow_direct: true,
            num_replicas: 1,
            ..Default::default()
        };
        let stream = js.get_or_create_stream(config.clone()).await.map_err(|e| e.to_string())?;
        if stream.cached_info().config.max_bytes != config.max_bytes {
            js.update_stream(config).await.map_err(|e| e.to_string())?;
        }
        Ok(NatsInbox {
            inner: Arc::new(Inner {
                js,
                stream,
                names,
                meta,
                limits,
                max_segment: max_payload.saturating_sub(4096).max(4096),
                appenders: Mutex::new(HashMap::new()),
                answered: Arc::new(tokio::sync::Notify::new()),
                read: Mutex::new(HashMap::new()),
            }),
        })
    }
}

impl Inner {
    fn appenders(&self) -> MutexGuard<'_, HashMap<String, Appender>> {
        self.appenders.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn reads(&self) -> MutexGuard<'_, HashMap<String, Vec<(u64, u64)>>> {
        self.read.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Forgets what this node knows of `recipient`'s tail: the next append reads it again.
    fn forget_tail(&self, recipient: &str) {
        if let Some(appender) = self.appenders().get_mut(recipient) {
            appender.tail = None;
        }
    }

    async fn get_meta(&self, recipient: &str) -> Result<(Meta, u64), StoreError> {
        let entry = self.meta.entry(meta_key(recipient)).await.map_err(|e| failed("read", e))?;
        Ok(match entry {
            Some(e) if e.operation == kv::Operation::Put && e.value.len() == 16 => {
                let at = |i: usize| {
                    e.value
                        .get(i..i + 8)
                        .and_then(|b| b.try_into().ok())
                        .map_or(0, u64::from_le_bytes)
                };
                (Meta { acked: at(0), max: at(8) }, e.revision)
            }
            Some(e) => (Meta::default(), e.revision),
            None => (Meta::default(), 0),
        })
    }

    /// Raises `recipient`'s acknowledged floor and highest epoch (compare-and-set).
    async fn raise_meta(&self, recipient: &str, acked: u64, max: u64) -> Result<(), StoreError> {
        for _ in 0..RACES {
            let (meta, revision) = self.get_meta(recipient).await?;
            if meta.acked >= acked && meta.max >= max {
                return Ok(());
            }
            let mut value = Vec::with_capacity(16);
            value.extend_from_slice(&meta.acked.max(acked).to_le_bytes());
            value.extend_from_slice(&meta.max.max(max).to_le_bytes());
            let key = meta_key(recipient);
            let done = match revision {
                0 => {
                    self.meta.create(key, value.into()).await.map(drop).map_err(|e| {
                        (e.kind() == kv::CreateErrorKind::AlreadyExists, e.to_string())
                    })
                }
                _ => self.meta.update(key, value.into(), revision).await.map(drop).map_err(|e| {
                    (e.kind() == kv::UpdateErrorKind::WrongLastRevision, e.to_string())
                }),
            };
            match done {
                Ok(()) => return Ok(()),
                Err((true, _)) => continue,
                Err((false, e)) => return Err(failed("write", e)),
            }
        }
        Err(StoreError(format!("the inbox of {recipient} is too busy; try again")))
    }

    /// The next stream message on `subject` (which may be a wildcard) at or after stream
    /// sequence `from`, if any.
    async fn next_message(
        &self,
        subject: &str,
        from: u64,
    ) -> Result<Option<StreamMessage>, StoreError> {
        match self.stream.direct_get_next_for_subject(subject, Some(from)).await {
            Ok(msg) => Ok(Some(msg)),
            Err(e) if e.kind() == DirectGetErrorKind::NotFound => Ok(None),
            Err(e) => Err(failed("read", e)),
        }
    }

    /// The next segment of `subject` at or after stream sequence `from`, if any.
    async fn next_segment(&self, subject: &str, from: u64) -> Result<Option<Segment>, StoreError> {
        Ok(self.next_message(subject, from).await?.map(|msg| Segment {
            sequence: msg.sequence,
            numbering: header(&msg.headers, STATE).and_then(Numbering::parse),
            live: header(&msg.headers, LIVE).and_then(|v| v.parse().ok()),
            payload: msg.payload,
        }))
    }

    /// Reads `recipient`'s tail: its numbering, what is waiting, and the name's epoch. `None`
    /// if no key holds the name.
    async fn load_tail(&self, recipient: &str) -> Result<Option<Tail>, StoreError> {
        let Some(record) = self.names.lookup(recipient.to_string()).await? else {
            return Ok(None);
        };
        let (meta, _) = self.get_meta(recipient).await?;
        let subject = subject(recipient);
        let mut tail = Tail {
            last: 0,
            numbering: Numbering { max: meta.max, ..Numbering::default() },
            floor: record.epoch,
            count: 0,
            bytes: 0,
            read_at: Instant::now(),
        };
        let mut at = 1;
        while let Some(segment) = self.next_segment(&subject, at).await? {
            at = segment.sequence + 1;
            tail.last = segment.sequence;
            if let Some(numbering) = segment.numbering {
                tail.numbering = Numbering { max: numbering.max.max(meta.max), ..numbering };
            }
            for record in records(&segment.payload) {
                let Ok(record) = record else { break };
                if record.seq > meta.acked {
                    tail.count += 1;
                    tail.bytes += record.body.len() as u64;
                }
            }
        }
        Ok(Some(tail))
    }

    /// Publishes a segment (or a marker) on `subject` if its last stream sequence is still
    /// `last`. `Ok(None)` if it is not (someone else published first).
    async fn publish(
        &self,
        subject: &str,
        last: u64,
        numbering: Numbering,
        live: Option<u64>,
        payload: Bytes,
    ) -> Result<Option<u64>, PublishFailed> {
        let mut headers = HeaderMap::new();
        headers.insert(async_nats::header::NATS_EXPECTED_LAST_SUBJECT_SEQUENCE, last.to_string());
        headers.insert(STATE, numbering.header());
        if let Some(epoch) = live {
            headers.insert(LIVE, epoch.to_string());
        }
        let sent = self.js.publish_with_headers(subject.to_string(), headers, payload).await;
        let acked = match sent {
            Ok(ack) => ack.await,
            Err(e) => Err(e),
        };
        match acked {
            Ok(ack) => Ok(Some(ack.sequence)),
            Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => Ok(None),
            Err(e) if e.to_string().contains("maximum bytes") => Err(PublishFailed::Full),
            Err(e) => Err(PublishFailed::Error(failed("write", e))),
        }
    }

    /// Stores what is pending for `recipient`, a segment at a time, until nothing is.
    async fn drain_appends(self: Arc<Self>, recipient: String) {
        let subject = subject(&recipient);
        let mut races = 0;
        loop {
            let (mut batch, cached) = {
                let mut appenders = self.appenders();
                let Some(appender) = appenders.get_mut(&recipient) else { return };
                if appender.pending.is_empty() {
                    appender.busy = false;
                    // Nothing queued and nothing cached worth keeping: forget the recipient.
                    if appender.tail.is_none_or(|t| t.read_at.elapsed() > TAIL_TTL) {
                        appenders.remove(&recipient);
                    }
                    return;
                }
                let cached = appender.tail.filter(|t| t.read_at.elapsed() <= TAIL_TTL);
                (std::mem::take(&mut appender.pending), cached)
            };
            let tail = match cached {
                Some(tail) => Ok(Some(tail)),
                None => self.load_tail(&recipient).await,
            };
            let mut tail = match tail {
                Ok(Some(tail)) => {
                    // Kept even if nothing is stored (a full inbox refusing everything is not
                    // read again for every batch).
                    if let Some(appender) = self.appenders().get_mut(&recipient) {
                        appender.tail = Some(tail);
                    }
                    tail
                }
                Ok(None) => {
                    for (_, done) in batch {
                        done(Ok(Appended::NotBound));
                    }
                    continue;
                }
                Err(e) => {
                    for (_, done) in batch {
                        done(Err(e.clone()));
                    }
                    continue;
                }
            };
            // Number what fits the inbox's limits into one segment; the rest waits for the
            // next (a segment stays under NATS's largest message).
            let mut numbering = tail.numbering;
            let (mut payload, mut taken, mut stored) = (Vec::new(), Vec::new(), Vec::new());
            let (mut count, mut bytes) = (tail.count, tail.bytes);
            let mut rest = Vec::new();
            // A cached count can only be too high: every append is checked against the tail
            // it was counted on (the expected last sequence), and only acknowledgements,
            // purges and expiry, on any node, shrink an inbox without touching its tail. So a
            // refusal is confirmed on a count read at most `RECOUNT` ago (not every time: a
            // count reads the whole inbox, and a sender may keep trying a full one).
            let fresh = tail.read_at.elapsed() <= RECOUNT;
            let mut recount = false;
            for (envelope, done) in batch.drain(..) {
                if !rest.is_empty()
                    || (!payload.is_empty()
                        && payload.len() + envelope.body.len() > self.max_segment)
                {
                    rest.push((envelope, done));
                    continue;
                }
                let size = envelope.body.len() as u64;
                let full = count >= self.limits.messages || bytes + size > self.limits.bytes;
                if full && !fresh {
                    recount = true;
                    rest.push((envelope, done));
                    continue;
                }
                if count >= self.limits.messages {
                    done(Ok(Appended::Full(Full::Messages(self.limits.messages))));
                    continue;
                }
                if bytes + size > self.limits.bytes {
                    done(Ok(Appended::Full(Full::Bytes(self.limits.bytes))));
                    continue;
                }
                let seq = numbering.assign(envelope.seq, tail.floor);
                put_record(&mut payload, &envelope, seq);
                count += 1;
                bytes += size;
                stored.push(seq);
                taken.push((envelope, done));
            }
            if recount {
                // Count again and number everything anew, in the order it came.
                self.forget_tail(&recipient);
                taken.extend(rest);
                self.requeue(&recipient, taken);
                continue;
            }
            if taken.is_empty() {
                self.requeue(&recipient, rest);
                continue;
            }
            match self.publish(&subject, tail.last, numbering, None, payload.into()).await {
                Ok(Some(sequence)) => {
                    races = 0;
                    tail = Tail { last: sequence, numbering, count, bytes, ..tail };
                    if let Some(appender) = self.appenders().get_mut(&recipient) {
                        appender.tail = Some(tail);
                    }
                    for ((_, done), seq) in taken.into_iter().zip(stored) {
                        done(Ok(Appended::Stored(seq)));
                    }
                    self.requeue(&recipient, rest);
                }
                Ok(None) => {
                    // Another node stored first (or the recipient went live): read the tail
                    // again and number these anew, ahead of anything queued since.
                    races += 1;
                    self.forget_tail(&recipient);
                    taken.extend(rest);
                    if races > RACES {
                        let e = StoreError(format!("the inbox of {recipient} is too busy"));
                        for (_, done) in taken {
                            done(Err(e.clone()));
                        }
                        continue;
                    }
                    self.requeue(&recipient, taken);
                }
                Err(failure) => {
                    self.forget_tail(&recipient);
                    for (_, done) in taken {
                        done(match &failure {
                            PublishFailed::Full => {
                                Ok(Appended::Full(Full::Store(self.limits.store_bytes)))
                            }
                            PublishFailed::Error(e) => Err(e.clone()),
                        });
                    }
                    self.requeue(&recipient, rest);
                }
            }
        }
    }

    /// Puts `items` back at the front of `recipient`'s queue (they keep their order, ahead of
    /// anything queued since).
    fn requeue(&self, recipient: &str, mut items: Vec<(Envelope, AppendDone)>) {
        if items.is_empty() {
            return;
        }
        let mut appenders = self.appenders();
        let appender = appenders.entry(recipient.to_string()).or_default();
        items.append(&mut appender.pending);
        appender.pending = items;
    }

    /// Reads a page of `recipient`'s inbox (see [`InboxStore::read`]).
    async fn read_page(
        &self,
        recipient: &str,
        after: u64,
        max_bytes: usize,
        live: bool,
    ) -> Result<Page, StoreError> {
        // What this node was asked to store for the recipient before this read is in the
        // stream first: a session reading its inbox must not go live with some of its
        // messages still on their way in (they would be numbered after its live ones).
        let before = self.appenders().get(recipient).map(|a| (a.answered.clone(), a.submitted));
        if let Some((answered, submitted)) = before {
            loop {
                let woken = self.answered.notified();
                tokio::pin!(woken);
                woken.as_mut().enable();
                if answered.load(std::sync::atomic::Ordering::Acquire) >= submitted {
                    break;
                }
                woken.await;
            }
        }
        let subject = subject(recipient);
        let (meta, _) = self.get_meta(recipient).await?;
        let floor = after.max(meta.acked);
        let mut page = Page::default();
        // Start at the first segment this node saw that holds anything above the floor (the
        // next page of a drain, say): the ones before it are all delivered.
        let mut seen: Vec<(u64, u64)> = self.reads().remove(recipient).unwrap_or_default();
        let keep = seen.iter().take_while(|(_, highest)| *highest <= floor).count();
        seen.truncate(keep);
        let (mut bytes, mut at) = (0, seen.last().map_or(1, |(sequence, _)| sequence + 1));
        let mut last = at - 1;
        let mut max_epoch = meta.max;
        'segments: while let Some(segment) = self.next_segment(&subject, at).await? {
            at = segment.sequence + 1;
            if let Some(numbering) = segment.numbering {
                max_epoch = max_epoch.max(numbering.max);
            }
            max_epoch = max_epoch.max(segment.live.unwrap_or(0));
            let mut highest = 0;
            for record in records(&segment.payload) {
                let record = record.map_err(|()| {
                    StoreError(format!("a stored segment for {recipient:?} is damaged"))
                })?;
                highest = highest.max(record.seq);
                if record.seq <= floor {
                    continue;
                }
                if bytes >= max_bytes {
                    page.more = true;
                    break 'segments;
                }
                bytes += record.body.len();
                page.items.push(Stored {
                    seq: record.seq,
                    body: segment.payload.slice_ref(record.body),
                    id: record.id,
                    sender: Arc::new(record.sender),
                });
            }
            seen.push((segment.sequence, highest));
            last = segment.sequence;
        }
        self.reads().insert(recipient.to_string(), seen);
        if !live || page.more {
            return Ok(page);
        }
        // The whole inbox is read: reserve the live session's epoch above everything on the
        // subject and the name's, and mark the subject with it. If something was stored
        // meanwhile the marker is refused, and the caller reads again.
        let Some(record) = self.names.lookup(recipient.to_string()).await? else {
            return Err(StoreError(format!("{recipient:?} is no longer bound")));
        };
        let epoch = max_epoch.max(record.epoch) + 1;
        self.names.raise_epoch(recipient, epoch).await?;
        let marker = Numbering { open: 0, next: 0, max: epoch };
        let published = self.publish(&subject, last, marker, Some(epoch), Bytes::new()).await;
        self.forget_tail(recipient);
        match published {
            Ok(Some(_)) => page.live_epoch = Some(epoch),
            Ok(None) => page.more = true,
            Err(PublishFailed::Full) => {
                return Err(StoreError("the store is full; cannot mark the inbox".into()));
            }
            Err(PublishFailed::Error(e)) => return Err(e),
        }
        Ok(page)
    }

    /// Forgets `recipient`'s messages numbered up to `upto`: raises the floor, then purges
    /// the segments this node read that hold nothing above it.
    async fn remove_upto(&self, recipient: &str, upto: u64) -> Result<(), StoreError> {
        self.raise_meta(recipient, upto, upto >> SEQ_EPOCH_SHIFT).await?;
        let purge_below = {
            let mut reads = self.reads();
            let Some(seen) = reads.get_mut(recipient) else { return Ok(()) };
            let done = seen.iter().take_while(|(_, highest)| *highest <= upto).count();
            let below = seen.get(..done).and_then(|s| s.last()).map(|(sequence, _)| sequence + 1);
            seen.drain(..done);
            below
        };
        if let Some(below) = purge_below {
            self.stream
                .purge()
                .filter(subject(recipient))
                .sequence(below)
                .await
                .map_err(|e| failed("purge", e))?;
            self.forget_tail(recipient);
        }
        Ok(())
    }

    async fn purge_all(&self, recipient: &str) -> Result<u64, StoreError> {
        let page = self.read_page(recipient, 0, usize::MAX, false).await?;
        let highest = page.items.iter().map(|s| s.seq).max().unwrap_or(0);
        self.raise_meta(recipient, highest, highest >> SEQ_EPOCH_SHIFT).await?;
        self.stream.purge().filter(subject(recipient)).await.map_err(|e| failed("purge", e))?;
        self.reads().remove(recipient);
        self.forget_tail(recipient);
        Ok(page.items.len() as u64)
    }

    /// Counts every inbox (the operator's `inboxes`): one pass over the stream.
    async fn count_all(&self) -> Result<Totals, StoreError> {
        let mut totals = Totals::default();
        let mut at = 1;
        let mut floors: HashMap<String, u64> = HashMap::new();
        let mut waiting = std::collections::HashSet::new();
        while let Some(msg) = self.next_message(SUBJECTS, at).await? {
            at = msg.sequence + 1;
            let recipient = recipient_of(&msg.subject);
            let floor = match floors.get(&recipient) {
                Some(floor) => *floor,
                None => {
                    let floor = self.get_meta(&recipient).await?.0.acked;
                    floors.insert(recipient.clone(), floor);
                    floor
                }
            };
            let mut any = false;
            for record in records(&msg.payload).flatten() {
                if record.seq > floor {
                    any = true;
                    totals.messages += 1;
                    totals.bytes += record.body.len() as u64;
                }
            }
            if any {
                waiting.insert(recipient);
            }
        }
        totals.recipients = waiting.len() as u64;
        Ok(totals)
    }

    /// Removes segments published before `cutoff` (ms since the Unix epoch), oldest first,
    /// and returns their messages so their senders can be told.
    async fn expire_before(&self, cutoff: u64) -> Result<Vec<ExpiredMessage>, StoreError> {
        let mut expired = Vec::new();
        let mut at = 1;
        while let Some(msg) = self.next_message(SUBJECTS, at).await? {
            let time = u64::try_from(msg.time.unix_timestamp_nanos() / 1_000_000).unwrap_or(0);
            if time >= cutoff {
                break;
            }
            at = msg.sequence + 1;
            let recipient = recipient_of(&msg.subject);
            let floor = self.get_meta(&recipient).await?.0.acked;
            let highest = records(&msg.payload).flatten().map(|r| r.seq).max().unwrap_or(0);
            // The numbering it carried is kept in the floor and highest epoch.
            let max = header(&msg.headers, STATE).and_then(Numbering::parse).map_or(0, |n| n.max);
            self.raise_meta(&recipient, highest, max).await?;
            self.forget_tail(&recipient);
            // Every node sweeps: only the one whose delete removed it tells the senders.
            match self.stream.delete_message(msg.sequence).await {
                Ok(true) => {}
                Ok(false) => continue,
                Err(e) if e.to_string().contains("not found") => continue,
                Err(e) => return Err(failed("delete", e)),
            }
            for record in records(&msg.payload).flatten().filter(|r| r.seq > floor) {
                expired.push(ExpiredMessage {
                    recipient: recipient.clone(),
                    id: record.id,
                    sender: record.sender,
                });
            }
        }
        Ok(expired)
    }
}

/// The canonical name a subject `relay.inbox.<hex>` is for.
fn recipient_of(subject: &str) -> String {
    let hex = subject.rsplit('.').next().unwrap_or_default();
    let bytes: Vec<u8> = (0..hex.len() / 2)
        .filter_map(|i| hex.get(2 * i..2 * i + 2).and_then(|h| u8::from_str_radix(h, 16).ok()))
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Why a publish failed.
enum PublishFailed {
    /// The stream holds its limit of bytes.
    Full,
    Error(StoreError),
}

impl InboxStore for NatsInbox {
    fn append(&self, envelope: Envelope, done: AppendDone) {
        let recipient = envelope.recipient.clone();
        let start = {
            let mut appenders = self.inner.appenders();
            let appender = appenders.entry(recipient.clone()).or_default();
            appender.submitted += 1;
            let (answered, woken) = (appender.answered.clone(), self.inner.answered.clone());
            let done: AppendDone = Box::new(move |result| {
                done(result);
                answered.fetch_add(1, std::sync::atomic::Ordering::Release);
                woken.notify_waiters();
            });
            appender.pending.push((envelope, done));
            !std::mem::replace(&mut appender.busy, true)
        };
        if start {
            tokio::spawn(self.inner.clone().drain_appends(recipient));
        }
    }

    fn read(
        &self,
        recipient: String,
        after: u64,
        max_bytes: usize,
        live: bool,
    ) -> BoxFuture<'static, Result<Page, StoreError>> {
        let inner = self.inner.clone();
        Box::pin(async move { inner.read_page(&recipient, after, max_bytes, live).await })
    }

    fn remove(&self, recipient: String, upto: u64) {
        let inner = self.inner.clone();
        tokio::spawn(async move {
            if let Err(e) = inner.remove_upto(&recipient, upto).await {
                // They are delivered again and dropped by number; not a loss.
                tracing::debug!(%recipient, error = %e, "acknowledged messages not removed");
            }
        });
    }

    fn purge(&self, recipient: String) -> BoxFuture<'static, Result<u64, StoreError>> {
        let inner = self.inner.clone();
        Box::pin(async move { inner.purge_all(&recipient).await })
    }

    fn totals(&self) -> BoxFuture<'static, Result<Totals, StoreError>> {
        let inner = self.inner.clone();
        Box::pin(async move { inner.count_all().await })
    }

    fn expire(&self, now: u64) -> BoxFuture<'static, Result<Vec<ExpiredMessage>, StoreError>> {
        let inner = self.inner.clone();
        let cutoff = now.saturating_sub(self.inner.limits.max_age_ms);
        Box::pin(async move { inner.expire_before(cutoff).await })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbering_takes_a_fresh_epoch_above_everything_then_counts_on() {
        let mut n = Numbering { open: 0, next: 0, max: 7 };
        assert_eq!(n.assign(None, 3), 8 << SEQ_EPOCH_SHIFT | 1);
        assert_eq!(n.assign(None, 3), 8 << SEQ_EPOCH_SHIFT | 2);
        // A message moved from a session keeps its number.
        assert_eq!(n.assign(Some(9 << SEQ_EPOCH_SHIFT | 5), 3), 9 << SEQ_EPOCH_SHIFT | 5);
        assert_eq!(n.max, 9);
        // The name's epoch is a floor too.
        let mut n = Numbering::default();
        assert_eq!(n.assign(None, 12), 13 << SEQ_EPOCH_SHIFT | 1);
    }

    #[test]
    fn numbering_round_trips_through_its_header() {
        let n = Numbering { open: 4, next: 17, max: 5 };
        assert_eq!(Numbering::parse(&n.header()), Some(n));
        assert_eq!(Numbering::parse("1 2"), None);
        assert_eq!(Numbering::parse("1 2 3 4"), None);
        assert_eq!(Numbering::parse("x 2 3"), None);
    }

    #[test]
    fn subjects_name_their_recipient() {
        for name in ["alice", "zoë", "a.b-c_d"] {
            assert_eq!(recipient_of(&subject(name)), name);
        }
    }
}
