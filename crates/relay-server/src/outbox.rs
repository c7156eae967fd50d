//! A connection's outbox: the frames waiting to be written to one client, bounded by bytes.
//!
//! Messages are encoded into the outbox as they are queued, back to back in one buffer, so the
//! sender's connection does the encoding while the message is still in its cache, nothing is
//! allocated per message, and the writer task takes the whole buffer in one go and writes it
//! with as few syscalls as the socket allows. Two buffers take turns: while the writer writes
//! one, senders fill the other. A keyed session keeps each batch it was sent, as written,
//! until its client has acknowledged every message in it (see [`FrameLog`]).
//!
//! A full outbox pushes back: [`Outbox::wait_for_room`] waits a bounded time for the writer to
//! make room, so a sender that outruns a healthy receiver is slowed to its pace instead of
//! losing messages. A receiver that makes no room in that time is marked stalled, and pushes
//! to it fail at once until it writes again, so a stuck receiver costs its senders one wait,
//! not one per message.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, MutexGuard};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use relay_proto::{
    FRAME_HEADER_LEN, Handoff, Kind, Message, MessageRef, decode_body, encode_body_ref,
    encoded_len_ref,
};

use crate::inbox::{SenderRef, Stored};

/// Why a message could not be queued.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum PushError {
    /// The receiver already has its limit of bytes waiting; room may come (see
    /// [`Outbox::wait_for_room`]).
    Full,
    /// Full, and the receiver wrote nothing during a sender's last wait: it is not keeping
    /// up, so there is no point waiting.
    Stalled,
    /// The connection is closing; nothing more will be written.
    Closed,
}

/// A buffer the writer hands back is kept for the next batch unless it grew past this, so a
/// burst does not pin a large buffer.
const MAX_KEPT_BUFFER: usize = 64 * 1024;

/// The least room a keyed session's next queue starts with, when the writer's batch is kept.
const KEPT_BATCH_ROOM: usize = 4 * 1024;

/// A cloneable handle to one connection's outbox.
#[derive(Clone, Debug)]
pub(crate) struct Outbox {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    /// The state, behind the shared queue primitive: its lock is held only to encode one
    /// message or swap buffers; the writer is its consumer (woken when the queue goes from
    /// empty to not empty), senders its producers (woken when bytes are written, acknowledged,
    /// or the outbox closes).
    handoff: Handoff<State>,
    limit: usize,
    /// Set (under the state lock) when the outbox closes. Readable without the lock, for
    /// routing's cheap check that a remembered receiver is still there.
    closed: AtomicBool,
    /// This connection's messages sent to the store and not yet answered (see
    /// [`Outbox::stored_reply`]).
    storing: AtomicUsize,
}

/// A keyed session's delivery state: what was delivered and not yet acknowledged (moved to
/// its inbox if the session ends), and whether its messages go to the store instead.
struct Tracked {
    /// The recipient's canonical name.
    recipient: Arc<str>,
    /// Messages for this session go to its inbox (it is reading what was stored, and nothing
    /// may overtake that), not to the queue.
    storing: bool,
    /// Messages sent to the store while `storing`: the drain goes live only if none came
    /// after its last read.
    submitted: u64,
    /// Where the unacknowledged frames are, in `runs`' order.
    frames: FrameLog,
    /// The unacknowledged messages, in runs.
    runs: VecDeque<Run>,
    /// How many messages the runs hold.
    unacked: usize,
    /// Most bytes in `frames`: past it, pushes wait for acknowledgements like for room.
    window: usize,
    /// Called once, under the lock, when the session ends ([`Outbox::seal`] or a close), with
    /// what was never acknowledged, so it is stored before anything routed after.
    on_close: Option<OnClose>,
    /// The session has ended: routed messages are refused as if the outbox were closed
    /// (they go to the inbox, after what was handed over), though the writer may still be
    /// writing the farewell.
    sealed: bool,
}

impl std::fmt::Debug for Tracked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tracked")
            .field("recipient", &self.recipient)
            .field("storing", &self.storing)
            .field("unacked", &self.unacked)
            .finish_non_exhaustive()
    }
}

/// What a closing tracked outbox hands over: every unacknowledged message, with its frame
/// body as delivered.
pub(crate) type OnClose = Box<dyn FnOnce(&str, Vec<(Unacked, Bytes)>) + Send>;

/// A delivered message the client did not acknowledge, as handed over when its session ends.
#[derive(Debug)]
pub(crate) struct Unacked {
    pub(crate) seq: u64,
    /// The sender's id for it.
    pub(crate) id: u64,
    /// Who to send the receipt; `None` for what needs none (a receipt).
    pub(crate) sender: Option<Arc<SenderRef>>,
    /// It came from the inbox (and is still there).
    pub(crate) stored: bool,
}

/// A run of unacknowledged messages: consecutive numbers and consecutive ids from one sender,
/// all from the inbox or none. A busy flow is one run, so keeping a message costs a count, not
/// an entry of its own: a busy keyed session has a megabyte or so in flight, and writing an
/// entry per message into that much memory was a cache miss each, a tenth of the server's
/// time. (Each message's frame is found again by its number, see [`hand_over`].)
#[derive(Debug)]
struct Run {
    /// The first message's number and its sender's id for it.
    seq: u64,
    id: u64,
    count: usize,
    /// They came from the inbox: acknowledging them removes them there.
    stored: bool,
    /// Who to send the receipts; `None` for what needs none (receipts).
    sender: Option<Arc<SenderRef>>,
}

impl Run {
    fn extends(&self, seq: u64, id: u64, stored: bool, sender: Option<&Arc<SenderRef>>) -> bool {
        let next = self.count as u64;
        self.seq.wrapping_add(next) == seq
            && self.id.wrapping_add(next) == id
            && self.stored == stored
            && match (&self.sender, sender) {
                (Some(last), Some(sender)) => Arc::ptr_eq(last, sender),
                (None, None) => true,
                _ => false,
            }
    }
}

/// The first `count` messages of a run, taken off it.
struct Span<'a> {
    seq: u64,
    id: u64,
    count: usize,
    stored: bool,
    sender: &'a Option<Arc<SenderRef>>,
}

impl Span<'_> {
    /// Each message's number and id.
    fn each(&self) -> impl Iterator<Item = (u64, u64)> + use<> {
        let (seq, id) = (self.seq, self.id);
        (0..self.count as u64).map(move |i| (seq.wrapping_add(i), id.wrapping_add(i)))
    }
}

impl Tracked {
    /// Keeps message number `seq` (the sender's `id`), sent by `sender`.
    fn keep(&mut self, seq: u64, id: u64, stored: bool, sender: Option<&Arc<SenderRef>>) {
        self.unacked += 1;
        if let Some(run) = self.runs.back_mut()
            && run.extends(seq, id, stored, sender)
        {
            run.count += 1;
            return;
        }
        self.runs.push_back(Run { seq, id, count: 1, stored, sender: sender.cloned() });
    }

    /// Takes the messages numbered up to `upto` off the front, a span of a run at a time.
    fn pop_upto(&mut self, upto: u64, mut each: impl FnMut(Span<'_>)) {
        while let Some(run) = self.runs.front_mut() {
            if run.seq > upto {
                break;
            }
            let count = usize::try_from(upto - run.seq).map_or(run.count, |n| run.count.min(n + 1));
            let (seq, id) = (run.seq, run.id);
            self.unacked -= count;
            each(Span { seq, id, count, stored: run.stored, sender: &run.sender });
            if count == run.count {
                self.runs.pop_front();
            } else {
                run.seq = seq.wrapping_add(count as u64);
                run.id = id.wrapping_add(count as u64);
                run.count -= count;
            }
        }
    }
}

/// What an acknowledgement released.
#[derive(Debug, Default)]
pub(crate) struct Acked {
    /// Receipts due, per sender: the ids, in order.
    pub(crate) receipts: Vec<(Arc<SenderRef>, Vec<u64>)>,
    /// The highest number acknowledged that came from the inbox.
    pub(crate) stored_upto: Option<u64>,
}

/// What [`Outbox::overflow`] did with a message the queue had no room for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Overflow {
    /// The session now stores what is routed to it, this message first: whoever called must
    /// start reading its inbox back into the queue, after number `after` (the last it was
    /// given), for the recipient named.
    Started { after: u64, recipient: Arc<str> },
    /// It was storing already; the message went to the store too.
    Storing,
    /// Not a keyed session: nothing was stored.
    NotTracked,
    /// Closed or its session ended: nothing was stored.
    Closed,
}

/// Where a routed message went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Delivery {
    /// Into the queue.
    Queued,
    /// To the receiver's inbox (it is reading what was stored before).
    Storing,
}

#[derive(Debug, Default)]
struct State {
    /// Encoded frames waiting for the writer, back to back.
    queue: BytesMut,
    /// The writer's last buffer, emptied, waiting to become the next `queue`.
    spare: BytesMut,
    /// Bytes the writer has taken and not yet written; they still count against the limit.
    taken: usize,
    /// A sender waited for room and none came; cleared when the writer writes again.
    stalled: bool,
    /// How many times the writer has written, to tell a stuck receiver from a busy one.
    written: u64,
    /// How many bytes the writer has written in all: with the bytes taken and queued, where
    /// in the stream a frame queued now ends (see [`Outbox::push_at`]).
    written_bytes: u64,
    /// The protocol version of the client: every frame is encoded in its layout.
    version: u16,
    /// The sequence number the next delivered chat message gets (version 2).
    next_seq: u64,
    /// Who sent the chat frames in `queue`: `(offset, sender)` wherever the sender changes,
    /// so a failed connection's undelivered messages are reported to the connection that
    /// sent each one, never to a later holder of the same name. One entry per run of frames
    /// from one sender, so a busy pair adds one per batch.
    runs: Vec<(usize, u64)>,
    /// The same for the batch the writer holds.
    taken_runs: Vec<(usize, u64)>,
    /// Free the buffers once what is queued now is written (see [`Outbox::release_when_written`]).
    release: bool,
    /// For a keyed session: its unacknowledged messages. Boxed: most sessions have none.
    tracked: Option<Box<Tracked>>,
}

/// Where [`Outbox::push_run`] takes its messages from: the sender's buffered frames.
pub(crate) trait RunSource {
    /// The next message of the run, if there is one; not taken yet.
    fn peek(&mut self) -> Option<MessageRef<'_>>;
    /// The message last peeked was queued: take it.
    fn take(&mut self);
}

/// A look at an outbox (see [`Outbox::queue`]).
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct QueueState {
    pub(crate) bytes: u64,
    pub(crate) unacked: u64,
    pub(crate) version: u16,
}

/// A chat message that was queued and never written, and the registration (token) of the
/// connection that sent it.
pub(crate) type Unwritten = (Message, u64);

/// Bytes a frame with a body of `encoded_len` occupies on the wire, which is what the outbox
/// limit counts.
pub(crate) fn wire_size(encoded_len: usize) -> usize {
    FRAME_HEADER_LEN + encoded_len
}

/// Where a keyed session's unacknowledged frames are: in batches the writer took, kept until
/// every such frame in them is acknowledged, or still in the queue. A busy session's batches
/// are kept as they are, shared with the writer, never copied: copying each delivered frame
/// into a log of its own cost a busy keyed session about a tenth of the server's time, as the
/// log holds what is in flight in the sockets (about a megabyte per busy receiver), so every
/// copy went to memory out of the cache.
///
/// What counts against the window is what is held: whole kept batches (with any replies or
/// pings between the messages), and the unacknowledged frames still queued. So a client that
/// never acknowledges holds at most the window, whatever else it is sent.
#[derive(Debug, Default)]
struct FrameLog {
    /// Taken batches that hold unacknowledged frames, each with how many it holds.
    batches: VecDeque<(Bytes, usize)>,
    /// How many unacknowledged frames are still in the queue (they come after the batches'),
    /// and their bytes.
    queued: usize,
    queued_bytes: usize,
    /// Bytes of the kept batches.
    held: usize,
    /// A batch all of whose frames were acknowledged, emptied for the next queue: reused
    /// rather than freed, as a busy session would otherwise allocate (and page in) one per
    /// batch.
    spare: Option<BytesMut>,
}

/// The largest batch kept for reuse as a queue.
const MAX_REUSED_BATCH: usize = 1024 * 1024;

impl FrameLog {
    /// Bytes held for unacknowledged frames: what the window counts.
    fn len(&self) -> usize {
        self.held + self.queued_bytes
    }

    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A frame of `len` bytes was queued.
    fn push(&mut self, len: usize) {
        self.queued += 1;
        self.queued_bytes += len;
    }

    /// Whether the queue holds unacknowledged frames (then the batch taken from it is kept).
    fn has_queued(&self) -> bool {
        self.queued > 0
    }

    /// The writer took the queue: `batch` holds its frames, to be kept while some are
    /// unacknowledged.
    fn taken(&mut self, batch: Bytes) {
        if self.queued > 0 {
            self.held += batch.len();
            self.batches.push_back((batch, self.queued));
        }
        self.queued = 0;
        self.queued_bytes = 0;
    }

    /// Forgets the oldest `count` frames. A client may acknowledge a number it has not been
    /// sent yet (then the frame is still in the queue, and is forgotten there; its bytes count
    /// until the writer takes it).
    fn forget(&mut self, mut count: usize) {
        while count > 0 {
            let Some((_, held)) = self.batches.front_mut() else {
                self.queued = self.queued.saturating_sub(count);
                if self.queued == 0 {
                    self.queued_bytes = 0;
                }
                return;
            };
            let n = count.min(*held);
            *held -= n;
            count -= n;
            if *held == 0
                && let Some((batch, _)) = self.batches.pop_front()
            {
                self.held -= batch.len();
                // Unique once the writer has let go of it.
                if self.spare.is_none()
                    && let Ok(mut batch) = batch.try_into_mut()
                    && batch.capacity() <= MAX_REUSED_BATCH
                {
                    batch.clear();
                    self.spare = Some(batch);
                }
            }
        }
    }
}

/// The bodies of the frames in `frames` (back to back, length-prefixed) that carry the numbers
/// `numbers` yields, in order: how a session's unacknowledged messages are found in what it
/// holds (only they carry those numbers, in that order; other frames carry none, or an
/// acknowledged one). `found` is given each one's body, as a range of `frames`.
fn find_numbered(
    mut frames: &[u8],
    numbers: &mut std::iter::Peekable<impl Iterator<Item = u64>>,
    mut found: impl FnMut(std::ops::Range<usize>),
) {
    let mut at = 0;
    while let Some(&want) = numbers.peek()
        && let Some(header) = frames.first_chunk::<FRAME_HEADER_LEN>()
    {
        let len = u32::from_be_bytes(*header) as usize;
        let body = at + FRAME_HEADER_LEN..at + FRAME_HEADER_LEN + len;
        let Some(bytes) = frames.get(FRAME_HEADER_LEN..FRAME_HEADER_LEN + len) else { return };
        if relay_proto::decode_ref(bytes).is_ok_and(|msg| msg.seq == want) {
            found(body);
            numbers.next();
        }
        frames = &frames[FRAME_HEADER_LEN + len..];
        at += FRAME_HEADER_LEN + len;
    }
}

/// A batch of frames the writer took (see [`Outbox::take`]): its own buffer, given back for
/// reuse once written, or one a keyed session keeps for its unacknowledged frames.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Batch {
    Own(BytesMut),
    Kept(Bytes),
}

impl std::ops::Deref for Batch {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match self {
            Batch::Own(batch) => batch,
            Batch::Kept(batch) => batch,
        }
    }
}

/// Hands a tracked session's unacknowledged messages to its `on_close`, once, and seals it.
fn hand_over(state: &mut State) {
    let Some(tracked) = state.tracked.as_mut() else { return };
    tracked.sealed = true;
    let Some(on_close) = tracked.on_close.take() else { return };
    // Each message's frame, found by its number in the kept batches, then in the queue.
    let mut numbers = tracked.runs.iter().flat_map(|run| {
        let (seq, count) = (run.seq, run.count as u64);
        (0..count).map(move |i| seq.wrapping_add(i))
    });
    let mut numbers = numbers.by_ref().peekable();
    let mut bodies = Vec::with_capacity(tracked.unacked);
    for (batch, _) in &tracked.frames.batches {
        find_numbered(batch, &mut numbers, |body| bodies.push(batch.slice(body)));
    }
    let queue = &state.queue;
    find_numbered(queue, &mut numbers, |body| bodies.push(Bytes::copy_from_slice(&queue[body])));
    if bodies.len() != tracked.unacked {
        // A bug, not a client's doing: say so rather than hand over less in silence.
        tracing::error!(recipient = %tracked.recipient, unacked = tracked.unacked,
            found = bodies.len(), "some unacknowledged messages' frames were not found");
    }
    let mut bodies = bodies.into_iter();
    let mut entries = Vec::with_capacity(tracked.unacked);
    tracked.pop_upto(u64::MAX, |span| {
        for (seq, id) in span.each() {
            let Some(body) = bodies.next() else { return };
            let unacked = Unacked { seq, id, sender: span.sender.clone(), stored: span.stored };
            entries.push((unacked, body));
        }
    });
    tracked.frames = FrameLog::default();
    on_close(&tracked.recipient, entries);
}

/// Whether a message gets a sequence number: a chat message delivered from a sender, or a
/// receipt.
fn is_sequenced(msg: &MessageRef<'_>) -> bool {
    (msg.kind == Kind::Chat && !msg.from.is_empty()) || msg.kind == Kind::Delivered
}

/// Appends `msg`'s frame (length prefix and body) to `dst`. The frame limit was checked by
/// whoever built the message (the router for chat, the server's own replies are small).
fn put_frame(dst: &mut BytesMut, msg: &MessageRef<'_>, size: usize) {
    let start = dst.len();
    dst.reserve(size);
    // `size - FRAME_HEADER_LEN` is at most the frame limit (at most 16 MiB), so it fits.
    let len = u32::try_from(size - FRAME_HEADER_LEN).unwrap_or(u32::MAX);
    dst.extend_from_slice(&len.to_be_bytes());
    if let Err(e) = encode_body_ref(msg, dst) {
        // Does not happen for a well-formed message; dropping one frame beats corrupting the
        // stream.
        tracing::error!(error = %e, "dropping a message that does not encode");
        dst.truncate(start);
    }
}

/// Decodes the chat frames in `frames` that end after byte `from` (so a frame cut by a failed
/// write counts) and appends them to `into` with their senders from `runs`. Used only when a
/// connection fails, to tell the senders of what was never written.
pub(crate) fn unpack(
    mut frames: &[u8],
    from: usize,
    runs: &[(usize, u64)],
    into: &mut Vec<Unwritten>,
) {
    let (mut start, mut run) = (0, 0);
    while frames.len() >= FRAME_HEADER_LEN {
        let len = frames.get_u32() as usize;
        let Some(body) = frames.get(..len) else { break };
        let end = start + FRAME_HEADER_LEN + len;
        while runs.get(run + 1).is_some_and(|&(at, _)| at <= start) {
            run += 1;
        }
        if end > from
            && let Ok(msg) = decode_body(body)
            && msg.kind == Kind::Chat
            && !msg.from.is_empty()
        {
            let sender = runs.get(run).filter(|&&(at, _)| at <= start).map_or(0, |&(_, t)| t);
            into.push((msg, sender));
        }
        start = end;
        frames.advance(len);
    }
}

impl Outbox {
    /// An empty outbox holding at most `limit` bytes of frames.
    pub(crate) fn new(limit: usize) -> Outbox {
        Outbox {
            shared: Arc::new(Shared {
                // Version 1 until the client says otherwise: a version 1 client never does.
                handoff: Handoff::new(State { version: 1, next_seq: 1, ..State::default() }),
                limit,
                closed: AtomicBool::new(false),
                storing: AtomicUsize::new(0),
            }),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.shared.handoff.lock()
    }

    /// What is queued for the client and not yet written (bytes), the messages it was
    /// delivered and has not acknowledged, and its protocol version (the console's `who`).
    pub(crate) fn queue(&self) -> QueueState {
        let state = self.state();
        QueueState {
            bytes: (state.queue.len() + state.taken) as u64,
            unacked: state.tracked.as_ref().map_or(0, |t| t.unacked as u64),
            version: state.version,
        }
    }

    /// True once the outbox is closed. Exact under the state lock (where it is set);
    /// without it, a hint that may lag a close by a moment.
    pub(crate) fn is_closed(&self) -> bool {
        self.shared.closed.load(Ordering::Relaxed)
    }

    /// Sets the client's protocol version (every frame from now on is encoded in its layout)
    /// and the first sequence number its delivered chat messages get. Called during
    /// registration, before anyone can route to this outbox.
    pub(crate) fn set_session(&self, version: u16, first_seq: u64) {
        let mut state = self.state();
        state.version = version;
        state.next_seq = first_seq;
    }

    /// Queues `msg` unless that would take the outbox over its limit or it is closed. Never
    /// waits. The frame is encoded in the client's protocol version; a chat message delivered
    /// to a version 2 client gets the next sequence number here, under the lock, so sequence
    /// numbers follow queue order.
    pub(crate) fn push(&self, msg: &MessageRef<'_>) -> Result<(), PushError> {
        self.push_from(msg, 0)
    }

    /// [`Outbox::push`], returning where in the stream of bytes written to the client the
    /// frame ends: once the client answers it (a ping), it has read everything up to there.
    pub(crate) fn push_at(&self, msg: &MessageRef<'_>) -> Result<u64, PushError> {
        let mut state = self.state();
        let (_, first) = self.push_locked(&mut state, msg, 0, None, |_, _| {})?;
        let end = state.written_bytes + (state.taken + state.queue.len()) as u64;
        drop(state);
        if first {
            self.shared.handoff.wake_consumer();
        }
        Ok(end)
    }

    /// How many bytes have been written to the client in all.
    pub(crate) fn written_bytes(&self) -> u64 {
        self.state().written_bytes
    }

    /// [`Outbox::push`] for a chat message routed from the connection registered with
    /// `sender` (its claim's token), remembered in case the message is never written.
    pub(crate) fn push_from(&self, msg: &MessageRef<'_>, sender: u64) -> Result<(), PushError> {
        self.push_routed(msg, sender, None, |_, _| {}).map(drop)
    }

    /// [`Outbox::push_from`] for a routed message, which gets a receipt from `origin` once
    /// acknowledged, if this is a keyed session. If the session is reading its inbox, the
    /// message goes there instead: `store` is called with it (in the version 2 layout) and
    /// the recipient's canonical name, under the lock, so it is stored before the session
    /// can go live.
    pub(crate) fn push_routed(
        &self,
        msg: &MessageRef<'_>,
        sender: u64,
        origin: Option<&Arc<SenderRef>>,
        store: impl FnOnce(&MessageRef<'_>, &str),
    ) -> Result<Delivery, PushError> {
        let pushed = self.push_locked(&mut self.state(), msg, sender, origin, store);
        // A writer only waits on an empty queue, so only the first frame needs to wake it
        // (the wake-up keeps a permit if the writer is not waiting yet).
        if let Ok((_, true)) = pushed {
            self.shared.handoff.wake_consumer();
        }
        pushed.map(|(delivery, _)| delivery)
    }

    /// Queues, under one lock, the chat messages `run` yields, all routed from the connection
    /// registered with `sender` (see [`Outbox::push_routed`]): for a sender whose socket read
    /// holds many messages for this receiver, so that a busy receiver's lock is taken once per
    /// read and not once per message (64 senders to one receiver spent over a third of the
    /// server's time taking it). Stops, leaving it untaken, at the first message that cannot be
    /// queued as it is (no room, closed): the caller routes that one the usual way. Nothing is
    /// queued for a keyed session reading its inbox (messages go to the store then). Returns
    /// how many were queued.
    pub(crate) fn push_run(
        &self,
        sender: u64,
        origin: Option<&Arc<SenderRef>>,
        run: &mut dyn RunSource,
    ) -> usize {
        let (mut queued, mut wake) = (0, false);
        {
            let mut state = self.state();
            if state.tracked.as_ref().is_some_and(|t| t.storing) {
                return 0;
            }
            while let Some(msg) = run.peek() {
                match self.push_locked(&mut state, &msg, sender, origin, |_, _| {}) {
                    Ok((Delivery::Queued, was_empty)) => wake |= was_empty,
                    // Storing is ruled out above (it changes only under this lock); a refusal
                    // queues nothing.
                    _ => break,
                }
                run.take();
                queued += 1;
            }
        }
        if wake {
            self.shared.handoff.wake_consumer();
        }
        queued
    }

    /// [`Outbox::push_routed`] on the locked state; also says whether the queue was empty
    /// (then the writer must be woken).
    fn push_locked(
        &self,
        state: &mut State,
        msg: &MessageRef<'_>,
        sender: u64,
        origin: Option<&Arc<SenderRef>>,
        store: impl FnOnce(&MessageRef<'_>, &str),
    ) -> Result<(Delivery, bool), PushError> {
        {
            if self.is_closed() {
                return Err(PushError::Closed);
            }
            let sequenced = is_sequenced(msg);
            if sequenced && state.tracked.as_ref().is_some_and(|t| t.sealed) {
                return Err(PushError::Closed);
            }
            if sequenced
                && let Some(tracked) = state.tracked.as_mut()
                && tracked.storing
            {
                tracked.submitted += 1;
                store(
                    &MessageRef { version: relay_proto::PROTOCOL_VERSION, ..*msg },
                    &tracked.recipient,
                );
                return Ok((Delivery::Storing, false));
            }
            let mut msg = MessageRef { version: state.version, ..*msg };
            if sequenced {
                msg.seq = state.next_seq;
            }
            let size = wire_size(encoded_len_ref(&msg));
            if state.queue.len() + state.taken + size > self.shared.limit
                || state
                    .tracked
                    .as_ref()
                    .is_some_and(|t| sequenced && t.frames.len() + size > t.window)
            {
                return Err(if state.stalled { PushError::Stalled } else { PushError::Full });
            }
            let was_empty = state.queue.is_empty();
            if sequenced && state.runs.last().is_none_or(|&(_, last)| last != sender) {
                let at = state.queue.len();
                state.runs.push((at, sender));
            }
            put_frame(&mut state.queue, &msg, size);
            if sequenced {
                let seq = state.next_seq;
                state.next_seq += 1;
                if let Some(tracked) = state.tracked.as_mut() {
                    tracked.frames.push(size);
                    tracked.keep(seq, msg.id, false, origin);
                }
            }
            Ok((Delivery::Queued, was_empty))
        }
    }

    /// Whether this is a keyed session's outbox (its messages can go to an inbox).
    pub(crate) fn is_tracked(&self) -> bool {
        self.state().tracked.is_some()
    }

    /// Makes this a keyed session's outbox: delivered messages are kept until acknowledged
    /// (at most `window` bytes of them), and until [`Outbox::go_live`] everything routed here
    /// goes to the inbox of `recipient`. Called during registration, before anyone can route
    /// here.
    pub(crate) fn track(&self, recipient: Arc<str>, window: usize, on_close: OnClose) {
        self.state().tracked = Some(Box::new(Tracked {
            recipient,
            storing: true,
            submitted: 0,
            frames: FrameLog::default(),
            runs: VecDeque::new(),
            unacked: 0,
            window,
            on_close: Some(on_close),
            sealed: false,
        }));
    }

    /// Ends a keyed session's delivery: what it was not acknowledged is handed over (to be
    /// stored), and from now on routed messages are refused as closed, so they are stored
    /// after it. The queue stays open for the session's last words. Nothing for other
    /// sessions.
    pub(crate) fn seal(&self) {
        hand_over(&mut self.state());
    }

    /// How many messages were sent to the store since this session started reading its inbox.
    pub(crate) fn submitted(&self) -> u64 {
        self.state().tracked.as_ref().map_or(0, |t| t.submitted)
    }

    /// Ends the inbox reading: from now on routed messages are queued, numbered from
    /// `first_seq`, unless more went to the store since the read that found the inbox empty
    /// (`submitted` then differs), in which case nothing changes and false is returned.
    pub(crate) fn go_live(&self, submitted: u64, first_seq: u64) -> bool {
        let mut state = self.state();
        let state = &mut *state;
        match state.tracked.as_mut() {
            Some(tracked) if tracked.storing && tracked.submitted == submitted => {
                tracked.storing = false;
                state.next_seq = first_seq;
                true
            }
            _ => false,
        }
    }

    /// Queues a message read from this session's inbox, as it was stored (numbered), waiting
    /// for room in the queue and the unacknowledged window. Fails only if the outbox closes.
    pub(crate) async fn push_stored(&self, item: Stored) -> Result<(), PushError> {
        let size = wire_size(item.body.len());
        let pushed = self
            .shared
            .handoff
            .produce(|state| {
                if self.is_closed() {
                    return Some(Err(PushError::Closed));
                }
                let Some(tracked) = state.tracked.as_mut() else {
                    return Some(Err(PushError::Closed));
                };
                // An empty queue and window always take one message, however large.
                let fits = (state.queue.len() + state.taken + size <= self.shared.limit
                    || state.queue.is_empty() && state.taken == 0)
                    && (tracked.frames.len() + size <= tracked.window || tracked.frames.is_empty());
                if !fits {
                    return None;
                }
                let was_empty = state.queue.is_empty();
                let len = u32::try_from(item.body.len()).unwrap_or(u32::MAX);
                state.queue.extend_from_slice(&len.to_be_bytes());
                state.queue.extend_from_slice(&item.body);
                tracked.frames.push(size);
                let sender = item.sender.receipt.then_some(&item.sender);
                tracked.keep(item.seq, item.id, true, sender);
                Some(Ok(was_empty))
            })
            .await?;
        if pushed {
            self.shared.handoff.wake_consumer();
        }
        Ok(())
    }

    /// A keyed session's queue (or window) had no room for `msg` within the send wait: rather
    /// than refuse it, its inbox takes it, and everything routed here after it, as while the
    /// session read its inbox at login, until a drain has caught up (so no sender's messages
    /// are reordered, and none waits longer). `store` is called with it (in the version 2
    /// layout) and the recipient, under the lock.
    pub(crate) fn overflow(
        &self,
        msg: &MessageRef<'_>,
        store: impl FnOnce(&MessageRef<'_>, &str),
    ) -> Overflow {
        let mut state = self.state();
        if self.is_closed() {
            return Overflow::Closed;
        }
        let last = state.next_seq.saturating_sub(1);
        let Some(tracked) = state.tracked.as_mut() else { return Overflow::NotTracked };
        if tracked.sealed {
            return Overflow::Closed;
        }
        let started = !std::mem::replace(&mut tracked.storing, true);
        tracked.submitted += 1;
        store(&MessageRef { version: relay_proto::PROTOCOL_VERSION, ..*msg }, &tracked.recipient);
        if started {
            Overflow::Started { after: last, recipient: tracked.recipient.clone() }
        } else {
            Overflow::Storing
        }
    }

    /// The client acknowledged every message numbered up to `upto`: forget them, and say
    /// which receipts are due.
    pub(crate) fn ack(&self, upto: u64) -> Acked {
        let mut acked = Acked::default();
        {
            let mut state = self.state();
            let Some(tracked) = state.tracked.as_mut() else { return acked };
            let before = tracked.unacked;
            // Out while `pop_upto` borrows the rest (moving it is a few words).
            let mut frames = std::mem::take(&mut tracked.frames);
            tracked.pop_upto(upto, |span| {
                frames.forget(span.count);
                if span.stored {
                    acked.stored_upto = Some(span.seq.wrapping_add(span.count as u64 - 1));
                }
                if let Some(sender) = span.sender {
                    let ids = span.each().map(|(_, id)| id);
                    match acked.receipts.last_mut() {
                        Some((last, due)) if Arc::ptr_eq(last, sender) || **last == **sender => {
                            due.extend(ids)
                        }
                        _ => acked.receipts.push((sender.clone(), ids.collect())),
                    }
                }
            });
            tracked.frames = frames;
            if tracked.unacked == before {
                return acked;
            }
        }
        self.shared.handoff.wake_producers();
        acked
    }

    /// A message from this connection went to the store: its reply is owed.
    pub(crate) fn storing(&self) {
        self.shared.storing.fetch_add(1, Ordering::Relaxed);
    }

    /// How many of this connection's messages wait for the store's answer.
    pub(crate) fn stored_backlog(&self) -> usize {
        self.shared.storing.load(Ordering::Relaxed)
    }

    /// Queues the store's answer about one of this connection's messages, whatever the limit
    /// (there are at most as many as the connection may have waiting; see
    /// [`Outbox::wait_for_store`]), and wakes the connection if it waits for the store.
    pub(crate) fn stored_reply(&self, reply: Option<&MessageRef<'_>>) {
        if let Some(reply) = reply {
            let was_empty = {
                let mut state = self.state();
                if self.is_closed() {
                    None
                } else {
                    let msg = MessageRef { version: state.version, ..*reply };
                    let was_empty = state.queue.is_empty();
                    put_frame(&mut state.queue, &msg, wire_size(encoded_len_ref(&msg)));
                    Some(was_empty)
                }
            };
            if was_empty == Some(true) {
                self.shared.handoff.wake_consumer();
            }
        }
        self.shared.storing.fetch_sub(1, Ordering::Relaxed);
        self.shared.handoff.wake_producers();
    }

    /// Waits until fewer than `max` of this connection's messages wait for the store.
    pub(crate) async fn wait_for_store(&self, max: usize) {
        self.shared
            .handoff
            .produce(|_| (self.stored_backlog() < max || self.is_closed()).then_some(()))
            .await;
    }

    /// Waits for room for `msg`, then queues it: for `wait` at most, however many senders
    /// compete for the room the receiver frees, so one busy receiver never holds a sender's
    /// session longer than that ([`PushError::Full`] then). If the receiver wrote nothing in
    /// that time, the outbox is marked stalled (so later pushes fail at once with
    /// [`PushError::Stalled`]) and the message is refused.
    pub(crate) async fn wait_for_room(
        &self,
        msg: &MessageRef<'_>,
        wait: Duration,
        sender: u64,
        origin: Option<&Arc<SenderRef>>,
    ) -> Result<(), PushError> {
        self.wait_for_room_as(msg, wait, sender, origin, false).await
    }

    /// [`Outbox::wait_for_room`] for the server's own replies to this client: a stall mark
    /// left by other senders does not refuse them, and none is left. Room comes as long as
    /// the client reads; one that reads nothing is dropped by its writer's write timeout.
    pub(crate) async fn wait_for_own_room(
        &self,
        msg: &MessageRef<'_>,
        wait: Duration,
    ) -> Result<(), PushError> {
        self.wait_for_room_as(msg, wait, 0, None, true).await
    }

    async fn wait_for_room_as(
        &self,
        msg: &MessageRef<'_>,
        wait: Duration,
        sender: u64,
        origin: Option<&Arc<SenderRef>>,
        own: bool,
    ) -> Result<(), PushError> {
        // Only a live session's outbox is ever full (one reading its inbox stores instead),
        // so nothing is stored from here.
        let mut seen = self.state().written;
        let mut deadline = tokio::time::Instant::now() + wait;
        loop {
            let pushed = self
                .shared
                .handoff
                .produce_until(deadline, |state| {
                    match self.push_locked(state, msg, sender, origin, |_, _| {}) {
                        Err(PushError::Full) => None,
                        Err(PushError::Stalled) if own => None,
                        done => Some(done),
                    }
                })
                .await;
            if let Some(done) = pushed {
                if let Ok((_, true)) = done {
                    self.shared.handoff.wake_consumer();
                }
                return done.map(drop);
            }
            let mut state = self.state();
            if state.written == seen {
                if own {
                    return Err(PushError::Stalled);
                }
                state.stalled = true;
                drop(state);
                return self.push_routed(msg, sender, origin, |_, _| {}).map(drop);
            }
            // The receiver did write; other senders took the room. Its own replies keep
            // waiting (the client reads; the write timeout judges it); a sender does not:
            // one busy receiver holds a sender at most the send wait, however many compete.
            if !own {
                return Err(PushError::Full);
            }
            seen = state.written;
            deadline = tokio::time::Instant::now() + wait;
        }
    }

    /// Closes the outbox, queuing `last` (if any) after everything already queued, whatever
    /// the limit. Later pushes fail with [`PushError::Closed`]; the writer finishes what is
    /// queued and stops. Closing twice keeps the first closing message.
    pub(crate) fn close(&self, last: Option<&Message>) {
        {
            let mut state = self.state();
            if self.is_closed() {
                return;
            }
            self.shared.closed.store(true, Ordering::Relaxed);
            if let Some(msg) = last {
                let msg = MessageRef { version: state.version, ..msg.as_ref() };
                put_frame(&mut state.queue, &msg, wire_size(encoded_len_ref(&msg)));
            }
            hand_over(&mut state);
        }
        self.shared.handoff.wake_consumer();
        // Senders waiting for room must learn that none will come.
        self.shared.handoff.wake_producers();
    }

    /// Waits until something is queued, then takes all of it: the frames, back to back.
    /// Returns `None` once the outbox is closed and empty.
    ///
    /// The bytes stay counted against the limit until the buffer comes back through
    /// [`Outbox::written`], so a batch the socket is still chewing on keeps holding its share.
    pub(crate) async fn take(&self) -> Option<Batch> {
        self.shared
            .handoff
            .consume(|state| {
                if !state.queue.is_empty() {
                    let spare = std::mem::take(&mut state.spare);
                    let batch = std::mem::replace(&mut state.queue, spare);
                    // The writer's runs were cleared when its last batch came back.
                    std::mem::swap(&mut state.runs, &mut state.taken_runs);
                    state.taken = batch.len();
                    let Some(tracked) = state.tracked.as_mut() else {
                        return Some(Some(Batch::Own(batch)));
                    };
                    if !tracked.frames.has_queued() {
                        return Some(Some(Batch::Own(batch)));
                    }
                    if batch.len() < batch.capacity() / 2 {
                        // Mostly empty room (a quiet session): a copy the size of the frames
                        // is kept, not the room, and the buffer comes back for reuse.
                        tracked.frames.taken(Bytes::copy_from_slice(&batch));
                        return Some(Some(Batch::Own(batch)));
                    }
                    let batch = batch.freeze();
                    tracked.frames.taken(batch.clone());
                    // The batch is not coming back: the next queue starts with room for
                    // about as much, rather than growing (and copying) from nothing.
                    if state.queue.capacity() == 0
                        && let Some(spare) = tracked.frames.spare.take()
                    {
                        state.queue = spare;
                    }
                    if state.queue.capacity() == 0 {
                        let room = batch.len().clamp(KEPT_BATCH_ROOM, MAX_KEPT_BUFFER);
                        state.queue = BytesMut::with_capacity(room);
                    }
                    return Some(Some(Batch::Kept(batch)));
                }
                if self.is_closed() {
                    // Done for good: give back the buffers now, not when the last handle
                    // goes (a sender's route cache may hold one until it sends elsewhere).
                    state.spare = BytesMut::new();
                    state.queue = BytesMut::new();
                    state.runs = Vec::new();
                    state.taken_runs = Vec::new();
                    return Some(None);
                }
                None
            })
            .await
    }

    /// Hands back a batch from [`Outbox::take`] once it has been written, releasing its bytes
    /// and waking senders waiting for room. The buffer is kept for reuse.
    pub(crate) fn written(&self, batch: Batch) {
        {
            let mut state = self.state();
            state.written_bytes += state.taken as u64;
            state.taken = 0;
            state.stalled = false;
            state.written += 1;
            state.taken_runs.clear();
            // A kept batch stays with the frames it holds until they are acknowledged.
            let batch = match batch {
                Batch::Own(mut batch) => {
                    batch.clear();
                    batch
                }
                Batch::Kept(_) => BytesMut::new(),
            };
            if state.release && state.queue.is_empty() {
                state.release = false;
                state.queue = BytesMut::new();
                state.spare = BytesMut::new();
                state.runs = Vec::new();
                state.taken_runs = Vec::new();
            } else if batch.capacity() <= MAX_KEPT_BUFFER && state.spare.capacity() == 0 {
                state.spare = batch;
            }
        }
        self.shared.handoff.wake_producers();
    }

    /// Frees the buffers as soon as everything queued now has been written, unless more is
    /// queued by then. For a connection about to go quiet (just registered): most clients
    /// then wait, and their outbox should hold no memory while they do.
    pub(crate) fn release_when_written(&self) {
        let mut state = self.state();
        if state.queue.is_empty() && state.taken == 0 {
            state.queue = BytesMut::new();
            state.spare = BytesMut::new();
        } else {
            state.release = true;
        }
    }

    /// Takes whatever chat frames are still queued, with their senders (used once the
    /// connection has failed), and frees the buffers.
    pub(crate) fn drain(&self, into: &mut Vec<Unwritten>) {
        let (queued, runs) = {
            let mut state = self.state();
            if state.tracked.is_some() {
                // Moved to the inbox when the outbox closed.
                state.queue = BytesMut::new();
                state.taken = 0;
                return;
            }
            state.taken = 0;
            state.spare = BytesMut::new();
            (std::mem::take(&mut state.queue), std::mem::take(&mut state.runs))
        };
        self.shared.handoff.wake_producers();
        unpack(&queued, 0, &runs, into);
    }

    /// The chat frames of the writer's current `batch` from byte `from` on, with their
    /// senders: what a failed write left unwritten.
    pub(crate) fn unwritten(&self, batch: &[u8], from: usize, into: &mut Vec<Unwritten>) {
        let runs = {
            let mut state = self.state();
            if state.tracked.is_some() {
                return;
            }
            std::mem::take(&mut state.taken_runs)
        };
        unpack(batch, from, &runs, into);
    }

    /// Frees the buffers if nothing is queued, so a quiet connection holds no memory for
    /// them. A buffer the writer holds comes back on its next write and is freed next time.
    pub(crate) fn release_if_idle(&self) {
        let mut state = self.state();
        if state.queue.is_empty() {
            state.queue = BytesMut::new();
            state.spare = BytesMut::new();
            state.runs = Vec::new();
            if let Some(tracked) = state.tracked.as_mut() {
                // A keyed session's batch kept for reuse (up to a megabyte) goes too.
                tracked.frames.spare = None;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The size of `msg` in an outbox's default (version 1) layout.
    fn size_of(msg: &Message) -> usize {
        wire_size(encoded_len_ref(&MessageRef { version: 1, ..msg.as_ref() }))
    }

    /// Fails the test, rather than hanging it, if `fut` takes longer than 20 s (a lost
    /// wake-up, say).
    async fn within<F: std::future::Future>(fut: F) -> F::Output {
        tokio::time::timeout(Duration::from_secs(20), fut).await.expect("a wait did not end")
    }

    /// What routing does: try, and wait for room if the outbox is full.
    async fn push_within(outbox: &Outbox, msg: &Message, wait: Duration) -> Result<(), PushError> {
        match outbox.push(&msg.as_ref()) {
            Err(PushError::Full) => outbox.wait_for_room(&msg.as_ref(), wait, 0, None).await,
            done => done,
        }
    }

    /// Every frame in a batch, decoded.
    fn messages(mut batch: &[u8]) -> Vec<Message> {
        let mut got = Vec::new();
        while batch.len() >= FRAME_HEADER_LEN {
            let len = batch.get_u32() as usize;
            got.push(decode_body(&batch[..len]).unwrap());
            batch.advance(len);
        }
        got
    }

    #[tokio::test]
    async fn frames_are_encoded_back_to_back_as_the_codec_would() {
        use tokio_util::codec::Encoder;
        let outbox = Outbox::new(10_000);
        let (a, b) =
            (Message::send(1, "bob", "one").with_version(1), Message::ping(2).with_version(1));
        outbox.push(&a.as_ref()).unwrap();
        outbox.push(&b.as_ref()).unwrap();
        let batch = within(outbox.take()).await.unwrap();
        let mut expected = BytesMut::new();
        let mut codec = relay_proto::MessageCodec::new(relay_proto::DEFAULT_MAX_FRAME_LEN);
        codec.encode(&a, &mut expected).unwrap();
        codec.encode(&b, &mut expected).unwrap();
        assert_eq!(&batch[..], &expected[..]);
        assert_eq!(messages(&batch), vec![a, b]);
    }

    /// A version 2 session gets version 2 frames, and its delivered chat messages consecutive
    /// sequence numbers from the session's first; replies and pings get none.
    #[tokio::test]
    async fn a_version_2_session_numbers_delivered_messages_in_queue_order() {
        let outbox = Outbox::new(10_000);
        outbox.set_session(2, 5 << 40 | 1);
        let chat = Message::deliver(9, "alice", "bob", "hi").with_version(1);
        outbox.push(&chat.as_ref()).unwrap();
        outbox.push(&Message::ping(3).as_ref()).unwrap();
        outbox.push(&chat.as_ref()).unwrap();
        let got = messages(&within(outbox.take()).await.unwrap());
        let seqs: Vec<(u16, u64)> = got.iter().map(|m| (m.version, m.seq)).collect();
        assert_eq!(seqs, vec![(2, 5 << 40 | 1), (2, 0), (2, 5 << 40 | 2)]);
    }

    #[test]
    fn unpack_counts_a_frame_cut_by_the_write_as_unwritten() {
        let mut buf = BytesMut::new();
        let msgs: Vec<Message> =
            (1..=3).map(|i| Message::deliver(i, "al", "bob", "hello").with_version(1)).collect();
        for msg in &msgs {
            put_frame(&mut buf, &msg.as_ref(), size_of(msg));
        }
        let one = size_of(&msgs[0]);
        let ids = |from| {
            let mut got = Vec::new();
            unpack(&buf, from, &[(0, 7)], &mut got);
            got.iter().map(|(m, sender)| (m.id, *sender)).collect::<Vec<_>>()
        };
        assert_eq!(ids(0), vec![(1, 7), (2, 7), (3, 7)]);
        assert_eq!(ids(one), vec![(2, 7), (3, 7)]);
        assert_eq!(ids(one + 1), vec![(2, 7), (3, 7)]);
        assert_eq!(ids(3 * one), Vec::<(u64, u64)>::new());
    }

    /// Each unwritten message is reported with the connection that sent it, across runs of
    /// senders and the replies and pings between them.
    #[tokio::test]
    async fn unwritten_messages_keep_their_senders() {
        let outbox = Outbox::new(100_000);
        let chat = |id, from| Message::deliver(id, from, "bob", "x");
        outbox.push_from(&chat(1, "a").as_ref(), 10).unwrap();
        outbox.push_from(&chat(2, "a").as_ref(), 10).unwrap();
        outbox.push(&Message::ping(3).as_ref()).unwrap();
        outbox.push_from(&chat(4, "c").as_ref(), 30).unwrap();
        let batch = within(outbox.take()).await.unwrap();
        outbox.push_from(&chat(5, "a").as_ref(), 11).unwrap();
        let mut got = Vec::new();
        outbox.unwritten(&batch, 0, &mut got);
        outbox.drain(&mut got);
        let got: Vec<(u64, u64)> = got.iter().map(|(m, sender)| (m.id, *sender)).collect();
        assert_eq!(got, vec![(1, 10), (2, 10), (4, 30), (5, 11)]);
    }

    #[tokio::test]
    async fn full_outbox_refuses_and_recovers_after_write() {
        let msg = Message::send(1, "bob", vec![0u8; 100]);
        let outbox = Outbox::new(size_of(&msg) * 2);
        outbox.push(&msg.as_ref()).unwrap();
        outbox.push(&msg.as_ref()).unwrap();
        assert_eq!(outbox.push(&msg.as_ref()), Err(PushError::Full));

        let batch = within(outbox.take()).await.unwrap();
        assert_eq!((messages(&batch).len(), batch.len()), (2, size_of(&msg) * 2));
        // Taken but not written: still counted.
        assert_eq!(outbox.push(&msg.as_ref()), Err(PushError::Full));
        outbox.written(batch);
        outbox.push(&msg.as_ref()).unwrap();
    }

    #[tokio::test]
    async fn close_keeps_order_and_bypasses_the_limit() {
        let outbox = Outbox::new(200);
        outbox.push(&Message::send(1, "bob", vec![0u8; 100]).as_ref()).unwrap();
        outbox.close(Some(&Message::send(2, "bob", vec![0u8; 500])));
        assert_eq!(outbox.push(&Message::ping(3).as_ref()), Err(PushError::Closed));
        let batch = within(outbox.take()).await.unwrap();
        assert_eq!(messages(&batch).iter().map(|m| m.id).collect::<Vec<_>>(), vec![1, 2]);
        assert_eq!(within(outbox.take()).await, None);
    }

    #[tokio::test]
    async fn a_full_outbox_makes_senders_wait_for_room_then_gives_up_once() {
        let msg = Message::send(1, "bob", vec![0u8; 100]);
        let outbox = Outbox::new(size_of(&msg));
        outbox.push(&msg.as_ref()).unwrap();

        // A sender waits; the writer takes and writes the first message; the sender's goes in.
        let sender = outbox.clone();
        let second = msg.clone();
        let waiting =
            tokio::spawn(
                async move { push_within(&sender, &second, Duration::from_secs(60)).await },
            );
        let batch = within(outbox.take()).await.unwrap();
        outbox.written(batch);
        assert_eq!(within(waiting).await.unwrap(), Ok(()));

        // Nobody writes now: the wait runs out, the outbox is marked stalled, and the next
        // push fails without waiting (a 60 s wait would fail `within`).
        let wait = Duration::from_millis(20);
        assert_eq!(within(push_within(&outbox, &msg, wait)).await, Err(PushError::Stalled));
        let long = Duration::from_secs(60);
        assert_eq!(within(push_within(&outbox, &msg, long)).await, Err(PushError::Stalled));

        // Writing again clears the stall.
        let batch = within(outbox.take()).await.unwrap();
        outbox.written(batch);
        within(push_within(&outbox, &msg, long)).await.unwrap();
    }

    /// Issue 11's busy receiver: it keeps writing, but every slot it frees is taken by another
    /// sender before the waiting one gets it. The waiting sender gives up after its wait in
    /// total (`Full`), instead of waiting as long as the others keep winning (the old rule
    /// restarted the wait whenever the receiver wrote: this test then ran out its 5 s of
    /// competition with the sender still held).
    #[tokio::test]
    async fn a_sender_outrun_for_every_freed_slot_gives_up_after_its_wait_in_total() {
        let msg = Message::send(1, "bob", vec![0u8; 100]);
        let outbox = Outbox::new(size_of(&msg));
        outbox.push(&msg.as_ref()).unwrap();
        let wait = Duration::from_millis(200);
        let victim = {
            let outbox = outbox.clone();
            let msg = msg.clone();
            tokio::spawn(async move {
                let start = std::time::Instant::now();
                (push_within(&outbox, &msg, wait).await, start.elapsed())
            })
        };
        let competition = std::time::Instant::now();
        while !victim.is_finished() && competition.elapsed() < Duration::from_secs(5) {
            // The receiver writes one message; another sender takes the room at once, before
            // the waiting one runs (this runtime has one thread: it runs only at the sleep).
            let batch = within(outbox.take()).await.unwrap();
            outbox.written(batch);
            outbox.push(&msg.as_ref()).unwrap();
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let (result, held) = within(victim).await.unwrap();
        assert_eq!(result, Err(PushError::Full), "held {held:?}");
        assert!(held < Duration::from_secs(2), "held {held:?} with a wait of {wait:?}");
    }

    /// A run of messages from a list, counting what was taken.
    struct ListRun {
        msgs: Vec<Message>,
        taken: usize,
    }

    impl RunSource for ListRun {
        fn peek(&mut self) -> Option<MessageRef<'_>> {
            self.msgs.get(self.taken).map(Message::as_ref)
        }

        fn take(&mut self) {
            self.taken += 1;
        }
    }

    #[tokio::test]
    async fn a_run_is_queued_in_order_and_stops_untaken_where_there_is_no_room() {
        let msgs: Vec<Message> = (1..=5).map(|id| Message::deliver(id, "al", "bob", "x")).collect();
        let outbox = Outbox::new(size_of(&msgs[0]) * 3);
        outbox.push(&Message::deliver(0, "al", "bob", "x").as_ref()).unwrap();
        let mut run = ListRun { msgs, taken: 0 };
        assert_eq!(outbox.push_run(7, None, &mut run), 2);
        // The third did not fit: left for the caller, untaken.
        assert_eq!(run.taken, 2);
        let batch = within(outbox.take()).await.unwrap();
        let ids: Vec<u64> = messages(&batch).iter().map(|m| m.id).collect();
        assert_eq!(ids, vec![0, 1, 2]);
        // Each is remembered with its sender, in case it is never written.
        let mut unwritten = Vec::new();
        outbox.unwritten(&batch, 0, &mut unwritten);
        let senders: Vec<(u64, u64)> = unwritten.iter().map(|(m, s)| (m.id, *s)).collect();
        assert_eq!(senders, vec![(0, 0), (1, 7), (2, 7)]);
        outbox.written(batch);
        assert_eq!(outbox.push_run(7, None, &mut run), 3);
        assert_eq!(run.taken, 5);
    }

    #[tokio::test]
    async fn a_keyed_session_gets_runs_numbered_and_none_while_it_reads_its_inbox() {
        let outbox = Outbox::new(1 << 20);
        outbox.set_session(2, 1);
        outbox.track("bob".into(), 1 << 20, Box::new(|_, _| {}));
        let msgs: Vec<Message> = (1..=3).map(|id| Message::deliver(id, "al", "bob", "x")).collect();
        let mut run = ListRun { msgs, taken: 0 };
        // Reading its inbox: messages go to the store, one by one, the usual way.
        assert_eq!(outbox.push_run(7, None, &mut run), 0);
        assert_eq!(run.taken, 0);
        assert!(outbox.go_live(0, 1));
        assert_eq!(outbox.push_run(7, None, &mut run), 3);
        let got = messages(&within(outbox.take()).await.unwrap());
        let seqs: Vec<(u64, u64)> = got.iter().map(|m| (m.id, m.seq)).collect();
        assert_eq!(seqs, vec![(1, 1), (2, 2), (3, 3)]);
    }

    #[tokio::test]
    async fn closing_wakes_waiting_senders() {
        let msg = Message::send(1, "bob", vec![0u8; 100]);
        let outbox = Outbox::new(size_of(&msg));
        outbox.push(&msg.as_ref()).unwrap();
        let sender = outbox.clone();
        let waiting =
            tokio::spawn(async move { push_within(&sender, &msg, Duration::from_secs(60)).await });
        // On this single-threaded runtime one yield lets the sender run until it waits.
        tokio::task::yield_now().await;
        outbox.close(None);
        // Woken as closed, long before its 60 s wait would end.
        let woken = tokio::time::timeout(Duration::from_secs(20), waiting).await;
        assert_eq!(woken.unwrap().unwrap(), Err(PushError::Closed));
    }

    #[tokio::test]
    async fn take_wakes_on_push_from_another_task_every_time() {
        let outbox = Outbox::new(1000);
        let pusher = outbox.clone();
        let task = tokio::spawn(async move {
            let mut ids = Vec::new();
            while ids.len() < 3 {
                let batch = within(outbox.take()).await.unwrap();
                ids.extend(messages(&batch).iter().map(|m| m.id));
                outbox.written(batch);
            }
            ids
        });
        for id in 1..=3 {
            tokio::task::yield_now().await;
            pusher.push(&Message::ping(id).as_ref()).unwrap();
        }
        let ids = tokio::time::timeout(Duration::from_secs(20), task).await.unwrap().unwrap();
        assert_eq!(ids, vec![1, 2, 3]);
    }

    #[tokio::test]
    async fn buffers_can_be_freed_once_written() {
        let outbox = Outbox::new(10_000);
        outbox.push(&Message::ping(1).as_ref()).unwrap();
        outbox.release_when_written();
        let batch = within(outbox.take()).await.unwrap();
        outbox.written(batch);
        let state = outbox.state();
        assert_eq!((state.queue.capacity(), state.spare.capacity()), (0, 0));
    }

    #[tokio::test]
    async fn buffers_are_reused_while_busy_and_freed_when_idle() {
        let outbox = Outbox::new(10_000);
        outbox.push(&Message::ping(1).as_ref()).unwrap();
        let batch = within(outbox.take()).await.unwrap();
        outbox.written(batch);
        assert!(outbox.state().spare.capacity() > 0, "the written buffer is kept");
        outbox.release_if_idle();
        let state = outbox.state();
        assert_eq!((state.queue.capacity(), state.spare.capacity()), (0, 0));
    }

    /// `(seq, id)` of each message a session handed over when it ended.
    type Handed = Arc<std::sync::Mutex<Vec<(u64, u64)>>>;

    /// A keyed session whose on-close hand-over is collected, live from number 1.
    fn keyed(window: usize) -> (Outbox, Handed) {
        let outbox = Outbox::new(1 << 20);
        outbox.set_session(2, 1);
        let handed = Arc::new(std::sync::Mutex::new(Vec::new()));
        let into = handed.clone();
        outbox.track(
            "bob".into(),
            window,
            Box::new(move |_, unacked| {
                for (entry, body) in unacked {
                    // The body handed over is the frame as delivered, without its prefix.
                    let msg = decode_body(&body).unwrap();
                    assert_eq!((msg.seq, msg.id), (entry.seq, entry.id));
                    into.lock().unwrap().push((entry.seq, entry.id));
                }
            }),
        );
        assert!(outbox.go_live(0, 1));
        (outbox, handed)
    }

    fn deliver(outbox: &Outbox, id: u64) {
        let content = format!("message {id}");
        let msg = MessageRef::deliver(id, "alice", "bob", content.as_bytes());
        assert_eq!(outbox.push_routed(&msg, 7, None, |_, _| {}), Ok(Delivery::Queued));
    }

    /// A keyed session's unacknowledged frames are kept where they are (in the batch the
    /// writer took, not copied, or still in the queue), and whatever was not acknowledged when
    /// it ends is handed over whole, in order, wherever it was.
    #[tokio::test]
    async fn a_keyed_session_hands_over_what_was_not_acknowledged_wherever_it_is() {
        let (outbox, handed) = keyed(1 << 20);
        for id in 1..=3 {
            deliver(&outbox, id);
        }
        let batch = within(outbox.take()).await.unwrap();
        assert!(matches!(batch, Batch::Kept(_)), "the batch is kept for its frames");
        outbox.written(batch);
        for id in 4..=5 {
            deliver(&outbox, id);
        }
        // The first is acknowledged; the second batch is taken and still being written.
        assert!(outbox.ack(1).receipts.is_empty(), "no sender asked for receipts");
        let second = within(outbox.take()).await.unwrap();
        deliver(&outbox, 6);
        assert_eq!(outbox.queue().unacked, 5);
        outbox.close(None);
        drop(second);
        let seqs: Vec<(u64, u64)> = (2..=6).map(|n| (n, n)).collect();
        assert_eq!(*handed.lock().unwrap(), seqs);
    }

    /// A client that acknowledges numbers it was not sent yet only forgets them (they are
    /// still written); the window counts them out, and nothing is handed over for them.
    #[tokio::test]
    async fn acknowledging_ahead_forgets_frames_still_queued() {
        let (outbox, handed) = keyed(1 << 20);
        for id in 1..=3 {
            deliver(&outbox, id);
        }
        outbox.ack(2);
        assert_eq!(outbox.queue().unacked, 1);
        let batch = within(outbox.take()).await.unwrap();
        assert_eq!(messages(&batch).len(), 3, "everything queued is still written");
        outbox.written(batch);
        outbox.ack(u64::MAX);
        assert_eq!(outbox.queue().unacked, 0);
        assert!(outbox.state().tracked.as_ref().unwrap().frames.is_empty());
        deliver(&outbox, 4);
        outbox.close(None);
        assert_eq!(*handed.lock().unwrap(), vec![(4, 4)]);
    }

    /// The window counts unacknowledged bytes: full, a push is refused until an
    /// acknowledgement frees room, and a batch with no frame left to keep is let go.
    #[tokio::test]
    async fn the_window_fills_and_acknowledgements_free_it() {
        let size = wire_size(encoded_len_ref(&MessageRef {
            version: 2,
            seq: 1,
            ..MessageRef::deliver(1, "alice", "bob", b"message 1")
        }));
        let (outbox, _) = keyed(2 * size);
        deliver(&outbox, 1);
        deliver(&outbox, 2);
        let msg = MessageRef::deliver(3, "alice", "bob", b"message 3");
        assert_eq!(outbox.push_routed(&msg, 7, None, |_, _| {}), Err(PushError::Full));
        let batch = within(outbox.take()).await.unwrap();
        outbox.written(batch);
        outbox.ack(2);
        assert!(outbox.state().tracked.as_ref().unwrap().frames.batches.is_empty());
        deliver(&outbox, 3);
    }

    /// What a session that never acknowledges holds is bounded by the window, whatever else
    /// it is sent: the replies that share a kept batch with a message count too. A quiet
    /// session's batch is kept as a copy the size of its frames, and its buffer reused.
    #[tokio::test]
    async fn kept_batches_count_whole_against_the_window() {
        let (outbox, _) = keyed(10_000);
        let reply = Message::reply(1, relay_proto::Status::NotFound, "x", "y".repeat(3500));
        for id in 1..=3 {
            deliver(&outbox, id);
            outbox.push(&reply.as_ref()).unwrap();
            let batch = within(outbox.take()).await.unwrap();
            outbox.written(batch);
        }
        let msg = MessageRef::deliver(4, "alice", "bob", b"message 4");
        assert_eq!(outbox.push_routed(&msg, 7, None, |_, _| {}), Err(PushError::Full));
        outbox.ack(1);
        deliver(&outbox, 4);

        // Quiet: one small message in a large buffer.
        let (outbox, handed) = keyed(10_000);
        outbox.state().queue.reserve(32 * 1024);
        deliver(&outbox, 1);
        let batch = within(outbox.take()).await.unwrap();
        assert!(matches!(batch, Batch::Own(_)), "the buffer comes back");
        outbox.written(batch);
        let state = outbox.state();
        assert!(state.spare.capacity() >= 32 * 1024, "and is kept for reuse");
        let log = &state.tracked.as_ref().unwrap().frames;
        assert!(log.len() < 200, "the copy is the frame's size, not the buffer's");
        drop(state);
        outbox.close(None);
        assert_eq!(*handed.lock().unwrap(), vec![(1, 1)]);
    }

    fn sender(name: &str) -> Arc<SenderRef> {
        Arc::new(SenderRef { canonical: name.into(), token: 1, keyed: true, receipt: true })
    }

    /// Messages are kept in runs (consecutive numbers and ids from one sender); an
    /// acknowledgement that ends inside a run owes receipts for exactly the ids it covers, and
    /// what is left of the run is handed over with the right ids when the session ends.
    #[tokio::test]
    async fn runs_split_where_acknowledged_and_keep_their_ids() {
        let (outbox, handed) = keyed(1 << 20);
        let (alice, carol) = (sender("alice"), sender("carol"));
        let send = |id: u64, from: &Arc<SenderRef>| {
            let msg = MessageRef::deliver(id, &from.canonical, "bob", b"hi");
            assert_eq!(outbox.push_routed(&msg, 7, Some(from), |_, _| {}), Ok(Delivery::Queued));
        };
        // alice 10..=14 (one run), carol 3, alice 20 (a gap in ids: a new run), alice 21.
        for id in 10..=14 {
            send(id, &alice);
        }
        send(3, &carol);
        send(20, &alice);
        send(21, &alice);
        assert_eq!(outbox.state().tracked.as_ref().unwrap().runs.len(), 3);
        let batch = within(outbox.take()).await.unwrap();
        outbox.written(batch);

        let acked = outbox.ack(3);
        let due: Vec<(String, Vec<u64>)> =
            acked.receipts.iter().map(|(s, ids)| (s.canonical.clone(), ids.clone())).collect();
        assert_eq!(due, vec![("alice".into(), vec![10, 11, 12])]);
        let acked = outbox.ack(7);
        let due: Vec<(String, Vec<u64>)> =
            acked.receipts.iter().map(|(s, ids)| (s.canonical.clone(), ids.clone())).collect();
        assert_eq!(
            due,
            vec![
                ("alice".into(), vec![13, 14]),
                ("carol".into(), vec![3]),
                ("alice".into(), vec![20])
            ]
        );
        assert_eq!(outbox.queue().unacked, 1);
        outbox.close(None);
        assert_eq!(*handed.lock().unwrap(), vec![(8, 21)]);
    }

    /// A busy keyed session reuses the batches its client has acknowledged, and gives the one
    /// it keeps for that back when it goes quiet.
    #[tokio::test]
    async fn an_acknowledged_batch_is_reused_and_freed_when_idle() {
        let (outbox, _) = keyed(1 << 20);
        let content = vec![b'x'; 1000];
        for id in 1..=40 {
            let msg = MessageRef::deliver(id, "alice", "bob", &content);
            outbox.push_routed(&msg, 7, None, |_, _| {}).unwrap();
        }
        let batch = within(outbox.take()).await.unwrap();
        assert!(matches!(batch, Batch::Kept(_)));
        outbox.written(batch);
        outbox.ack(40);
        assert!(outbox.state().tracked.as_ref().unwrap().frames.spare.is_some());
        outbox.release_if_idle();
        assert!(outbox.state().tracked.as_ref().unwrap().frames.spare.is_none());
    }
}
