//! A connection's outbox: the frames waiting to be written to one client, bounded by bytes.
//!
//! A full outbox pushes back: [`Outbox::wait_for_room`] waits a bounded time for the writer to
//! make room, so a sender that outruns a healthy receiver is slowed to its pace instead of
//! losing messages. A receiver that makes no room in that time is marked stalled, and pushes
//! to it fail at once until it writes again, so a stuck receiver costs its senders one wait,
//! not one per message. The writer task takes everything queued in one go and writes it with
//! as few syscalls as the socket allows.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use relay_proto::{FRAME_HEADER_LEN, Message, encoded_len};
use tokio::sync::Notify;

/// Why a message could not be queued.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum PushError {
    /// The receiver already has its limit of bytes waiting.
    Full,
    /// The connection is closing; nothing more will be written.
    Closed,
}

/// A cloneable handle to one connection's outbox.
#[derive(Clone, Debug)]
pub(crate) struct Outbox {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    // A std mutex: it is held only to push or take, never across an `.await`.
    state: Mutex<State>,
    /// Wakes the writer when something is queued.
    ready: Notify,
    /// Wakes senders waiting for room when bytes are written or the outbox closes.
    room: Notify,
    limit: usize,
}

#[derive(Debug, Default)]
struct State {
    queue: VecDeque<Message>,
    /// Bytes in `queue`.
    queued: usize,
    /// Bytes queued plus bytes taken by the writer and not yet written.
    bytes: usize,
    closed: bool,
    /// A sender waited for room and none came; cleared when the writer writes again.
    stalled: bool,
    /// How many times the writer has written, to tell a stuck receiver from a busy one.
    written: u64,
}

/// Bytes a frame with a body of `encoded_len` occupies on the wire, which is what the outbox
/// limit counts.
pub(crate) fn wire_size(encoded_len: usize) -> usize {
    FRAME_HEADER_LEN + encoded_len
}

fn wire_size_of(msg: &Message) -> usize {
    wire_size(encoded_len(msg))
}

impl Outbox {
    /// An empty outbox holding at most `limit` bytes of frames.
    pub(crate) fn new(limit: usize) -> Outbox {
        Outbox {
            shared: Arc::new(Shared {
                state: Mutex::new(State::default()),
                ready: Notify::new(),
                room: Notify::new(),
                limit,
            }),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // Nothing panics while holding the lock, so poisoning cannot happen; if it somehow
        // did, the queue itself is still consistent.
        self.shared.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues `msg` unless that would take the outbox over its limit or it is closed, in
    /// which case the message is handed back with the reason. Never waits.
    pub(crate) fn push(&self, msg: Message) -> Result<(), (PushError, Message)> {
        let size = wire_size_of(&msg);
        self.push_sized(msg, size)
    }

    /// Queues `msg`, which takes `size` bytes on the wire, if there is room. If the outbox is
    /// full but not stalled, hands the message back (`Ok(Some(msg))`) for the caller to
    /// [`wait_for_room`](Outbox::wait_for_room); fails if it is closed, or full and stalled.
    pub(crate) fn try_push(
        &self,
        msg: Message,
        size: usize,
    ) -> Result<Option<Message>, (PushError, Message)> {
        match self.push_sized(msg, size) {
            Ok(()) => Ok(None),
            Err((PushError::Full, msg)) if !self.state().stalled => Ok(Some(msg)),
            Err(e) => Err(e),
        }
    }

    /// Waits for room for `msg`, then queues it. Waiting goes on while the receiver makes
    /// progress, however many senders compete for the room it frees; if it writes nothing for
    /// `wait`, the outbox is marked stalled (so later messages fail at once, see
    /// [`Outbox::try_push`]) and the message is refused.
    pub(crate) async fn wait_for_room(
        &self,
        mut msg: Message,
        size: usize,
        wait: Duration,
    ) -> Result<(), (PushError, Message)> {
        let mut seen = self.state().written;
        let mut deadline = tokio::time::Instant::now() + wait;
        loop {
            let room = self.shared.room.notified();
            tokio::pin!(room);
            // Registered before checking, so room made in between is not missed.
            room.as_mut().enable();
            msg = match self.push_sized(msg, size) {
                Err((PushError::Full, msg)) => msg,
                done => return done,
            };
            if tokio::time::timeout_at(deadline, room).await.is_err() {
                let mut state = self.state();
                if state.written == seen {
                    state.stalled = true;
                    drop(state);
                    return self.push_sized(msg, size);
                }
                // The receiver did write; other senders took the room. Keep waiting.
                seen = state.written;
                deadline = tokio::time::Instant::now() + wait;
            }
        }
    }

    fn push_sized(&self, msg: Message, size: usize) -> Result<(), (PushError, Message)> {
        {
            let mut state = self.state();
            if state.closed {
                return Err((PushError::Closed, msg));
            }
            if state.bytes + size > self.shared.limit {
                return Err((PushError::Full, msg));
            }
            state.bytes += size;
            state.queued += size;
            state.queue.push_back(msg);
        }
        self.shared.ready.notify_one();
        Ok(())
    }

    /// Closes the outbox, queuing `last` (if any) after everything already queued, whatever
    /// the limit. Later pushes fail with [`PushError::Closed`]; the writer finishes what is
    /// queued and stops. Closing twice keeps the first closing message.
    pub(crate) fn close(&self, last: Option<Message>) {
        {
            let mut state = self.state();
            if state.closed {
                return;
            }
            state.closed = true;
            if let Some(msg) = last {
                let size = wire_size_of(&msg);
                state.bytes += size;
                state.queued += size;
                state.queue.push_back(msg);
            }
        }
        self.shared.ready.notify_one();
        // Senders waiting for room must learn that none will come.
        self.shared.room.notify_waiters();
    }

    /// Waits until something is queued, then moves all of it into `batch` and returns its
    /// size in bytes. Returns `None` once the outbox is closed and empty.
    ///
    /// The bytes stay counted against the limit until [`Outbox::written`] is called, so a
    /// batch the socket is still chewing on keeps holding its share.
    pub(crate) async fn take(&self, batch: &mut Vec<Message>) -> Option<usize> {
        loop {
            {
                let mut state = self.state();
                if !state.queue.is_empty() {
                    batch.extend(state.queue.drain(..));
                    return Some(std::mem::take(&mut state.queued));
                }
                if state.closed {
                    return None;
                }
            }
            // `notify_one` stores a permit when nobody is waiting, so a push between the
            // check above and this await is not missed.
            self.shared.ready.notified().await;
        }
    }

    /// Moves whatever is still queued into `into` (used once the connection has failed).
    pub(crate) fn drain_into(&self, into: &mut Vec<Message>) {
        {
            let mut state = self.state();
            into.extend(state.queue.drain(..));
            state.bytes = 0;
            state.queued = 0;
        }
        self.shared.room.notify_waiters();
    }

    /// Releases `bytes` taken by [`Outbox::take`] once they have been written, waking senders
    /// waiting for room.
    pub(crate) fn written(&self, bytes: usize) {
        {
            let mut state = self.state();
            state.bytes = state.bytes.saturating_sub(bytes);
            state.stalled = false;
            state.written += 1;
        }
        self.shared.room.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What routing does: try, and wait for room if the outbox is full.
    async fn push_within(
        outbox: &Outbox,
        msg: Message,
        size: usize,
        wait: Duration,
    ) -> Result<(), (PushError, Message)> {
        match outbox.try_push(msg, size)? {
            None => Ok(()),
            Some(msg) => outbox.wait_for_room(msg, size, wait).await,
        }
    }

    #[tokio::test]
    async fn full_outbox_refuses_and_recovers_after_write() {
        let msg = Message::send(1, "bob", vec![0u8; 100]);
        let size = wire_size_of(&msg);
        let outbox = Outbox::new(size * 2);
        outbox.push(msg.clone()).unwrap();
        outbox.push(msg.clone()).unwrap();
        assert_eq!(outbox.push(msg.clone()).unwrap_err().0, PushError::Full);

        let mut batch = Vec::new();
        let taken = outbox.take(&mut batch).await.unwrap();
        assert_eq!((batch.len(), taken), (2, size * 2));
        // Taken but not written: still counted.
        assert_eq!(outbox.push(msg.clone()).unwrap_err().0, PushError::Full);
        outbox.written(taken);
        outbox.push(msg).unwrap();
    }

    #[tokio::test]
    async fn close_keeps_order_and_bypasses_the_limit() {
        let outbox = Outbox::new(200);
        outbox.push(Message::send(1, "bob", vec![0u8; 100])).unwrap();
        outbox.close(Some(Message::send(2, "bob", vec![0u8; 500])));
        assert_eq!(outbox.push(Message::ping(3)).unwrap_err().0, PushError::Closed);
        let mut batch = Vec::new();
        outbox.take(&mut batch).await.unwrap();
        assert_eq!(batch.iter().map(|m| m.id).collect::<Vec<_>>(), vec![1, 2]);
        assert_eq!(outbox.take(&mut batch).await, None);
    }

    #[tokio::test]
    async fn a_full_outbox_makes_senders_wait_for_room_then_gives_up_once() {
        let msg = Message::send(1, "bob", vec![0u8; 100]);
        let size = wire_size_of(&msg);
        let outbox = Outbox::new(size);
        outbox.push(msg.clone()).unwrap();

        // A sender waits; the writer takes and writes the first message; the sender's goes in.
        let sender = outbox.clone();
        let second = msg.clone();
        let waiting = tokio::spawn(async move {
            push_within(&sender, second, size, Duration::from_secs(60)).await.map_err(|e| e.0)
        });
        let mut batch = Vec::new();
        let taken = outbox.take(&mut batch).await.unwrap();
        outbox.written(taken);
        assert_eq!(waiting.await.unwrap(), Ok(()));

        // Nobody writes now: the wait runs out, the outbox is marked stalled, and the next
        // push fails without waiting (a 60 s wait would time the test out).
        let wait = Duration::from_millis(20);
        assert_eq!(
            push_within(&outbox, msg.clone(), size, wait).await.unwrap_err().0,
            PushError::Full
        );
        let long = Duration::from_secs(60);
        assert_eq!(
            push_within(&outbox, msg.clone(), size, long).await.unwrap_err().0,
            PushError::Full
        );

        // Writing again clears the stall.
        batch.clear();
        let taken = outbox.take(&mut batch).await.unwrap();
        outbox.written(taken);
        push_within(&outbox, msg, size, long).await.unwrap();
    }

    #[tokio::test]
    async fn closing_wakes_waiting_senders() {
        let msg = Message::send(1, "bob", vec![0u8; 100]);
        let size = wire_size_of(&msg);
        let outbox = Outbox::new(size);
        outbox.push(msg.clone()).unwrap();
        let sender = outbox.clone();
        let waiting = tokio::spawn(async move {
            push_within(&sender, msg, size, Duration::from_secs(60)).await.map_err(|e| e.0)
        });
        // On this single-threaded runtime one yield lets the sender run until it waits.
        tokio::task::yield_now().await;
        outbox.close(None);
        // Woken as closed, long before its 60 s wait would end.
        let woken = tokio::time::timeout(Duration::from_secs(20), waiting).await;
        assert_eq!(woken.unwrap().unwrap(), Err(PushError::Closed));
    }

    #[tokio::test]
    async fn take_wakes_on_push_from_another_task() {
        let outbox = Outbox::new(1000);
        let pusher = outbox.clone();
        let task = tokio::spawn(async move {
            let mut batch = Vec::new();
            outbox.take(&mut batch).await.map(|_| batch.len())
        });
        tokio::task::yield_now().await;
        pusher.push(Message::ping(1)).unwrap();
        assert_eq!(task.await.unwrap(), Some(1));
    }
}
