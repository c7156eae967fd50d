//! When to ping a registered client, and when to give up on it.
//!
//! Two questions, answered with one ping at a time:
//! - **Is it there?** A client that has sent no whole frame for the ping interval is pinged;
//!   one still silent at the idle timeout, after having had the time to answer, is dropped
//!   (`IdleTimeout`). It is never dropped without a ping: a session the server itself held
//!   (waiting for a busy receiver) looks silent, but was not.
//! - **Does it read?** A client that has been written to since it last showed it reads is
//!   pinged too, even while it sends. The ping goes behind everything written before it, so
//!   its answer (a `Pong` with the same id) shows the client read all of that. One that does
//!   not answer within the idle timeout is not reading (`SlowConsumer`), however much it
//!   sends: the kernel's socket buffer may have taken everything written to it, so the
//!   writer's own timeout never sees it.

use std::time::Duration;

use tokio::time::Instant;

/// What the session should do now (see [`Keepalive::tick`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Nothing to do before this time.
    Wait(Instant),
    /// Send `Ping` with this id, then report it with [`Keepalive::pinged`].
    Ping(u64),
    /// Silent, and the ping went unanswered: drop it as idle.
    Idle,
    /// It sends, but did not answer a ping sent after what it was written: not reading.
    NotReading,
}

/// The session's timing settings.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Timing {
    pub(crate) ping_interval: Duration,
    pub(crate) idle_timeout: Duration,
}

impl Timing {
    /// How long a client has to answer a ping before it may be dropped as idle.
    fn answer_time(self) -> Duration {
        self.idle_timeout.saturating_sub(self.ping_interval)
    }
}

/// One session's keepalive state. Kept small: it is part of every connection's task, idle or
/// not (56 bytes; the settings are passed in, not copied here).
#[derive(Debug)]
pub(crate) struct Keepalive {
    /// When the client's last whole frame was read.
    last_heard: Instant,
    /// When the last ping was sent (or found no room).
    pinged_at: Instant,
    /// The last ping's id.
    last_id: u64,
    /// Where the ping waiting for its answer ends in the stream of bytes written to the
    /// client; 0 if none waits.
    waiting_end: u64,
    /// How far into the stream the client has shown it read.
    confirmed: u64,
}

impl Keepalive {
    pub(crate) fn new(now: Instant) -> Self {
        Keepalive { last_heard: now, pinged_at: now, last_id: 0, waiting_end: 0, confirmed: 0 }
    }

    /// When the client's last whole frame was read.
    pub(crate) fn last_heard(&self) -> Instant {
        self.last_heard
    }

    /// A whole frame read at `at` (a sign of life).
    pub(crate) fn heard(&mut self, at: Instant) {
        self.last_heard = at;
    }

    /// The client answered ping `id`.
    pub(crate) fn pong(&mut self, id: u64) {
        if self.waiting_end > 0 && id == self.last_id {
            self.confirmed = self.waiting_end;
            self.waiting_end = 0;
        }
    }

    /// The ping [`Keepalive::tick`] asked for was queued, ending at `end` in the stream of
    /// bytes written to the client (`None`: there was no room for it; another is tried later).
    pub(crate) fn pinged(&mut self, end: Option<u64>, now: Instant) {
        self.pinged_at = now;
        self.waiting_end = end.unwrap_or(0);
    }

    /// What to do at `now`, `written` bytes having been written to the client in all.
    pub(crate) fn tick(&mut self, t: Timing, now: Instant, written: u64) -> Verdict {
        let silent = now.saturating_duration_since(self.last_heard);
        let since_ping = now.saturating_duration_since(self.pinged_at);
        if self.waiting_end > 0 {
            if silent >= t.idle_timeout && since_ping >= t.answer_time() {
                return Verdict::Idle;
            }
            if since_ping >= t.idle_timeout {
                return Verdict::NotReading;
            }
            let idle_at = (self.last_heard + t.idle_timeout).max(self.pinged_at + t.answer_time());
            return Verdict::Wait(idle_at.min(self.pinged_at + t.idle_timeout));
        }
        let mut due = self.last_heard + t.ping_interval;
        if written > self.confirmed {
            // Written to since it last showed it reads: probed once per interval.
            due = due.min(self.pinged_at + t.ping_interval);
        }
        // Never sooner after the last ping (or attempt) than this.
        due = due.max(self.pinged_at + t.answer_time().min(t.ping_interval));
        if due <= now {
            self.last_id += 1;
            return Verdict::Ping(self.last_id);
        }
        Verdict::Wait(due)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PING: Duration = Duration::from_secs(30);
    const IDLE: Duration = Duration::from_secs(60);
    const T: Timing = Timing { ping_interval: PING, idle_timeout: IDLE };

    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    #[test]
    fn it_stays_small() {
        assert!(std::mem::size_of::<Keepalive>() <= 56);
    }

    #[test]
    fn a_silent_client_is_pinged_then_dropped_only_after_time_to_answer() {
        let t0 = Instant::now();
        let mut k = Keepalive::new(t0);
        assert_eq!(k.tick(T, t0 + secs(10), 0), Verdict::Wait(t0 + PING));
        assert_eq!(k.tick(T, t0 + PING, 0), Verdict::Ping(1));
        k.pinged(Some(100), t0 + PING);
        assert_eq!(k.tick(T, t0 + secs(59), 0), Verdict::Wait(t0 + IDLE));
        assert_eq!(k.tick(T, t0 + IDLE, 0), Verdict::Idle);
    }

    #[test]
    fn a_session_held_long_is_pinged_first_not_dropped() {
        // Nothing heard for three idle timeouts (the server held the session): a ping, and
        // the time to answer it.
        let t0 = Instant::now();
        let mut k = Keepalive::new(t0);
        let late = t0 + secs(180);
        assert_eq!(k.tick(T, late, 0), Verdict::Ping(1));
        k.pinged(Some(10), late);
        assert_eq!(k.tick(T, late + secs(1), 0), Verdict::Wait(late + IDLE - PING));
        k.pong(1);
        k.heard(late + secs(2));
        assert_eq!(k.tick(T, late + secs(3), 10), Verdict::Wait(late + secs(2) + PING));
    }

    #[test]
    fn a_client_that_sends_but_never_reads_is_found_out() {
        let t0 = Instant::now();
        let mut k = Keepalive::new(t0);
        // Written to, and sending all the time: pinged after the interval anyway.
        k.heard(t0 + secs(29));
        assert_eq!(k.tick(T, t0 + PING, 5_000), Verdict::Ping(1));
        k.pinged(Some(5_100), t0 + PING);
        // It keeps sending (frames, even pongs with other ids), never this ping's answer.
        for s in (31..90).step_by(5) {
            k.heard(t0 + secs(s));
            k.pong(7);
            assert!(matches!(k.tick(T, t0 + secs(s), 9_000), Verdict::Wait(_)), "at {s} s");
        }
        assert_eq!(k.tick(T, t0 + PING + IDLE, 9_000), Verdict::NotReading);
    }

    #[test]
    fn a_client_that_reads_is_probed_once_per_interval_and_kept() {
        let t0 = Instant::now();
        let mut k = Keepalive::new(t0);
        let mut now = t0;
        for round in 1..=5u64 {
            // Written to and sending: probed one interval after the last probe.
            now += PING;
            k.heard(now);
            assert_eq!(k.tick(T, now - secs(1), round * 1000), Verdict::Wait(now));
            assert_eq!(k.tick(T, now, round * 1000), Verdict::Ping(round));
            k.pinged(Some(round * 1000 + 10), now);
            k.pong(round);
            // Nothing written since the ping was answered: no new one before it is silent.
            assert_eq!(k.tick(T, now + secs(2), round * 1000 + 10), Verdict::Wait(now + PING));
        }
    }

    #[test]
    fn a_ping_without_room_is_tried_again_later() {
        let t0 = Instant::now();
        let mut k = Keepalive::new(t0);
        assert_eq!(k.tick(T, t0 + PING, 0), Verdict::Ping(1));
        k.pinged(None, t0 + PING);
        assert_eq!(k.tick(T, t0 + secs(31), 0), Verdict::Wait(t0 + PING + PING));
        assert_eq!(k.tick(T, t0 + secs(60), 0), Verdict::Ping(2));
    }
}
