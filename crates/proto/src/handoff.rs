//! [`Handoff`]: the one queue primitive under the server's outbox and the client's incoming
//! and outgoing queues. Each of them is a state behind a std mutex (held only to add to it or
//! swap it out, never across an await) that producers fill and one consumer empties in a
//! batch, with two wake-ups: the consumer waits for something to take, producers wait for
//! room. What each queue holds and how it counts is its own; the waiting, where a wake-up can
//! be lost, is here, once:
//!
//! - a waiter registers for the wake-up *before* it looks at the state, so a change made
//!   between its look and its sleep wakes it (tokio's `Notify::notified` + `enable`);
//! - the consumer is woken with `notify_one`, which keeps a permit if it is not waiting yet;
//! - producers are woken with `notify_waiters`, all of them, and each looks again.

use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::sync::Notify;

/// A state with a consumer wake-up and a producer wake-up. See the module documentation.
#[derive(Debug, Default)]
pub struct Handoff<S> {
    state: Mutex<S>,
    ready: Notify,
    room: Notify,
}

impl<S> Handoff<S> {
    /// A handoff around `state`.
    pub fn new(state: S) -> Handoff<S> {
        Handoff { state: Mutex::new(state), ready: Notify::new(), room: Notify::new() }
    }

    /// The state, locked. Never hold it across an `.await`.
    pub fn lock(&self) -> MutexGuard<'_, S> {
        // Nothing panics while holding the lock; if something somehow did, the state is
        // still whole (every change is made in one step).
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Wakes the consumer (or lets its next wait return at once).
    pub fn wake_consumer(&self) {
        self.ready.notify_one();
    }

    /// Wakes every producer waiting for room.
    pub fn wake_producers(&self) {
        self.room.notify_waiters();
    }

    /// For the consumer: runs `take` on the state until it returns `Some`, sleeping between
    /// tries until [`Handoff::wake_consumer`].
    pub async fn consume<T>(&self, mut take: impl FnMut(&mut S) -> Option<T>) -> T {
        loop {
            let ready = self.ready.notified();
            tokio::pin!(ready);
            // Registered before looking, so a wake-up in between is not lost.
            ready.as_mut().enable();
            if let Some(taken) = take(&mut self.lock()) {
                return taken;
            }
            ready.await;
        }
    }

    /// For a producer: runs `add` on the state until it returns `Some`, sleeping between
    /// tries until [`Handoff::wake_producers`]. The first try takes no registration, for the
    /// common case of room at once.
    pub async fn produce<T>(&self, mut add: impl FnMut(&mut S) -> Option<T>) -> T {
        if let Some(done) = add(&mut self.lock()) {
            return done;
        }
        loop {
            let room = self.room.notified();
            tokio::pin!(room);
            room.as_mut().enable();
            if let Some(done) = add(&mut self.lock()) {
                return done;
            }
            room.await;
        }
    }

    /// [`Handoff::produce`] that gives up at `deadline` (`None` then).
    pub async fn produce_until<T>(
        &self,
        deadline: tokio::time::Instant,
        mut add: impl FnMut(&mut S) -> Option<T>,
    ) -> Option<T> {
        loop {
            let room = self.room.notified();
            tokio::pin!(room);
            room.as_mut().enable();
            if let Some(done) = add(&mut self.lock()) {
                return Some(done);
            }
            if tokio::time::timeout_at(deadline, room).await.is_err() {
                return None;
            }
        }
    }

    /// [`Handoff::produce_until`] with a wait rather than a deadline.
    pub async fn produce_within<T>(
        &self,
        wait: Duration,
        add: impl FnMut(&mut S) -> Option<T>,
    ) -> Option<T> {
        self.produce_until(tokio::time::Instant::now() + wait, add).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;
    use std::sync::Arc;

    #[derive(Default)]
    struct Queue {
        items: Vec<u32>,
        closed: bool,
    }

    /// Many producers and one consumer on a tiny queue, with the scheduler shuffled by yields:
    /// every item arrives once, in each producer's order, and nobody sleeps through a
    /// wake-up (the timeout would fail the test instead of hanging it).
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn nothing_is_lost_doubled_or_slept_through() {
        const PRODUCERS: u32 = 8;
        const EACH: u32 = 2_000;
        const LIMIT: usize = 3;
        let handoff = Arc::new(Handoff::new(Queue::default()));
        let mut producers = Vec::new();
        for p in 0..PRODUCERS {
            let handoff = handoff.clone();
            producers.push(tokio::spawn(async move {
                for i in 0..EACH {
                    let item = p * EACH + i;
                    let was_empty = handoff
                        .produce(|q| {
                            (q.items.len() < LIMIT).then(|| {
                                q.items.push(item);
                                q.items.len() == 1
                            })
                        })
                        .await;
                    if was_empty {
                        handoff.wake_consumer();
                    }
                    if i % 7 == 0 {
                        tokio::task::yield_now().await;
                    }
                }
            }));
        }
        let consumer = {
            let handoff = handoff.clone();
            tokio::spawn(async move {
                let mut seen = HashSet::new();
                let mut last = vec![None::<u32>; PRODUCERS as usize];
                loop {
                    let batch = handoff
                        .consume(|q| {
                            if !q.items.is_empty() {
                                Some(Some(std::mem::take(&mut q.items)))
                            } else if q.closed {
                                Some(None)
                            } else {
                                None
                            }
                        })
                        .await;
                    let Some(batch) = batch else { return seen };
                    handoff.wake_producers();
                    for item in batch {
                        assert!(seen.insert(item), "{item} delivered twice");
                        let (p, i) = ((item / EACH) as usize, item % EACH);
                        assert!(last[p].is_none_or(|l| l < i), "{item} out of order");
                        last[p] = Some(i);
                    }
                }
            })
        };
        let all = async {
            for producer in producers {
                producer.await.unwrap();
            }
            handoff.lock().closed = true;
            handoff.wake_consumer();
            consumer.await.unwrap()
        };
        let seen =
            tokio::time::timeout(Duration::from_secs(60), all).await.expect("a lost wake-up");
        assert_eq!(seen.len(), (PRODUCERS * EACH) as usize);
    }

    #[tokio::test]
    async fn a_producer_that_gets_no_room_gives_up_at_its_deadline() {
        let handoff = Handoff::new(Queue { items: vec![1, 2, 3], closed: false });
        let got = handoff
            .produce_within(Duration::from_millis(20), |q| (q.items.len() < 3).then_some(()))
            .await;
        assert_eq!(got, None);
    }
}
