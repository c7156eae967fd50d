//! The inboxes inside the embedded store (see [`crate::redb_store`]): how stored messages are
//! laid out in redb tables, and the changes the store's worker applies to them.
//!
//! An inbox is a run of **segments**: the messages appended for one recipient in one
//! transaction go into one value, keyed by (recipient, sequence number of its first message),
//! so a batch of thousands of messages for a few recipients costs a few B-tree inserts, not
//! thousands. Segments of one recipient hold increasing sequence numbers, in key order.
//!
//! Acknowledged messages are not cut out of a segment: the recipient's counts record the
//! highest number acknowledged (`acked`), reads skip what is at or below it, and a segment is
//! deleted once all of it is. A recipient's counts also hold the time of its oldest waiting
//! message (a lower bound), so the age sweep reads only the counts, and the segments of the
//! recipients that hold something old.
//!
//! Tables: `inbox` ((recipient, first seq) → segment), `inbox_meta` (recipient → counts,
//! oldest time, acknowledged floor and offline numbering). An append run writes one segment
//! and one counts record per recipient: the fewer pages a commit dirties, the sooner its sync
//! returns.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use redb::{ReadableTable, TableDefinition};

use crate::inbox::{Appended, Envelope, ExpiredMessage, Full, Page, SenderRef, Stored, Totals};
use crate::journal::Redo;
use crate::names::{NameRecord, StoreError};
use crate::redb_store::{Frozen, Inboxes, Names, SEQ_EPOCH_SHIFT, encode, get, store_error};

pub(crate) const INBOX: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("inbox");
pub(crate) const INBOX_META: TableDefinition<&str, &[u8]> = TableDefinition::new("inbox_meta");

pub(crate) type Inbox<'a> = redb::Table<'a, (&'static str, u64), &'static [u8]>;
pub(crate) type InboxMeta<'a> = redb::Table<'a, &'static str, &'static [u8]>;

/// The tables an inbox change touches, open in one write transaction, and the record of what
/// it changed for the journal ([`crate::journal`]). Every change goes through the methods
/// here, which make it and record it.
pub(crate) struct InboxTables<'t, 'a> {
    pub(crate) names: &'t mut Names<'a>,
    pub(crate) inbox: &'t mut Inbox<'a>,
    pub(crate) meta: &'t mut InboxMeta<'a>,
    pub(crate) redo: &'t mut Redo,
}

impl InboxTables<'_, '_> {
    fn put_name(&mut self, record: &NameRecord) -> Result<(), StoreError> {
        let value = encode(record);
        self.names.insert(record.canonical.as_str(), value.as_slice()).map_err(store_error)?;
        self.redo.name(&record.canonical, &value);
        Ok(())
    }

    fn put_meta(&mut self, recipient: &str, m: &Meta) -> Result<(), StoreError> {
        let value = m.encode();
        self.meta.insert(recipient, value.as_slice()).map_err(store_error)?;
        self.redo.meta(recipient, &value);
        Ok(())
    }

    fn remove_meta(&mut self, recipient: &str) -> Result<(), StoreError> {
        self.meta.remove(recipient).map_err(store_error)?;
        self.redo.meta_gone(recipient);
        Ok(())
    }

    fn put_segment(&mut self, recipient: &str, first: u64, value: &[u8]) -> Result<(), StoreError> {
        self.inbox.insert((recipient, first), value).map_err(store_error)?;
        self.redo.segment(recipient, first, value);
        Ok(())
    }

    fn delete_segment(&mut self, recipient: &str, first: u64) -> Result<(), StoreError> {
        self.inbox.remove((recipient, first)).map_err(store_error)?;
        self.redo.segment_gone(recipient, first);
        Ok(())
    }
}

/// One recipient's inbox counts, acknowledged floor and offline numbering.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Meta {
    /// Messages waiting (not acknowledged).
    pub(crate) count: u64,
    /// Their bytes.
    pub(crate) bytes: u64,
    /// The epoch messages stored for an offline recipient are numbered in; 0 until one is
    /// needed (after the recipient last went live).
    offline_epoch: u64,
    /// The next number in `offline_epoch`.
    next: u64,
    /// Everything numbered at or below this was acknowledged (or purged): skipped by reads,
    /// and its segments deleted once wholly below it.
    acked: u64,
    /// No waiting message is older than this (ms since the Unix epoch; `u64::MAX` when none
    /// waits). A lower bound: made exact by the age sweep.
    oldest: u64,
}

impl Default for Meta {
    fn default() -> Meta {
        Meta { count: 0, bytes: 0, offline_epoch: 0, next: 0, acked: 0, oldest: u64::MAX }
    }
}

impl Meta {
    const LEN: usize = 48;

    fn encode(&self) -> [u8; Meta::LEN] {
        let mut out = [0u8; Meta::LEN];
        let fields =
            [self.count, self.bytes, self.offline_epoch, self.next, self.acked, self.oldest];
        for (i, v) in fields.iter().enumerate() {
            out[i * 8..i * 8 + 8].copy_from_slice(&v.to_le_bytes());
        }
        out
    }

    pub(crate) fn decode(bytes: &[u8]) -> Option<Meta> {
        if bytes.len() != Meta::LEN {
            return None;
        }
        let at = |i: usize| {
            bytes.get(i * 8..i * 8 + 8).and_then(|b| b.try_into().ok()).map(u64::from_le_bytes)
        };
        Some(Meta {
            count: at(0)?,
            bytes: at(1)?,
            offline_epoch: at(2)?,
            next: at(3)?,
            acked: at(4)?,
            oldest: at(5)?,
        })
    }
}

pub(crate) fn get_meta(
    meta: &impl ReadableTable<&'static str, &'static [u8]>,
    recipient: &str,
) -> Result<Meta, StoreError> {
    match meta.get(recipient).map_err(store_error)? {
        None => Ok(Meta::default()),
        Some(value) => Meta::decode(value.value())
            .ok_or_else(|| StoreError(format!("the inbox counts of {recipient:?} are damaged"))),
    }
}

/// Appends one record to a segment. Record layout, version 1: its length (u32 LE, what
/// follows), the sequence number (u64 LE), `1`, flags (1: the sender wants a receipt, 2: the
/// sender is keyed), the sender's token, the message id and its time (u64 LE each), the
/// sender's canonical name (a length byte, then the name), then the frame body to deliver,
/// its `seq` already set.
pub(crate) fn put_record(segment: &mut Vec<u8>, envelope: &Envelope, seq: u64) {
    let sender = &envelope.sender;
    let name = &sender.canonical.as_bytes()[..sender.canonical.len().min(255)];
    let len = 8 + 2 + 24 + 1 + name.len() + envelope.body.len();
    segment.reserve(4 + len);
    segment.extend_from_slice(&u32::try_from(len).unwrap_or(u32::MAX).to_le_bytes());
    segment.extend_from_slice(&seq.to_le_bytes());
    segment.push(1);
    segment.push(u8::from(sender.receipt) | u8::from(sender.keyed) << 1);
    segment.extend_from_slice(&sender.token.to_le_bytes());
    segment.extend_from_slice(&envelope.id.to_le_bytes());
    segment.extend_from_slice(&envelope.time.to_le_bytes());
    segment.push(name.len() as u8);
    segment.extend_from_slice(name);
    let start = segment.len();
    segment.extend_from_slice(&envelope.body);
    // The body carries its number, so it is delivered as it is.
    let _ = relay_proto::set_seq_in_body(&mut segment[start..], seq);
}

/// One record of a segment, decoded.
pub(crate) struct Record<'a> {
    pub(crate) seq: u64,
    pub(crate) sender: SenderRef,
    pub(crate) id: u64,
    pub(crate) time: u64,
    pub(crate) body: &'a [u8],
    /// The whole record, length prefix included (to copy it into a rewritten segment).
    raw: &'a [u8],
}

/// The records of a segment, in order; `Err` where it is damaged (and nothing after).
pub(crate) fn records(mut segment: &[u8]) -> impl Iterator<Item = Result<Record<'_>, ()>> {
    std::iter::from_fn(move || {
        if segment.is_empty() {
            return None;
        }
        let record = (|| {
            let len = u32::from_le_bytes(segment.get(..4)?.try_into().ok()?) as usize;
            let raw = segment.get(..4 + len)?;
            let rest = &raw[4..];
            let (seq, rest) = rest.split_at_checked(8)?;
            let (&format, rest) = rest.split_first()?;
            if format != 1 {
                return None;
            }
            let (&flags, rest) = rest.split_first()?;
            let (fixed, rest) = rest.split_at_checked(24)?;
            let u64_at = |i: usize| fixed.get(i..i + 8)?.try_into().ok().map(u64::from_le_bytes);
            let (&name_len, rest) = rest.split_first()?;
            let (name, body) = rest.split_at_checked(usize::from(name_len))?;
            let sender = SenderRef {
                canonical: std::str::from_utf8(name).ok()?.to_string(),
                token: u64_at(0)?,
                keyed: flags & 2 != 0,
                receipt: flags & 1 != 0,
            };
            let seq = u64::from_le_bytes(seq.try_into().ok()?);
            Some(Record { seq, sender, id: u64_at(8)?, time: u64_at(16)?, body, raw })
        })();
        match record {
            Some(record) => {
                segment = &segment[record.raw.len()..];
                Some(Ok(record))
            }
            None => {
                segment = &[];
                Some(Err(()))
            }
        }
    })
}

fn damaged(recipient: &str, first: u64) -> StoreError {
    StoreError(format!("a stored segment for {recipient:?} (from number {first}) is damaged"))
}

/// Appends not yet in the tables: for each recipient stored to since the last flush, its name
/// record (for its epoch), its inbox counts, and the segment being built. Appends change only
/// this and the journal ([`crate::journal`]); the tables get it all in one go when it is
/// flushed, at the next checkpoint or before any other request (which reads the tables). So a
/// stream of stores costs one B-tree insert per recipient per checkpoint rather than per
/// transaction, and far fewer pages to write at the checkpoint.
#[derive(Default)]
pub(crate) struct AppendCache {
    slots: HashMap<String, Slot>,
    /// Recipients changed since the changes were last put into a journal record.
    touched: Vec<String>,
    /// Emptied segment buffers.
    pool: Vec<Vec<u8>>,
}

/// Segment buffers kept for reuse.
const POOLED_SEGMENTS: usize = 256;

/// A segment past this many bytes is closed and the next record starts a new one, so no
/// value in the table is huge (a recipient's whole inbox can be 64 MiB).
const SEGMENT_MAX: usize = 256 << 10;

struct Slot {
    /// `None`: the name is not bound.
    record: Option<NameRecord>,
    meta: Meta,
    /// Changed since the last flush (to write into the tables).
    record_dirty: bool,
    meta_dirty: bool,
    /// Changed since the last journal record (to put into the next one).
    record_new: bool,
    meta_new: bool,
    /// Segments of the records appended since the last flush; the last one is being filled.
    segments: Vec<Segment>,
}

/// A segment being built.
struct Segment {
    /// The number of its first record.
    first: u64,
    bytes: Vec<u8>,
    /// Bytes already in a journal record.
    journaled: usize,
}

/// `recipient`'s slot; if it is not in `slots` yet, read from `frozen` (a running
/// checkpoint's) or else the tables.
fn slot<'s>(
    slots: &'s mut HashMap<String, Slot>,
    names: &impl ReadableTable<&'static str, &'static [u8]>,
    meta: &impl ReadableTable<&'static str, &'static [u8]>,
    frozen: Option<&Frozen>,
    recipient: &str,
) -> Result<&'s mut Slot, StoreError> {
    if !slots.contains_key(recipient) {
        let (record, meta) = match frozen.and_then(|f| f.get(recipient)) {
            Some((record, m)) => (record.clone(), *m),
            None => (get(names, recipient)?, get_meta(meta, recipient)?),
        };
        let slot = Slot {
            record,
            meta,
            record_dirty: false,
            meta_dirty: false,
            record_new: false,
            meta_new: false,
            segments: Vec::new(),
        };
        slots.insert(recipient.to_string(), slot);
    }
    slots.get_mut(recipient).ok_or_else(|| StoreError("append cache lost an entry".into()))
}

impl AppendCache {
    /// Nothing waits to be flushed.
    pub(crate) fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Each recipient's name record and counts as they stand here (what the tables will hold
    /// once this is flushed).
    pub(crate) fn frozen(&self) -> Frozen {
        self.slots.iter().map(|(k, slot)| (k.clone(), (slot.record.clone(), slot.meta))).collect()
    }

    /// Puts what changed since the last call into `redo`: each changed name record and counts
    /// as its value, and each segment's new records as an append to it.
    pub(crate) fn journal(&mut self, redo: &mut Redo) {
        for recipient in self.touched.drain(..) {
            let Some(slot) = self.slots.get_mut(&recipient) else { continue };
            if std::mem::take(&mut slot.record_new)
                && let Some(record) = &slot.record
            {
                redo.name(&record.canonical, &encode(record));
            }
            if std::mem::take(&mut slot.meta_new) {
                redo.meta(&recipient, &slot.meta.encode());
            }
            for segment in &mut slot.segments {
                if let Some(new) = segment.bytes.get(segment.journaled..)
                    && !new.is_empty()
                {
                    redo.segment_append(&recipient, segment.first, new);
                    segment.journaled = segment.bytes.len();
                }
            }
        }
    }

    /// Writes everything into the tables and forgets it (other requests read the tables).
    /// What was not in a journal record yet goes into `t.redo` first; the writes themselves
    /// are not recorded again.
    pub(crate) fn flush(&mut self, t: &mut InboxTables<'_, '_>) -> Result<(), StoreError> {
        self.journal(t.redo);
        for (recipient, slot) in self.slots.drain() {
            if slot.record_dirty
                && let Some(record) = &slot.record
            {
                let value = encode(record);
                t.names.insert(record.canonical.as_str(), value.as_slice()).map_err(store_error)?;
            }
            if slot.meta_dirty {
                t.meta
                    .insert(recipient.as_str(), slot.meta.encode().as_slice())
                    .map_err(store_error)?;
            }
            for mut segment in slot.segments {
                // A segment cannot start where another does (numbers are never reused); if
                // one somehow does, keep both, the old records first (as a replay of the
                // journal's append would).
                append_segment(t.inbox, &recipient, segment.first, &segment.bytes)?;
                if self.pool.len() < POOLED_SEGMENTS {
                    segment.bytes.clear();
                    self.pool.push(segment.bytes);
                }
            }
        }
        Ok(())
    }
}

/// Adds `records` at the end of the segment at (`recipient`, `first`), creating it if need be.
pub(crate) fn append_segment(
    inbox: &mut Inbox<'_>,
    recipient: &str,
    first: u64,
    records: &[u8],
) -> Result<(), StoreError> {
    let key = (recipient, first);
    let replaced = inbox.insert(key, records).map_err(store_error)?.map(|old| old.value().to_vec());
    if let Some(mut both) = replaced {
        both.extend_from_slice(records);
        inbox.insert(key, both.as_slice()).map_err(store_error)?;
    }
    Ok(())
}

/// Stores one message, if its recipient is bound and its inbox and the store have room.
/// Changes only `cache`: the caller puts the changes in a journal record
/// ([`AppendCache::journal`]). `names` and `meta` are read for a recipient not in the cache.
pub(crate) fn append_one(
    names: &impl ReadableTable<&'static str, &'static [u8]>,
    meta: &impl ReadableTable<&'static str, &'static [u8]>,
    frozen: Option<&Frozen>,
    inboxes: &mut Inboxes,
    cache: &mut AppendCache,
    envelope: Envelope,
) -> Result<Appended, StoreError> {
    let recipient = envelope.recipient.as_str();
    let limits = inboxes.limits;
    let size = envelope.body.len() as u64;
    let AppendCache { slots, touched, pool } = cache;
    let slot = slot(slots, names, meta, frozen, recipient)?;
    let Some(record) = slot.record.as_mut() else {
        return Ok(Appended::NotBound);
    };
    let m = &mut slot.meta;
    if m.count >= limits.messages {
        return Ok(Appended::Full(Full::Messages(limits.messages)));
    }
    if m.bytes + size > limits.bytes {
        return Ok(Appended::Full(Full::Bytes(limits.bytes)));
    }
    if inboxes.totals.bytes + size > limits.store_bytes {
        return Ok(Appended::Full(Full::Store(limits.store_bytes)));
    }
    let seq = match envelope.seq {
        Some(seq) => seq,
        None => {
            if m.offline_epoch == 0 {
                record.epoch += 1;
                slot.record_dirty = true;
                slot.record_new = true;
                m.offline_epoch = record.epoch;
                m.next = 1;
            }
            let seq = m.offline_epoch << SEQ_EPOCH_SHIFT | m.next;
            m.next += 1;
            seq
        }
    };
    if seq <= m.acked {
        // Already acknowledged (a message moved from a session after its ack was counted).
        return Ok(Appended::Stored(seq));
    }
    slot.meta_dirty = true;
    let first_touch = !std::mem::replace(&mut slot.meta_new, true);
    let segment = match slot.segments.last_mut() {
        Some(last) if last.bytes.len() < SEGMENT_MAX => last,
        _ => {
            let bytes = pool.pop().unwrap_or_default();
            slot.segments.push(Segment { first: seq, bytes, journaled: 0 });
            let Some(last) = slot.segments.last_mut() else {
                return Err(StoreError("segment lost".into()));
            };
            last
        }
    };
    m.oldest = m.oldest.min(envelope.time);
    put_record(&mut segment.bytes, &envelope, seq);
    if m.count == 0 {
        inboxes.totals.recipients += 1;
    }
    m.count += 1;
    m.bytes += size;
    inboxes.totals.messages += 1;
    inboxes.totals.bytes += size;
    if first_touch {
        touched.push(envelope.recipient.clone());
    }
    Ok(Appended::Stored(seq))
}

/// Messages for `recipient` numbered after `after` (and not acknowledged), about `max_bytes`
/// of them.
pub(crate) fn read_page(
    inbox: &impl ReadableTable<(&'static str, u64), &'static [u8]>,
    meta: &impl ReadableTable<&'static str, &'static [u8]>,
    recipient: &str,
    after: u64,
    max_bytes: usize,
) -> Result<Page, StoreError> {
    let mut page = Page::default();
    let floor = after.max(get_meta(meta, recipient)?.acked);
    if floor == u64::MAX {
        return Ok(page);
    }
    // The segment holding `floor + 1` may start at or before it.
    let start =
        match inbox.range((recipient, 0)..=(recipient, floor)).map_err(store_error)?.next_back() {
            Some(entry) => entry.map_err(store_error)?.0.value().1,
            None => floor + 1,
        };
    let mut bytes = 0;
    let mut last_sender: Option<Arc<SenderRef>> = None;
    for entry in inbox.range((recipient, start)..=(recipient, u64::MAX)).map_err(store_error)? {
        let (key, value) = entry.map_err(store_error)?;
        let first = key.value().1;
        // One copy of the segment; every body is a slice of it.
        let segment = Bytes::copy_from_slice(value.value());
        for record in records(&segment) {
            let record = record.map_err(|()| damaged(recipient, first))?;
            if record.seq <= floor {
                continue;
            }
            if bytes >= max_bytes {
                page.more = true;
                return Ok(page);
            }
            bytes += record.body.len();
            let sender = match &last_sender {
                Some(last) if **last == record.sender => last.clone(),
                _ => last_sender.insert(Arc::new(record.sender)).clone(),
            };
            page.items.push(Stored {
                seq: record.seq,
                body: segment.slice_ref(record.body),
                id: record.id,
                sender,
            });
        }
    }
    Ok(page)
}

/// The recipient has read its whole inbox: reserve its live session's epoch, after every
/// number stored so far, and end the offline epoch.
pub(crate) fn go_live(
    t: &mut InboxTables<'_, '_>,
    recipient: &str,
    mut page: Page,
) -> Result<Page, StoreError> {
    let Some(mut record) = get(&*t.names, recipient)? else {
        return Err(StoreError(format!("{recipient:?} is no longer bound")));
    };
    record.epoch += 1;
    t.put_name(&record)?;
    let mut m = get_meta(&*t.meta, recipient)?;
    if m.offline_epoch != 0 {
        m.offline_epoch = 0;
        m.next = 0;
        t.put_meta(recipient, &m)?;
    }
    page.live_epoch = Some(record.epoch);
    Ok(page)
}

/// Forgets `recipient`'s messages numbered up to `upto` (acknowledged, or all of them for a
/// purge); returns how many were waiting.
pub(crate) fn remove_upto(
    t: &mut InboxTables<'_, '_>,
    inboxes: &mut Inboxes,
    recipient: &str,
    upto: u64,
) -> Result<u64, StoreError> {
    let mut m = get_meta(&*t.meta, recipient)?;
    if upto <= m.acked {
        return Ok(0);
    }
    let old = m.acked;
    let (mut count, mut bytes, mut highest) = (0u64, 0u64, old);
    // Segments starting after `upto` hold nothing at or below it.
    let mut gone = Vec::new();
    for entry in t.inbox.range((recipient, 0)..=(recipient, upto)).map_err(store_error)? {
        let (key, value) = entry.map_err(store_error)?;
        let first = key.value().1;
        let mut whole = true;
        for record in records(value.value()) {
            let record = record.map_err(|()| damaged(recipient, first))?;
            if record.seq > upto {
                whole = false;
                continue;
            }
            highest = highest.max(record.seq);
            if record.seq > old {
                count += 1;
                bytes += record.body.len() as u64;
            }
        }
        if whole {
            gone.push(first);
        }
    }
    for first in gone {
        t.delete_segment(recipient, first)?;
    }
    // The floor never passes a number not yet stored: a purge (`upto` = MAX) stops at the
    // highest number it removed, so later messages are not hidden.
    m.acked = if upto == u64::MAX { highest } else { upto };
    forget(inboxes, &mut m, count, bytes);
    if m.count == 0 {
        m.oldest = u64::MAX;
    }
    t.put_meta(recipient, &m)?;
    Ok(count)
}

/// Deletes everything stored for `recipient` and its counts (the name was released: a later
/// owner starts with an empty inbox).
pub(crate) fn forget_inbox(
    t: &mut InboxTables<'_, '_>,
    inboxes: &mut Inboxes,
    recipient: &str,
) -> Result<(), StoreError> {
    remove_upto(t, inboxes, recipient, u64::MAX)?;
    // Segments left whole because they were already acknowledged in part.
    let mut left = Vec::new();
    for entry in t.inbox.range((recipient, 0)..=(recipient, u64::MAX)).map_err(store_error)? {
        left.push(entry.map_err(store_error)?.0.value().1);
    }
    for first in left {
        t.delete_segment(recipient, first)?;
    }
    t.remove_meta(recipient)?;
    Ok(())
}

/// Takes `count` messages of `bytes` off a recipient's counts and the totals.
fn forget(inboxes: &mut Inboxes, m: &mut Meta, count: u64, bytes: u64) {
    let had = m.count > 0;
    m.count = m.count.saturating_sub(count);
    m.bytes = m.bytes.saturating_sub(bytes);
    let totals = &mut inboxes.totals;
    totals.messages = totals.messages.saturating_sub(count);
    totals.bytes = totals.bytes.saturating_sub(bytes);
    if had && m.count == 0 {
        totals.recipients = totals.recipients.saturating_sub(1);
    }
}

/// Removes every waiting message older than the age limit: reads every recipient's counts,
/// and the segments of those whose oldest message is past it.
pub(crate) fn expire(
    t: &mut InboxTables<'_, '_>,
    inboxes: &mut Inboxes,
    now: u64,
) -> Result<Vec<ExpiredMessage>, StoreError> {
    let cutoff = now.saturating_sub(inboxes.limits.max_age_ms);
    let mut due = Vec::new();
    for entry in t.meta.iter().map_err(store_error)? {
        let (key, value) = entry.map_err(store_error)?;
        let recipient = key.value();
        let m = Meta::decode(value.value())
            .ok_or_else(|| StoreError(format!("the inbox counts of {recipient:?} are damaged")))?;
        if m.count > 0 && m.oldest < cutoff {
            due.push((recipient.to_string(), m));
        }
    }
    let mut expired = Vec::new();
    for (recipient, mut m) in due {
        let mut segments = Vec::new();
        for entry in t
            .inbox
            .range((recipient.as_str(), 0)..=(recipient.as_str(), u64::MAX))
            .map_err(store_error)?
        {
            let (key, value) = entry.map_err(store_error)?;
            segments.push((key.value().1, value.value().to_vec()));
        }
        let (mut count, mut bytes, mut oldest) = (0u64, 0u64, u64::MAX);
        for (first, segment) in segments {
            let (mut kept, mut changed) = (Vec::new(), false);
            for record in records(&segment) {
                let record = record.map_err(|()| damaged(&recipient, first))?;
                if record.seq <= m.acked {
                    changed = true;
                    continue;
                }
                if record.time < cutoff {
                    changed = true;
                    count += 1;
                    bytes += record.body.len() as u64;
                    expired.push(ExpiredMessage {
                        recipient: recipient.clone(),
                        id: record.id,
                        sender: record.sender,
                    });
                } else {
                    kept.extend_from_slice(record.raw);
                    oldest = oldest.min(record.time);
                }
            }
            if !changed {
                continue;
            }
            if kept.is_empty() {
                t.delete_segment(&recipient, first)?;
            } else {
                t.put_segment(&recipient, first, &kept)?;
            }
        }
        forget(inboxes, &mut m, count, bytes);
        m.oldest = if m.count == 0 { u64::MAX } else { oldest };
        t.put_meta(&recipient, &m)?;
    }
    Ok(expired)
}

/// Adds up the inboxes' counts (at open).
pub(crate) fn totals(
    meta: &impl ReadableTable<&'static str, &'static [u8]>,
) -> Result<Totals, StoreError> {
    let mut totals = Totals::default();
    for entry in meta.iter().map_err(store_error)? {
        let (key, value) = entry.map_err(store_error)?;
        let m = Meta::decode(value.value())
            .ok_or_else(|| StoreError(format!("bad inbox counts for {:?}", key.value())))?;
        if m.count > 0 {
            totals.recipients += 1;
            totals.messages += m.count;
            totals.bytes += m.bytes;
        }
    }
    Ok(totals)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn envelope(id: u64, time: u64, body: &[u8]) -> Envelope {
        Envelope {
            recipient: "bob".into(),
            body: Bytes::copy_from_slice(body),
            seq: None,
            id,
            time,
            sender: Arc::new(SenderRef {
                canonical: "alice".into(),
                token: 9,
                keyed: true,
                receipt: true,
            }),
        }
    }

    #[test]
    fn records_round_trip_and_damage_is_noticed() {
        let mut segment = Vec::new();
        put_record(&mut segment, &envelope(1, 10, b"one"), 5);
        put_record(&mut segment, &envelope(2, 20, b"two"), 6);
        let got: Vec<(u64, u64, u64, Vec<u8>)> = records(&segment)
            .map(|r| r.map(|r| (r.seq, r.id, r.time, r.body.to_vec())).unwrap())
            .collect();
        assert_eq!(got, vec![(5, 1, 10, b"one".to_vec()), (6, 2, 20, b"two".to_vec())]);
        let first = records(&segment).next().unwrap().unwrap();
        assert_eq!(first.sender.canonical, "alice");
        assert!(first.sender.keyed && first.sender.receipt);
        for cut in 1..segment.len() {
            let all: Vec<_> = records(&segment[..cut]).collect();
            assert!(all.iter().any(Result::is_err) || all.len() < 2, "cut at {cut}");
        }
    }

    #[test]
    fn counts_round_trip() {
        let m = Meta { count: 1, bytes: 2, offline_epoch: 3, next: 4, acked: 5, oldest: 6 };
        assert_eq!(Meta::decode(&m.encode()), Some(m));
        assert_eq!(Meta::decode(&m.encode()[..47]), None);
    }
}
