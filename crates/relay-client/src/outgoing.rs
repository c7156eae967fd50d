//! The client's outgoing frames. Senders encode straight into one shared buffer, and the
//! writer task swaps the whole buffer out and writes it at once: a message costs an encode and
//! a lock, not an allocation and a channel hop, and a busy client sends many frames per
//! syscall.

use std::sync::MutexGuard;

use bytes::BytesMut;
use relay_proto::{Handoff, MessageCodec, MessageRef, ProtoError};

/// The connection is closed for sending.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Closed;

/// Why [`Outgoing::push_now`] queued nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum NowError {
    /// The connection is closed for sending.
    Closed,
    /// Twice the limit is queued: the peer is not reading.
    Full,
}

/// Frames waiting for the writer task.
#[derive(Debug)]
pub(crate) struct Outgoing {
    /// The frames, behind the shared queue primitive: its lock is held only to encode one
    /// message or swap the buffer; the writer is its consumer, senders its producers (woken
    /// when the writer takes the queue or the outbox closes).
    handoff: Handoff<State>,
    codec: MessageCodec,
    /// Messages that may wait before senders wait.
    max_queued: usize,
}

#[derive(Debug, Default)]
struct State {
    buf: BytesMut,
    queued: usize,
    closed: bool,
}

impl Outgoing {
    pub(crate) fn new(codec: MessageCodec, max_queued: usize) -> Outgoing {
        Outgoing { handoff: Handoff::new(State::default()), codec, max_queued: max_queued.max(1) }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.handoff.lock()
    }

    /// Queues `msg`, waiting while `max_queued` messages are already waiting for the writer.
    ///
    /// # Errors
    /// `Ok(Err(_))` if the message does not encode within the frame limit (nothing is queued);
    /// `Err(Closed)` if the connection is closed for sending.
    pub(crate) async fn push(
        &self,
        msg: &MessageRef<'_>,
    ) -> Result<Result<(), ProtoError>, Closed> {
        self.when_room(|state| self.queue(state, msg)).await
    }

    /// Runs `add` under the lock once fewer than `max_queued` messages are waiting, waiting
    /// for the writer to take the queue if need be.
    async fn when_room<T>(&self, mut add: impl FnMut(&mut State) -> T) -> Result<T, Closed> {
        self.handoff
            .produce(|state| {
                if state.closed {
                    return Some(Err(Closed));
                }
                (state.queued < self.max_queued).then(|| Ok(add(state)))
            })
            .await
    }

    /// Queues `msg` without waiting, over the limit if need be (pongs and pings, which are
    /// tiny and must not wait behind the program's traffic), but never more than twice the
    /// limit: a server that floods pings and reads none of the pongs cannot grow this queue
    /// without end.
    ///
    /// # Errors
    /// [`NowError::Closed`] if the connection is closed for sending; [`NowError::Full`] if
    /// twice the limit is queued (the peer is not reading).
    pub(crate) fn push_now(&self, msg: &MessageRef<'_>) -> Result<(), NowError> {
        let mut state = self.state();
        if state.closed {
            return Err(NowError::Closed);
        }
        if state.queued >= self.max_queued.saturating_mul(2) {
            return Err(NowError::Full);
        }
        // Control messages always fit the frame limit.
        let _ = self.queue(&mut state, msg);
        Ok(())
    }

    /// Encodes `msg` into `dst` (a batch being built), checking the frame limit.
    pub(crate) fn encode(
        &self,
        msg: &MessageRef<'_>,
        dst: &mut BytesMut,
    ) -> Result<(), ProtoError> {
        self.codec.encode_ref(msg, dst)
    }

    /// Queues `count` frames already encoded into `frames` (see [`Outgoing::encode`]), all
    /// under one lock and with at most one wake-up, waiting while `max_queued` messages are
    /// already waiting. `frames` is left empty (and may come back with a spare buffer).
    ///
    /// # Errors
    /// `Closed` if the connection is closed for sending; nothing is queued.
    pub(crate) async fn push_encoded(
        &self,
        frames: &mut BytesMut,
        count: usize,
    ) -> Result<(), Closed> {
        self.when_room(|state| {
            if state.buf.is_empty() {
                // Nothing queued: the batch becomes the queue, without copying it.
                std::mem::swap(&mut state.buf, frames);
            } else {
                state.buf.extend_from_slice(frames);
                frames.clear();
            }
            self.added(state, count);
        })
        .await
    }

    fn queue(&self, state: &mut State, msg: &MessageRef<'_>) -> Result<(), ProtoError> {
        self.codec.encode_ref(msg, &mut state.buf)?;
        self.added(state, 1);
        Ok(())
    }

    /// Counts `count` frames just appended to the queue.
    fn added(&self, state: &mut State, count: usize) {
        // Wake the writer only for the first frames of a batch; it takes them all.
        let was_idle = state.queued == 0;
        state.queued += count;
        if was_idle {
            self.handoff.wake_consumer();
        }
    }

    /// Closes for sending, after queuing `last` if given (the offline notice). The writer
    /// writes what is queued, then ends the connection.
    pub(crate) fn close(&self, last: Option<&MessageRef<'_>>) {
        {
            let mut state = self.state();
            if state.closed {
                return;
            }
            if let Some(msg) = last {
                let _ = self.queue(&mut state, msg);
            }
            state.closed = true;
        }
        self.handoff.wake_consumer();
        self.handoff.wake_producers();
    }

    /// For the writer: waits until frames are queued and swaps them into `spare` (which must
    /// be empty). Returns `false` once the outbox is closed and everything was taken.
    pub(crate) async fn take(&self, spare: &mut BytesMut) -> bool {
        let took = self
            .handoff
            .consume(|state| {
                if !state.buf.is_empty() {
                    std::mem::swap(&mut state.buf, spare);
                    state.queued = 0;
                    return Some(true);
                }
                state.closed.then_some(false)
            })
            .await;
        if took {
            self.handoff.wake_producers();
        }
        took
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn msg(content: &[u8]) -> MessageRef<'_> {
        MessageRef::send(1, "bob", content)
    }

    #[tokio::test]
    async fn senders_wait_for_the_writer_when_the_queue_is_full() {
        let out = std::sync::Arc::new(Outgoing::new(MessageCodec::new(1024), 2));
        out.push(&msg(b"a")).await.unwrap().unwrap();
        out.push(&msg(b"b")).await.unwrap().unwrap();
        let sender = out.clone();
        let third = tokio::spawn(async move { sender.push(&msg(b"c")).await.map(|r| r.is_ok()) });
        tokio::task::yield_now().await;
        assert!(!third.is_finished(), "a third message must wait for the writer");
        let mut spare = BytesMut::new();
        assert!(out.take(&mut spare).await);
        let woken = tokio::time::timeout(Duration::from_secs(20), third).await;
        assert_eq!(woken.unwrap().unwrap(), Ok(true));
    }

    #[test]
    fn control_messages_go_over_the_limit_but_not_without_end() {
        let out = Outgoing::new(MessageCodec::new(1024), 4);
        for _ in 0..8 {
            out.push_now(&msg(b"pong")).unwrap();
        }
        assert_eq!(out.push_now(&msg(b"pong")), Err(NowError::Full));
    }

    #[tokio::test]
    async fn close_writes_the_last_message_then_ends() {
        let out = Outgoing::new(MessageCodec::new(1024), 8);
        out.push(&msg(b"a")).await.unwrap().unwrap();
        out.close(Some(&msg(b"bye")));
        assert!(matches!(out.push(&msg(b"late")).await, Err(Closed)));
        assert_eq!(out.push_now(&msg(b"late")), Err(NowError::Closed));
        let mut spare = BytesMut::new();
        assert!(out.take(&mut spare).await);
        let mut codec = MessageCodec::new(1024);
        let contents: Vec<_> = std::iter::from_fn(|| {
            tokio_util::codec::Decoder::decode(&mut codec, &mut spare).unwrap()
        })
        .map(|m| m.content)
        .collect();
        assert_eq!(contents, vec![&b"a"[..], &b"bye"[..]]);
        assert!(!out.take(&mut spare).await);
    }

    #[tokio::test]
    async fn an_oversized_message_is_refused_and_queues_nothing() {
        let out = Outgoing::new(MessageCodec::new(256), 8);
        let big = vec![0u8; 300];
        assert!(out.push(&msg(&big)).await.unwrap().is_err());
        out.close(None);
        assert!(!out.take(&mut BytesMut::new()).await);
    }
}
