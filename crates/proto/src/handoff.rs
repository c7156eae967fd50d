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
//!
//! The protocol is model-checked with loom (`tests::model`): this very code, with loom's mutex
//! and a model of tokio's `Notify` contract, over every interleaving of a consumer and one or
//! two producers (within a preemption bound); nothing is lost, doubled, reordered or slept
//! through. The check has teeth: a producer that looks at the state before creating its wait
//! deadlocks there.

use std::future::Future;
use std::ops::DerefMut;
use std::pin::Pin;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::sync::Notify;

/// The lock a [`Handoff`] keeps its state behind: std's mutex, or a model's in tests.
pub trait Lock<S> {
    /// The held lock.
    type Guard<'a>: DerefMut<Target = S>
    where
        Self: 'a;
    /// A lock around `state`.
    fn new(state: S) -> Self;
    /// Locks.
    fn lock(&self) -> Self::Guard<'_>;
}

impl<S> Lock<S> for Mutex<S> {
    type Guard<'a>
        = MutexGuard<'a, S>
    where
        S: 'a;

    fn new(state: S) -> Mutex<S> {
        Mutex::new(state)
    }

    fn lock(&self) -> MutexGuard<'_, S> {
        // Nothing panics while holding the lock; if something somehow did, the state is
        // still whole (every change is made in one step).
        Mutex::lock(self).unwrap_or_else(PoisonError::into_inner)
    }
}

/// The wake-up a [`Handoff`] uses: tokio's `Notify`, or a model's in tests. Its contract is
/// tokio's: a `notified` future that was enabled gets `notify_waiters`, and `notify_one` wakes
/// one enabled waiter or else keeps a permit for the next.
pub trait Wake: Default {
    /// A wait for a wake-up.
    type Notified<'a>: Future<Output = ()>
    where
        Self: 'a;
    /// A wait, not yet registered.
    fn notified(&self) -> Self::Notified<'_>;
    /// Registers the wait, so a wake-up from now on is not lost.
    fn enable(notified: Pin<&mut Self::Notified<'_>>);
    /// Wakes one waiter, or lets the next wait return at once.
    fn notify_one(&self);
    /// Wakes every registered waiter.
    fn notify_waiters(&self);
}

impl Wake for Notify {
    type Notified<'a> = tokio::sync::futures::Notified<'a>;

    fn notified(&self) -> Self::Notified<'_> {
        Notify::notified(self)
    }

    fn enable(notified: Pin<&mut Self::Notified<'_>>) {
        notified.enable();
    }

    fn notify_one(&self) {
        Notify::notify_one(self);
    }

    fn notify_waiters(&self) {
        Notify::notify_waiters(self);
    }
}

/// A state with a consumer wake-up and a producer wake-up. See the module documentation. The
/// lock and wake-up are type parameters only so the tests can model-check this very code with
/// loom's; everyone else uses the defaults.
#[derive(Debug, Default)]
pub struct Handoff<S, L = Mutex<S>, W = Notify> {
    state: L,
    ready: W,
    room: W,
    _state: std::marker::PhantomData<fn(S) -> S>,
}

impl<S, L: Lock<S>, W: Wake> Handoff<S, L, W> {
    /// A handoff around `state`.
    pub fn new(state: S) -> Handoff<S, L, W> {
        Handoff {
            state: L::new(state),
            ready: W::default(),
            room: W::default(),
            _state: std::marker::PhantomData,
        }
    }

    /// The state, locked. Never hold it across an `.await`.
    pub fn lock(&self) -> L::Guard<'_> {
        self.state.lock()
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
            let mut ready = std::pin::pin!(ready);
            // Registered before looking, so a wake-up in between is not lost.
            W::enable(ready.as_mut());
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
            let mut room = std::pin::pin!(room);
            W::enable(room.as_mut());
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
            let mut room = std::pin::pin!(room);
            W::enable(room.as_mut());
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

    impl Queue {
        /// The consumer's take: everything queued; `Some(None)` once closed and empty;
        /// `None` (wait) otherwise.
        fn take_all(&mut self) -> Option<Option<Vec<u32>>> {
            if !self.items.is_empty() {
                Some(Some(std::mem::take(&mut self.items)))
            } else if self.closed {
                Some(None)
            } else {
                None
            }
        }
    }

    /// Many producers and one consumer on a tiny queue, with the scheduler shuffled by yields:
    /// every item arrives once, in each producer's order, and nobody sleeps through a
    /// wake-up (the timeout would fail the test instead of hanging it).
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn nothing_is_lost_doubled_or_slept_through() {
        const PRODUCERS: u32 = 8;
        const EACH: u32 = 2_000;
        const LIMIT: usize = 3;
        let handoff = Arc::new(Handoff::<Queue>::new(Queue::default()));
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
                    let batch = handoff.consume(Queue::take_all).await;
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
        let handoff = Handoff::<Queue>::new(Queue { items: vec![1, 2, 3], closed: false });
        let got = handoff
            .produce_within(Duration::from_millis(20), |q| (q.items.len() < 3).then_some(()))
            .await;
        assert_eq!(got, None);
    }

    /// `Handoff` itself, model-checked with loom: every interleaving of its threads (up to a
    /// bound on preemptions), with loom's mutex and a model of tokio's `Notify` (its
    /// documented contract, below). Loom fails the test on a lost wake-up (everyone asleep: a
    /// deadlock) as well as on the assertions.
    mod model {
        use super::super::{Handoff, Lock, Wake};
        use super::Queue;
        use std::future::Future;
        use std::pin::Pin;
        use std::task::{Context, Poll, Waker};

        struct ModelLock<S>(loom::sync::Mutex<S>);

        impl<S> Lock<S> for ModelLock<S> {
            type Guard<'a>
                = loom::sync::MutexGuard<'a, S>
            where
                S: 'a;

            fn new(state: S) -> Self {
                ModelLock(loom::sync::Mutex::new(state))
            }

            fn lock(&self) -> Self::Guard<'_> {
                self.0.lock().unwrap()
            }
        }

        /// tokio's `Notify` contract: `notify_waiters` wakes every wait created before it;
        /// `notify_one` wakes the oldest registered wait, or keeps one permit for the next; a
        /// wait dropped after `notify_one` chose it passes the wake-up on.
        struct ModelNotify(loom::sync::Mutex<Waits>);

        #[derive(Default)]
        struct Waits {
            permit: bool,
            generation: u64,
            next_id: u64,
            registered: Vec<(u64, Option<Waker>)>,
            chosen: Vec<u64>,
        }

        impl Default for ModelNotify {
            fn default() -> Self {
                ModelNotify(loom::sync::Mutex::new(Waits::default()))
            }
        }

        struct ModelNotified<'a> {
            notify: &'a ModelNotify,
            generation: u64,
            id: Option<u64>,
            done: bool,
        }

        impl ModelNotified<'_> {
            /// Whether the wait is over; registers it (with `waker`) if not.
            fn check(&mut self, waker: Option<&Waker>) -> bool {
                let mut w = self.notify.0.lock().unwrap();
                if self.done {
                    return true;
                }
                if w.generation != self.generation {
                    self.done = true;
                } else if let Some(id) = self.id {
                    if let Some(at) = w.chosen.iter().position(|&c| c == id) {
                        w.chosen.remove(at);
                        self.done = true;
                    } else if let Some(entry) = w.registered.iter_mut().find(|e| e.0 == id)
                        && waker.is_some()
                    {
                        entry.1 = waker.cloned();
                    }
                } else if w.permit {
                    w.permit = false;
                    self.done = true;
                } else {
                    let id = w.next_id;
                    w.next_id += 1;
                    self.id = Some(id);
                    w.registered.push((id, waker.cloned()));
                }
                if self.done
                    && let Some(id) = self.id
                {
                    w.registered.retain(|e| e.0 != id);
                }
                self.done
            }
        }

        impl Future for ModelNotified<'_> {
            type Output = ();

            fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
                if self.check(Some(cx.waker())) { Poll::Ready(()) } else { Poll::Pending }
            }
        }

        impl Drop for ModelNotified<'_> {
            fn drop(&mut self) {
                let Some(id) = self.id else { return };
                let forward = {
                    let mut w = self.notify.0.lock().unwrap();
                    w.registered.retain(|e| e.0 != id);
                    match w.chosen.iter().position(|&c| c == id) {
                        Some(at) => {
                            w.chosen.remove(at);
                            true
                        }
                        None => false,
                    }
                };
                if forward {
                    self.notify.notify_one();
                }
            }
        }

        impl Wake for ModelNotify {
            type Notified<'a> = ModelNotified<'a>;

            fn notified(&self) -> ModelNotified<'_> {
                let generation = self.0.lock().unwrap().generation;
                ModelNotified { notify: self, generation, id: None, done: false }
            }

            fn enable(mut notified: Pin<&mut ModelNotified<'_>>) {
                notified.check(None);
            }

            fn notify_one(&self) {
                let waker = {
                    let mut w = self.0.lock().unwrap();
                    if w.registered.is_empty() {
                        w.permit = true;
                        None
                    } else {
                        let (id, waker) = w.registered.remove(0);
                        w.chosen.push(id);
                        waker
                    }
                };
                if let Some(waker) = waker {
                    waker.wake();
                }
            }

            fn notify_waiters(&self) {
                let wakers: Vec<Waker> = {
                    let mut w = self.0.lock().unwrap();
                    w.generation += 1;
                    w.registered.drain(..).filter_map(|e| e.1).collect()
                };
                for waker in wakers {
                    waker.wake();
                }
            }
        }

        type ModelHandoff = Handoff<Queue, ModelLock<Queue>, ModelNotify>;

        /// One consumer that swaps the queue out, `senders` producers each adding `each` items
        /// to a queue of one: each item arrives once, in its producer's order, and nobody
        /// sleeps through a wake-up, in every interleaving with at most `preemptions` forced
        /// switches (loom's bound; the state space grows fast: two producers of two items each
        /// take over ten minutes at bound 2).
        fn check(senders: u32, each: u32, preemptions: usize) {
            let mut model = loom::model::Builder::new();
            model.preemption_bound = Some(preemptions);
            model.check(move || {
                let handoff = loom::sync::Arc::new(ModelHandoff::new(Queue::default()));
                let producers: Vec<_> = (0..senders)
                    .map(|p| {
                        let handoff = handoff.clone();
                        loom::thread::spawn(move || {
                            loom::future::block_on(async move {
                                for i in 0..each {
                                    let was_empty = handoff
                                        .produce(|q| {
                                            q.items.is_empty().then(|| {
                                                q.items.push(p * 10 + i);
                                                true
                                            })
                                        })
                                        .await;
                                    if was_empty {
                                        handoff.wake_consumer();
                                    }
                                }
                            })
                        })
                    })
                    .collect();
                let consumer = {
                    let handoff = handoff.clone();
                    loom::thread::spawn(move || {
                        loom::future::block_on(async move {
                            let mut seen = Vec::new();
                            loop {
                                let batch = handoff.consume(Queue::take_all).await;
                                let Some(batch) = batch else { return seen };
                                handoff.wake_producers();
                                seen.extend(batch);
                            }
                        })
                    })
                };
                for producer in producers {
                    producer.join().unwrap();
                }
                handoff.lock().closed = true;
                handoff.wake_consumer();
                let seen = consumer.join().unwrap();
                let mut sorted = seen.clone();
                sorted.sort_unstable();
                let want: Vec<u32> =
                    (0..senders).flat_map(|p| (0..each).map(move |i| p * 10 + i)).collect();
                assert_eq!(sorted, want, "lost or doubled: {seen:?}");
                for p in (0..senders).map(|p| p * 10) {
                    let mine: Vec<_> = seen.iter().filter(|&&x| x / 10 * 10 == p).collect();
                    assert!(mine.windows(2).all(|w| w[0] < w[1]), "out of order: {seen:?}");
                }
            });
        }

        #[test]
        fn one_producer_many_items_every_interleaving() {
            check(1, 3, 2);
        }

        #[test]
        fn two_producers_every_interleaving() {
            check(2, 1, 2);
        }
    }
}
