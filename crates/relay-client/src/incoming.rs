//! The queue of events between the reader task and the program. The reader hands over every
//! event from one socket read in one go, and the program takes the whole queue at once when it
//! runs dry, so a busy connection pays for the lock and the wake-up once per read, not once
//! per message. The chat messages of a read, nearly all of the traffic, travel as a [`Run`]:
//! their frames as read, checked by the reader, in one buffer, read in place when the program
//! takes them (no event built and moved, and no reference count, per message until the
//! program asks for an [`Event`]).

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures_core::Stream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, MutexGuard};

use bytes::Bytes;
use relay_proto::{Handoff, frames_in, read_chat};

use crate::event::Event;
use crate::outgoing::Outgoing;
use relay_proto::Message;

/// What the reader queues for the program.
#[derive(Debug)]
pub(crate) enum Item {
    /// Anything but a run of chat messages.
    Event(Event),
    /// Chat messages, in order.
    Run(Run),
}

impl Item {
    /// How many events it is for the program.
    fn count(&self) -> usize {
        match self {
            Item::Event(_) => 1,
            Item::Run(run) => run.left,
        }
    }
}

/// Chat messages as the reader found them in one socket read: whole frames (length header and
/// body) back to back, each checked as [`read_chat`] reads it, with names that are valid
/// text, not a duplicate, and addressed to this client.
#[derive(Debug)]
pub(crate) struct Run {
    frames: Bytes,
    /// Where the first frame not yet handed out starts.
    at: usize,
    /// How many frames are left.
    left: usize,
    /// The sequence number of the last one (0 if they have none).
    last_seq: u64,
}

impl Run {
    /// A run of `count` checked frames, the last numbered `last_seq`.
    pub(crate) fn new(frames: Bytes, count: usize, last_seq: u64) -> Run {
        Run { frames, at: 0, left: count, last_seq }
    }

    /// The next message as an [`Event`], its content shared with the run's buffer and its
    /// sender's name with the previous message's (`last_from`) when it is the same.
    pub(crate) fn next_event(&mut self, last_from: &mut Option<Arc<str>>) -> Option<Event> {
        while self.left > 0 {
            let Some((start, body)) =
                self.frames.get(self.at..).and_then(|rest| frames_in(rest).next())
            else {
                // Not what the reader counted (never expected): nothing more in it.
                self.left = 0;
                return None;
            };
            let start = self.at + start;
            self.at = start + body.len();
            self.left -= 1;
            let Some(chat) = read_chat(body) else { continue };
            // The name is read as text only when it is not the last one again.
            let from = match last_from {
                Some(last) if last.as_bytes() == chat.from => last.clone(),
                _ => match std::str::from_utf8(chat.from) {
                    Ok(from) => last_from.insert(Arc::from(from)).clone(),
                    Err(_) => continue,
                },
            };
            let offset = start + (chat.content.as_ptr() as usize - body.as_ptr() as usize);
            let content = self.frames.slice(offset..offset + chat.content.len());
            let (id, seq, time) = (chat.id, chat.seq, chat.time);
            return Some(Event::Message { id, from, content, seq, time });
        }
        None
    }

    /// Hands every message left to `f`, borrowed in place.
    pub(crate) fn for_each(&mut self, f: &mut impl FnMut(Received<'_>)) -> usize {
        let mut handed = 0;
        let rest = self.frames.get(self.at..).unwrap_or_default();
        for (_, body) in frames_in(rest).take(self.left) {
            if let Some((chat, from)) = chat_in(body) {
                f(Received::Message(MessageRef {
                    id: chat.id,
                    from,
                    content: chat.content,
                    seq: chat.seq,
                    time: chat.time,
                }));
                handed += 1;
            }
        }
        (self.at, self.left) = (self.frames.len(), 0);
        handed
    }

    /// Bytes of frames not yet handed out (for pacing acknowledgements).
    fn bytes_left(&self) -> usize {
        self.frames.len() - self.at
    }
}

/// A checked frame's chat message and its sender's name. The reader checked both, so `None`
/// only if that was wrong: the frame is then skipped, never trusted.
fn chat_in(body: &[u8]) -> Option<(relay_proto::ChatBytes<'_>, &str)> {
    let chat = read_chat(body)?;
    let from = std::str::from_utf8(chat.from).ok()?;
    Some((chat, from))
}

/// A chat message handed to the program in place by [`Events::drain`]: it borrows the
/// connection's read buffer, so it lives only for the call that receives it. Copy out what
/// outlives it, or use [`Events::next`], whose [`Event::Message`] owns its content.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct MessageRef<'a> {
    /// The sender's id for the message.
    pub id: u64,
    /// The sender's name, as registered.
    pub from: &'a str,
    /// The message body.
    pub content: &'a [u8],
    /// Its sequence number for this recipient (see [`Event::Message`]).
    pub seq: u64,
    /// When the server received it from its sender, in ms since the Unix epoch.
    pub time: u64,
}

impl MessageRef<'_> {
    /// The same message as an owned [`Event::Message`] (copies the content).
    pub fn to_event(&self) -> Event {
        Event::Message {
            id: self.id,
            from: Arc::from(self.from),
            content: Bytes::copy_from_slice(self.content),
            seq: self.seq,
            time: self.time,
        }
    }
}

/// What [`Events::drain`] hands the program: a chat message in place, or any other event.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Received<'a> {
    /// A message from another user, borrowed from the read buffer.
    Message(MessageRef<'a>),
    /// Any other event (never an [`Event::Message`]).
    Event(Event),
}

/// What the reader has gathered and not yet handed to the program.
#[derive(Debug, Default)]
pub(crate) struct Pending {
    items: VecDeque<Item>,
    /// Events in `items` (a run counts its messages).
    count: usize,
}

impl Pending {
    pub(crate) fn push(&mut self, item: Item) {
        self.count += item.count();
        self.items.push_back(item);
    }

    #[cfg(test)]
    fn of(items: impl IntoIterator<Item = Event>) -> Pending {
        let mut pending = Pending::default();
        for event in items {
            pending.push(Item::Event(event));
        }
        pending
    }

    /// Every event, runs turned into events, in order (for the benches).
    pub(crate) fn drain_events(&mut self, mut f: impl FnMut(Event)) {
        let mut last_from = None;
        for item in self.items.drain(..) {
            match item {
                Item::Event(event) => f(event),
                Item::Run(mut run) => {
                    while let Some(event) = run.next_event(&mut last_from) {
                        f(event);
                    }
                }
            }
        }
        self.count = 0;
    }

    /// Every message and event, runs in place, in order (for the benches).
    pub(crate) fn drain_in_place(&mut self, mut f: impl FnMut(Received<'_>)) {
        for item in self.items.drain(..) {
            hand_item(item, &mut f);
        }
        self.count = 0;
    }
}

/// Hands `item` to `f`: a run's messages in place, a message event as a [`MessageRef`] too (so
/// a program sees every message the same way), anything else as it is. Returns how many.
fn hand_item(item: Item, f: &mut impl FnMut(Received<'_>)) -> usize {
    match item {
        Item::Run(mut run) => run.for_each(f),
        Item::Event(Event::Message { id, from, content, seq, time }) => {
            f(Received::Message(MessageRef { id, from: &from, content: &content, seq, time }));
            1
        }
        Item::Event(event) => {
            f(Received::Event(event));
            1
        }
    }
}

/// The shared half of the queue.
#[derive(Debug)]
pub(crate) struct Incoming {
    /// The events, behind the shared queue primitive: its lock is held only to append or
    /// swap; the program is its consumer (woken when events arrive or the reader ends), the
    /// reader its producer (woken when the program takes the queue or drops its [`Events`]).
    handoff: Handoff<State>,
    /// Events that may wait for the program before the reader waits for it.
    max_queued: usize,
    /// Set when the program dropped its [`Events`]: nobody will take events any more.
    abandoned: AtomicBool,
    /// Set when the program is going offline: the reader no longer waits for it to take
    /// events (see [`Incoming::leave`]).
    leaving: AtomicBool,
}

#[derive(Debug, Default)]
struct State {
    queue: VecDeque<Item>,
    /// Events in `queue` (a run counts its messages).
    queued: usize,
    /// The reader has ended; no events follow those queued.
    ended: bool,
}

impl Incoming {
    pub(crate) fn new(max_queued: usize) -> Arc<Incoming> {
        Arc::new(Incoming {
            handoff: Handoff::new(State::default()),
            max_queued: max_queued.max(1),
            abandoned: AtomicBool::new(false),
            leaving: AtomicBool::new(false),
        })
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.handoff.lock()
    }

    /// Whether the program has something to take (events, or the end): what it waits for.
    fn takeable(state: &mut State) -> Option<()> {
        (!state.queue.is_empty() || state.ended).then_some(())
    }

    /// Hands `batch` to the program, emptying it. Waits while the program has `max_queued`
    /// events it has not taken (which stops the reader reading, so a program that falls
    /// behind is eventually dropped by the server instead of growing this queue), unless
    /// `wait` is false, in which case events that do not fit are dropped (a run that starts
    /// within the room is kept whole). Events for a program that dropped its [`Events`] are
    /// dropped.
    pub(crate) async fn deliver(&self, batch: &mut Pending, wait: bool) {
        if batch.items.is_empty() {
            return;
        }
        let was_empty = self
            .handoff
            .produce(|state| {
                if self.abandoned.load(Ordering::Relaxed) {
                    batch.items.clear();
                    batch.count = 0;
                    return Some(false);
                }
                let waiting = state.queued;
                // Looked at on every attempt: `leave` may come while the reader waits.
                let wait = wait && !self.leaving.load(Ordering::Relaxed);
                if !wait {
                    let mut room = self.max_queued.saturating_sub(waiting);
                    let keep = batch
                        .items
                        .iter()
                        .take_while(|item| {
                            let fits = room > 0;
                            room = room.saturating_sub(item.count());
                            fits
                        })
                        .count();
                    batch.items.truncate(keep);
                    batch.count = batch.items.iter().map(Item::count).sum();
                }
                (waiting < self.max_queued || !wait).then(|| {
                    state.queued += std::mem::take(&mut batch.count);
                    if state.queue.is_empty() {
                        // The usual case under load (the program took everything): the batch
                        // becomes the queue and the reader gets the emptied one back, with
                        // its room, instead of moving every item.
                        std::mem::swap(&mut state.queue, &mut batch.items);
                    } else {
                        state.queue.append(&mut batch.items);
                    }
                    waiting == 0
                })
            })
            .await;
        // The program only waits on an empty queue.
        if was_empty {
            self.handoff.wake_consumer();
        }
    }

    /// The program is going offline: a reader waiting for it to take events stops waiting,
    /// and from then on what does not fit is dropped, so the close is never held by a
    /// program that reads no events.
    pub(crate) fn leave(&self) {
        self.leaving.store(true, Ordering::Relaxed);
        self.handoff.wake_producers();
    }

    /// The reader has ended: once the program has taken what is queued, it gets `None`.
    pub(crate) fn end(&self) {
        self.state().ended = true;
        self.handoff.wake_consumer();
    }
}

/// A wait until there are events to take, or the end.
type Wait = Pin<Box<dyn Future<Output = ()> + Send>>;

/// The stream of [`Event`]s for one connection.
///
/// Take events one at a time with [`Events::next`] (or as a [`Stream`]); or, where every
/// nanosecond counts, everything that has arrived at once with [`Events::drain`], which hands
/// chat messages over in place ([`MessageRef`]), without building an event for each:
///
/// ```no_run
/// # async fn run(mut events: relay_client::Events) {
/// use relay_client::Received;
/// while events.ready().await {
///     events.drain(|received| match received {
///         Received::Message(msg) => println!("{}: {}", msg.from, msg.content.len()),
///         Received::Event(event) => println!("{event:?}"),
///         _ => {}
///     });
/// }
/// # }
/// ```
pub struct Events {
    shared: Arc<Incoming>,
    /// Items taken from the shared queue and not yet handed out.
    taken: VecDeque<Item>,
    /// The sender of the last message handed out as an event (shared with the next one's).
    last_from: Option<Arc<str>>,
    /// The wait [`Stream::poll_next`] is in, kept between polls.
    waiting: Option<Wait>,
    /// Where acknowledgements go (a keyed session), and what was handed to the program and
    /// acknowledged so far.
    acks: Option<Arc<Outgoing>>,
    handed: u64,
    acked: u64,
    /// About how many bytes were handed over since the last acknowledgement.
    pending_bytes: usize,
}

/// Handed-over bytes after which an acknowledgement goes out even while more is waiting: well
/// under the server's window of unacknowledged messages (2 MiB by default).
const ACK_EVERY_BYTES: usize = 256 * 1024;

impl std::fmt::Debug for Events {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Events").field("taken", &self.taken.len()).finish_non_exhaustive()
    }
}

/// [`Events`] is a [`Stream`], for programs that combine it with other streams
/// (`futures::StreamExt`, `tokio_stream`); [`Events::next`] is the same without them.
impl Stream for Events {
    type Item = Event;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Event>> {
        let this = &mut *self;
        loop {
            if let Some(event) = this.try_next() {
                this.waiting = None;
                return Poll::Ready(Some(event));
            }
            if this.shared.state().ended {
                this.waiting = None;
                return Poll::Ready(this.try_next());
            }
            let shared = this.shared.clone();
            let wait = this.waiting.get_or_insert_with(|| {
                Box::pin(async move { shared.handoff.consume(Incoming::takeable).await })
            });
            match wait.as_mut().poll(cx) {
                // Something to take (or the end): look again.
                Poll::Ready(()) => this.waiting = None,
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

impl Events {
    pub(crate) fn new(shared: Arc<Incoming>, acks: Option<Arc<Outgoing>>) -> Events {
        Events {
            shared,
            taken: VecDeque::new(),
            last_from: None,
            waiting: None,
            acks,
            handed: 0,
            acked: 0,
            pending_bytes: 0,
        }
    }

    /// Notes that what is numbered up to `seq` (0: not numbered), about `bytes` of it, was
    /// handed to the program, and acknowledges what was handed once everything that arrived
    /// is used up (cumulatively: one acknowledgement per batch, not one per message).
    fn handing(&mut self, seq: u64, bytes: usize) {
        let Some(acks) = &self.acks else { return };
        if seq == 0 {
            return;
        }
        self.handed = self.handed.max(seq);
        self.pending_bytes += bytes;
        // Acknowledged when the program has taken everything that arrived (it is about to
        // wait), or once enough is pending that the server's window should not fill first:
        // under load, one acknowledgement covers many reads.
        let due = self.pending_bytes >= ACK_EVERY_BYTES
            || self.taken.is_empty() && self.shared.state().queue.is_empty();
        if due
            && self.handed > self.acked
            && acks.push_now(&Message::ack(self.handed).as_ref()).is_ok()
        {
            self.acked = self.handed;
            self.pending_bytes = 0;
        }
    }

    /// The next event, or `None` once the connection is closed and every event was taken.
    pub async fn next(&mut self) -> Option<Event> {
        loop {
            if let Some(event) = self.try_next() {
                return Some(event);
            }
            if !self.ready().await {
                return None;
            }
        }
    }

    /// Waits until something has arrived (take it with [`Events::drain`], or
    /// [`Events::try_next`]); `false` once the connection is closed and everything was taken.
    pub async fn ready(&mut self) -> bool {
        loop {
            if !self.taken.is_empty() || !self.shared.state().queue.is_empty() {
                return true;
            }
            if self.shared.state().ended {
                // The reader queues nothing after it ends, but look at anything that raced in
                // before the flag.
                return !self.shared.state().queue.is_empty();
            }
            // A handle of its own, so the wait does not borrow `self`.
            let shared = self.shared.clone();
            shared.handoff.consume(Incoming::takeable).await;
        }
    }

    /// The next event if one is already waiting.
    pub fn try_next(&mut self) -> Option<Event> {
        loop {
            if self.taken.is_empty() && !self.refill() {
                return None;
            }
            let (event, bytes) = match self.taken.front_mut() {
                Some(Item::Run(run)) => {
                    let before = run.bytes_left();
                    let event = run.next_event(&mut self.last_from);
                    let bytes = before - run.bytes_left();
                    if run.left == 0 || event.is_none() {
                        self.taken.pop_front();
                    }
                    match event {
                        Some(event) => (event, bytes),
                        None => continue,
                    }
                }
                Some(Item::Event(_)) => match self.taken.pop_front() {
                    Some(Item::Event(event)) => {
                        let bytes = match &event {
                            Event::Message { content, .. } => content.len() + 64,
                            _ => 64,
                        };
                        (event, bytes)
                    }
                    _ => continue,
                },
                None => return None,
            };
            self.handing(event.seq(), bytes);
            return Some(event);
        }
    }

    /// Hands everything that has already arrived to `f`, in order, chat messages in place
    /// (borrowed from the read buffer: no event built, nothing copied or counted per
    /// message), other events as they are; returns how many. Never waits: wait with
    /// [`Events::ready`]. For programs that take messages as fast as they come; mixing it with
    /// [`Events::next`] is fine (each event is handed out once, in order).
    pub fn drain(&mut self, mut f: impl FnMut(Received<'_>)) -> usize {
        let mut handed = 0;
        while !self.taken.is_empty() || self.refill() {
            let Some(item) = self.taken.pop_front() else { break };
            let (seq, bytes) = match &item {
                Item::Run(run) => (run.last_seq, run.bytes_left()),
                Item::Event(event @ Event::Message { content, .. }) => {
                    (event.seq(), content.len() + 64)
                }
                Item::Event(event) => (event.seq(), 64),
            };
            handed += hand_item(item, &mut f);
            self.handing(seq, bytes);
        }
        handed
    }

    /// Takes the shared queue, if it holds anything: the reader gets an empty one with room,
    /// the program the lot. `false` if there was nothing.
    fn refill(&mut self) -> bool {
        {
            let mut state = self.shared.state();
            if state.queue.is_empty() {
                return false;
            }
            std::mem::swap(&mut state.queue, &mut self.taken);
            state.queued = 0;
        }
        self.shared.handoff.wake_producers();
        true
    }
}

impl Drop for Events {
    fn drop(&mut self) {
        // The reader keeps reading (to answer pings) but must not wait for this program.
        self.shared.abandoned.store(true, Ordering::Relaxed);
        self.shared.handoff.wake_producers();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn message(id: u64) -> Event {
        Event::Message { id, from: "alice".into(), content: bytes::Bytes::new(), seq: 0, time: 0 }
    }

    fn ids(events: &mut Events) -> Vec<u64> {
        std::iter::from_fn(|| events.try_next())
            .map(|e| match e {
                Event::Message { id, .. } => id,
                other => panic!("unexpected {other:?}"),
            })
            .collect()
    }

    /// What the reader queues for these frames (chat messages to "bob", version 2, with
    /// these sequence numbers and senders; `None`: a `NotFound` reply), as it queues them.
    fn read(frames: &[Option<(&str, u64)>], decoder: &mut crate::client::FrameDecoder) -> Pending {
        use tokio_util::codec::Encoder;
        let mut codec = relay_proto::MessageCodec::new(relay_proto::DEFAULT_MAX_FRAME_LEN);
        let mut buf = bytes::BytesMut::new();
        for (i, frame) in frames.iter().enumerate() {
            let msg = match frame {
                Some((from, seq)) => {
                    let mut msg = Message::deliver(i as u64, *from, "bob", format!("m{i}"));
                    msg.seq = *seq;
                    msg.with_version(2)
                }
                None => Message::reply(i as u64, relay_proto::Status::NotFound, "x", "no")
                    .with_version(2),
            };
            codec.encode(&msg, &mut buf).unwrap();
        }
        std::mem::take(decoder.decode(&mut buf))
    }

    /// Chat messages travel as runs, cut by other events and by duplicates (which are
    /// dropped), and come out as the same events in the same order, one at a time or in
    /// place, their senders' names shared between neighbours.
    #[tokio::test]
    async fn runs_come_out_whole_and_in_order_one_at_a_time_or_in_place() {
        let frames = [
            Some(("alice", 1)),
            Some(("alice", 2)),
            Some(("carol", 3)),
            None,
            Some(("carol", 4)),
            Some(("carol", 3)), // delivered again: dropped
            Some(("alice", 5)),
        ];
        let mut decoder = crate::client::FrameDecoder::new();
        let mut pending = read(&frames, &mut decoder);
        let kinds: Vec<_> = pending
            .items
            .iter()
            .map(|item| match item {
                Item::Run(run) => run.left,
                Item::Event(_) => 0,
            })
            .collect();
        assert_eq!(kinds, [3, 0, 1, 1], "runs cut at the reply and at the duplicate");
        let shared = Incoming::new(100);
        let mut events = Events::new(shared.clone(), None);
        shared.deliver(&mut pending, true).await;
        let mut got = Vec::new();
        let mut froms: Vec<Arc<str>> = Vec::new();
        while let Some(event) = events.try_next() {
            match event {
                Event::Message { id, from, content, seq, .. } => {
                    assert_eq!(content, format!("m{id}"));
                    got.push((id, seq));
                    froms.push(from);
                }
                Event::NotFound { id, .. } => got.push((id, 0)),
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(got, [(0, 1), (1, 2), (2, 3), (3, 0), (4, 4), (6, 5)]);
        assert!(Arc::ptr_eq(&froms[0], &froms[1]), "one name for neighbours from one sender");
        assert_eq!(&*froms[2], "carol");

        // The same in place.
        let mut decoder = crate::client::FrameDecoder::new();
        let mut pending = read(&frames, &mut decoder);
        let shared = Incoming::new(100);
        let mut events = Events::new(shared.clone(), None);
        shared.deliver(&mut pending, true).await;
        let mut got = Vec::new();
        let handed = events.drain(|received| match received {
            Received::Message(msg) => {
                assert_eq!(msg.content, format!("m{}", msg.id).as_bytes());
                assert_eq!(msg.from, if msg.id == 2 || msg.id == 4 { "carol" } else { "alice" });
                got.push((msg.id, msg.seq));
            }
            Received::Event(Event::NotFound { id, .. }) => got.push((id, 0)),
            other => panic!("unexpected {other:?}"),
        });
        assert_eq!(handed, 6);
        assert_eq!(got, [(0, 1), (1, 2), (2, 3), (3, 0), (4, 4), (6, 5)]);
        assert_eq!(events.drain(|_| panic!("nothing more")), 0);
    }

    /// A run taken partly one at a time finishes in place, then events go on one at a time;
    /// a message that came as an event is handed over in place like the others.
    #[tokio::test]
    async fn one_at_a_time_and_in_place_mix_without_losing_or_repeating() {
        let mut decoder = crate::client::FrameDecoder::new();
        let frames: Vec<_> = (1..=6).map(|seq| Some(("alice", seq))).collect();
        let mut pending = read(&frames, &mut decoder);
        pending.push(Item::Event(message(100)));
        let shared = Incoming::new(100);
        let mut events = Events::new(shared.clone(), None);
        shared.deliver(&mut pending, true).await;
        assert!(matches!(events.try_next(), Some(Event::Message { id: 0, .. })));
        assert!(matches!(events.try_next(), Some(Event::Message { id: 1, .. })));
        let mut ids = Vec::new();
        events.drain(|received| match received {
            Received::Message(msg) => ids.push(msg.id),
            other => panic!("unexpected {other:?}"),
        });
        assert_eq!(ids, [2, 3, 4, 5, 100]);
        shared.end();
        assert!(!events.ready().await, "ended, and everything was taken");
    }

    /// A run that holds fewer frames than it says (never made so by the reader) ends where its
    /// frames do: no event is made up, and nothing loops.
    #[tokio::test]
    async fn a_run_shorter_than_its_count_ends_where_its_frames_do() {
        let mut decoder = crate::client::FrameDecoder::new();
        let frames: Vec<_> = (1..=2).map(|seq| Some(("alice", seq))).collect();
        let mut pending = read(&frames, &mut decoder);
        let Some(Item::Run(run)) = pending.items.pop_front() else { panic!("expected a run") };
        for in_place in [false, true] {
            let shared = Incoming::new(100);
            let mut events = Events::new(shared.clone(), None);
            let mut short = Pending::default();
            short.push(Item::Run(Run::new(run.frames.clone(), 5, 2)));
            short.push(Item::Event(message(9)));
            shared.deliver(&mut short, true).await;
            let mut ids = Vec::new();
            if in_place {
                events.drain(|received| match received {
                    Received::Message(msg) => ids.push(msg.id),
                    other => panic!("unexpected {other:?}"),
                });
            } else {
                while let Some(event) = events.try_next() {
                    match event {
                        Event::Message { id, .. } => ids.push(id),
                        other => panic!("unexpected {other:?}"),
                    }
                }
            }
            assert_eq!(ids, [0, 1, 9], "in place: {in_place}");
        }
    }

    /// A keyed session acknowledges what it handed over in place, once it has taken
    /// everything that arrived: one acknowledgement for the lot, with the highest number.
    #[tokio::test]
    async fn draining_acknowledges_the_highest_number_handed_over_once() {
        let mut decoder = crate::client::FrameDecoder::new();
        let frames: Vec<_> = (1..=5).map(|seq| Some(("alice", seq))).collect();
        let mut pending = read(&frames, &mut decoder);
        let acks = Arc::new(Outgoing::new(
            relay_proto::MessageCodec::new(relay_proto::DEFAULT_MAX_FRAME_LEN),
            64,
        ));
        let shared = Incoming::new(100);
        let mut events = Events::new(shared.clone(), Some(acks.clone()));
        shared.deliver(&mut pending, true).await;
        assert_eq!(events.drain(|_| {}), 5);
        acks.close(None);
        let mut written = bytes::BytesMut::new();
        assert!(acks.take(&mut written).await);
        let mut codec = relay_proto::MessageCodec::new(relay_proto::DEFAULT_MAX_FRAME_LEN);
        let sent: Vec<Message> = std::iter::from_fn(|| {
            tokio_util::codec::Decoder::decode(&mut codec, &mut written).unwrap()
        })
        .collect();
        assert_eq!(sent.len(), 1, "{sent:?}");
        assert_eq!((sent[0].kind, sent[0].seq), (relay_proto::Kind::Ack, 5));
    }

    #[tokio::test]
    async fn events_arrive_in_order_across_batches_then_none_after_the_end() {
        let shared = Incoming::new(100);
        let mut events = Events::new(shared.clone(), None);
        shared.deliver(&mut Pending::of([message(1), message(2)]), true).await;
        assert_eq!(events.next().await, Some(message(1)));
        shared.deliver(&mut Pending::of([message(3)]), true).await;
        shared.end();
        assert_eq!(ids(&mut events), vec![2, 3]);
        assert_eq!(events.next().await, None);
    }

    #[tokio::test]
    async fn a_full_queue_makes_the_reader_wait_until_the_program_takes() {
        let shared = Incoming::new(2);
        let mut events = Events::new(shared.clone(), None);
        shared.deliver(&mut Pending::of([message(1), message(2)]), true).await;
        let reader = shared.clone();
        let third =
            tokio::spawn(async move { reader.deliver(&mut Pending::of([message(3)]), true).await });
        tokio::task::yield_now().await;
        assert!(!third.is_finished(), "the reader must wait for room");
        assert_eq!(events.try_next(), Some(message(1)));
        tokio::time::timeout(Duration::from_secs(20), third).await.unwrap().unwrap();
        assert_eq!(ids(&mut events), vec![2, 3]);
    }

    /// A reader waiting for a program that takes no events is released when the program goes
    /// offline: what does not fit is dropped, and later batches do not wait either.
    #[tokio::test]
    async fn going_offline_releases_a_reader_waiting_on_a_full_queue() {
        let shared = Incoming::new(2);
        let mut events = Events::new(shared.clone(), None);
        shared.deliver(&mut Pending::of([message(1), message(2)]), true).await;
        let reader = shared.clone();
        let blocked = tokio::spawn(async move {
            reader.deliver(&mut Pending::of([message(3)]), true).await;
            reader.deliver(&mut Pending::of([message(4)]), true).await;
        });
        tokio::task::yield_now().await;
        assert!(!blocked.is_finished(), "the reader must wait for room until then");
        shared.leave();
        tokio::time::timeout(Duration::from_secs(20), blocked).await.unwrap().unwrap();
        assert_eq!(ids(&mut events), vec![1, 2]);
    }

    #[tokio::test]
    async fn without_waiting_what_does_not_fit_is_dropped() {
        let shared = Incoming::new(2);
        let mut events = Events::new(shared.clone(), None);
        shared.deliver(&mut Pending::of([message(1), message(2), message(3)]), false).await;
        assert_eq!(ids(&mut events), vec![1, 2]);
    }

    #[tokio::test]
    async fn a_program_that_drops_its_events_never_blocks_the_reader() {
        let shared = Incoming::new(1);
        let events = Events::new(shared.clone(), None);
        shared.deliver(&mut Pending::of([message(1)]), true).await;
        let reader = shared.clone();
        let blocked =
            tokio::spawn(async move { reader.deliver(&mut Pending::of([message(2)]), true).await });
        tokio::task::yield_now().await;
        drop(events);
        tokio::time::timeout(Duration::from_secs(20), blocked).await.unwrap().unwrap();
        // And later batches are dropped at once.
        shared.deliver(&mut Pending::of([message(3)]), true).await;
    }

    #[tokio::test]
    async fn a_waiting_program_wakes_on_events_and_on_the_end() {
        let shared = Incoming::new(10);
        let mut events = Events::new(shared.clone(), None);
        let program = tokio::spawn(async move {
            let first = events.next().await;
            let second = events.next().await;
            (first, second)
        });
        tokio::task::yield_now().await;
        shared.deliver(&mut Pending::of([message(7)]), true).await;
        tokio::task::yield_now().await;
        shared.end();
        let got = tokio::time::timeout(Duration::from_secs(20), program).await.unwrap().unwrap();
        assert_eq!(got, (Some(message(7)), None));
    }
}
