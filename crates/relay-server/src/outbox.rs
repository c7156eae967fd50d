//! A connection's outbox: the frames waiting to be written to one client, bounded by bytes.
//!
//! Senders never wait on it: [`Outbox::push`] either queues at once or says the outbox is full,
//! so one slow receiver can never stall the clients writing to it. The writer task takes
//! everything queued in one go and writes it with as few syscalls as the socket allows.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

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
    ready: Notify,
    limit: usize,
}

#[derive(Debug, Default)]
struct State {
    queue: VecDeque<Message>,
    /// Bytes queued plus bytes taken by the writer and not yet written.
    bytes: usize,
    closed: bool,
}

/// Bytes a message occupies on the wire, which is what the outbox limit counts.
pub(crate) fn wire_size(msg: &Message) -> usize {
    FRAME_HEADER_LEN + encoded_len(msg)
}

impl Outbox {
    /// An empty outbox holding at most `limit` bytes of frames.
    pub(crate) fn new(limit: usize) -> Outbox {
        Outbox {
            shared: Arc::new(Shared {
                state: Mutex::new(State::default()),
                ready: Notify::new(),
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
    /// which case the message is handed back with the reason.
    pub(crate) fn push(&self, msg: Message) -> Result<(), (PushError, Message)> {
        let size = wire_size(&msg);
        {
            let mut state = self.state();
            if state.closed {
                return Err((PushError::Closed, msg));
            }
            if state.bytes + size > self.shared.limit {
                return Err((PushError::Full, msg));
            }
            state.bytes += size;
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
                state.bytes += wire_size(&msg);
                state.queue.push_back(msg);
            }
        }
        self.shared.ready.notify_one();
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
                    let mut bytes = 0;
                    for msg in state.queue.drain(..) {
                        bytes += wire_size(&msg);
                        batch.push(msg);
                    }
                    return Some(bytes);
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
        let mut state = self.state();
        into.extend(state.queue.drain(..));
        state.bytes = 0;
    }

    /// Releases `bytes` taken by [`Outbox::take`] once they have been written.
    pub(crate) fn written(&self, bytes: usize) {
        let mut state = self.state();
        state.bytes = state.bytes.saturating_sub(bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn full_outbox_refuses_and_recovers_after_write() {
        let msg = Message::send(1, "bob", vec![0u8; 100]);
        let size = wire_size(&msg);
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
