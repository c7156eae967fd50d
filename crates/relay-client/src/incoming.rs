//! The queue of events between the reader task and the program. The reader hands over every
//! event from one socket read in one go, and the program takes the whole queue at once when it
//! runs dry, so a busy connection pays for the lock and the wake-up once per read, not once
//! per message.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures_core::Stream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, MutexGuard};

use relay_proto::Handoff;

use crate::event::Event;
use crate::outgoing::Outgoing;
use relay_proto::Message;

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
}

#[derive(Debug, Default)]
struct State {
    queue: VecDeque<Event>,
    /// The reader has ended; no events follow those queued.
    ended: bool,
}

impl Incoming {
    pub(crate) fn new(max_queued: usize) -> Arc<Incoming> {
        Arc::new(Incoming {
            handoff: Handoff::new(State::default()),
            max_queued: max_queued.max(1),
            abandoned: AtomicBool::new(false),
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
    /// `wait` is false, in which case events that do not fit are dropped. Events for a
    /// program that dropped its [`Events`] are dropped.
    pub(crate) async fn deliver(&self, batch: &mut VecDeque<Event>, wait: bool) {
        if batch.is_empty() {
            return;
        }
        let was_empty = self
            .handoff
            .produce(|state| {
                if self.abandoned.load(Ordering::Relaxed) {
                    batch.clear();
                    return Some(false);
                }
                let waiting = state.queue.len();
                if !wait {
                    batch.truncate(self.max_queued.saturating_sub(waiting));
                }
                (waiting < self.max_queued || !wait).then(|| {
                    if waiting == 0 {
                        // The usual case under load (the program took everything): the batch
                        // becomes the queue and the reader gets the emptied one back, with
                        // its room, instead of moving every event.
                        std::mem::swap(&mut state.queue, batch);
                    } else {
                        state.queue.append(batch);
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

    /// The reader has ended: once the program has taken what is queued, it gets `None`.
    pub(crate) fn end(&self) {
        self.state().ended = true;
        self.handoff.wake_consumer();
    }
}

/// A wait until there are events to take, or the end.
type Wait = Pin<Box<dyn Future<Output = ()> + Send>>;

/// The stream of [`Event`]s for one connection.
pub struct Events {
    shared: Arc<Incoming>,
    /// Events taken from the shared queue and not yet handed out.
    taken: VecDeque<Event>,
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
            waiting: None,
            acks,
            handed: 0,
            acked: 0,
            pending_bytes: 0,
        }
    }

    /// Notes that `event` is handed to the program, and acknowledges what was handed once a
    /// batch of events is used up (cumulatively: one acknowledgement per batch, not one per
    /// message).
    fn handing(&mut self, event: &Event) {
        let Some(acks) = &self.acks else { return };
        let seq = event.seq();
        if seq == 0 {
            return;
        }
        self.handed = self.handed.max(seq);
        self.pending_bytes += match event {
            Event::Message { content, .. } => content.len() + 64,
            _ => 64,
        };
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
            if self.shared.state().ended {
                // The reader queues nothing after it ends, but take anything that raced in
                // before the flag.
                return self.try_next();
            }
            // A handle of its own, so the wait does not borrow `self`.
            let shared = self.shared.clone();
            shared.handoff.consume(Incoming::takeable).await;
        }
    }

    /// The next event if one is already waiting.
    pub fn try_next(&mut self) -> Option<Event> {
        let event = self.take_one()?;
        self.handing(&event);
        Some(event)
    }

    fn take_one(&mut self) -> Option<Event> {
        if let Some(event) = self.taken.pop_front() {
            return Some(event);
        }
        {
            let mut state = self.shared.state();
            if state.queue.is_empty() {
                return None;
            }
            // Swap the queues: the reader gets an empty one with room, the program the lot.
            std::mem::swap(&mut state.queue, &mut self.taken);
        }
        self.shared.handoff.wake_producers();
        self.taken.pop_front()
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

    #[tokio::test]
    async fn events_arrive_in_order_across_batches_then_none_after_the_end() {
        let shared = Incoming::new(100);
        let mut events = Events::new(shared.clone(), None);
        shared.deliver(&mut VecDeque::from([message(1), message(2)]), true).await;
        assert_eq!(events.next().await, Some(message(1)));
        shared.deliver(&mut VecDeque::from([message(3)]), true).await;
        shared.end();
        assert_eq!(ids(&mut events), vec![2, 3]);
        assert_eq!(events.next().await, None);
    }

    #[tokio::test]
    async fn a_full_queue_makes_the_reader_wait_until_the_program_takes() {
        let shared = Incoming::new(2);
        let mut events = Events::new(shared.clone(), None);
        shared.deliver(&mut VecDeque::from([message(1), message(2)]), true).await;
        let reader = shared.clone();
        let third =
            tokio::spawn(
                async move { reader.deliver(&mut VecDeque::from([message(3)]), true).await },
            );
        tokio::task::yield_now().await;
        assert!(!third.is_finished(), "the reader must wait for room");
        assert_eq!(events.try_next(), Some(message(1)));
        tokio::time::timeout(Duration::from_secs(20), third).await.unwrap().unwrap();
        assert_eq!(ids(&mut events), vec![2, 3]);
    }

    #[tokio::test]
    async fn without_waiting_what_does_not_fit_is_dropped() {
        let shared = Incoming::new(2);
        let mut events = Events::new(shared.clone(), None);
        shared.deliver(&mut VecDeque::from([message(1), message(2), message(3)]), false).await;
        assert_eq!(ids(&mut events), vec![1, 2]);
    }

    #[tokio::test]
    async fn a_program_that_drops_its_events_never_blocks_the_reader() {
        let shared = Incoming::new(1);
        let events = Events::new(shared.clone(), None);
        shared.deliver(&mut VecDeque::from([message(1)]), true).await;
        let reader = shared.clone();
        let blocked =
            tokio::spawn(
                async move { reader.deliver(&mut VecDeque::from([message(2)]), true).await },
            );
        tokio::task::yield_now().await;
        drop(events);
        tokio::time::timeout(Duration::from_secs(20), blocked).await.unwrap().unwrap();
        // And later batches are dropped at once.
        shared.deliver(&mut VecDeque::from([message(3)]), true).await;
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
        shared.deliver(&mut VecDeque::from([message(7)]), true).await;
        tokio::task::yield_now().await;
        shared.end();
        let got = tokio::time::timeout(Duration::from_secs(20), program).await.unwrap().unwrap();
        assert_eq!(got, (Some(message(7)), None));
    }
}
