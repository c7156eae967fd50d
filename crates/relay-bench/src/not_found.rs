//! The `not-found` workload (relay only): C clients send, paced to a total rate, messages to
//! names nobody holds, and time each until its `NotFound` answer. On one server the answer
//! is a registry miss; in a cluster it comes from the node's view of who is online where
//! (no NATS round trip), which is what this measures.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use relay_client::{Client, Event};
use serde::Serialize;
use tokio::task::JoinSet;

use crate::target::Target;

/// Settings for `not-found`.
#[derive(Clone, Debug)]
pub struct NotFoundOptions {
    /// Sending clients.
    pub clients: usize,
    /// Messages per second, all clients together.
    pub rate: u64,
    /// How long to send.
    pub duration: Duration,
    /// A client that hears nothing for this long gives up and counts the rest as unanswered.
    pub stall: Duration,
}

/// What a not-found run measured.
#[derive(Clone, Debug, Serialize)]
pub struct NotFoundReport {
    /// Sending clients.
    pub clients: usize,
    /// Messages per second asked for.
    pub rate: u64,
    /// Messages sent.
    pub sent: u64,
    /// `NotFound` answers.
    pub answered: u64,
    /// Any other answer (a name that was not free after all).
    pub other: u64,
    /// Median time from send to `NotFound`, in microseconds (after a warm-up second).
    pub p50_us: f64,
    /// 99th percentile.
    pub p99_us: f64,
    /// 99.9th percentile.
    pub p999_us: f64,
    /// Slowest.
    pub max_us: f64,
}

/// Answers measured from this long after the start (connections and caches settle first).
const WARM_UP: Duration = Duration::from_secs(1);

/// One client's sends and answers, shared by its sending and listening tasks.
struct Timing {
    /// Sent and not yet answered: when each was sent.
    pending: HashMap<u64, Instant>,
    /// Answered before the sender noted the send: when each was answered.
    early: HashMap<u64, Instant>,
    histogram: Histogram<u64>,
    answered: u64,
    other: u64,
    /// The sender has sent everything.
    done: bool,
}

impl Timing {
    fn record(&mut self, sent: Instant, answered: Instant, origin: Instant, warm_up: Duration) {
        if sent.duration_since(origin) >= warm_up {
            let ns = u64::try_from(answered.saturating_duration_since(sent).as_nanos());
            self.histogram.saturating_record(ns.unwrap_or(u64::MAX).max(1));
        }
    }
}

fn lock(timing: &Mutex<Timing>) -> std::sync::MutexGuard<'_, Timing> {
    timing.lock().unwrap_or_else(|e| e.into_inner())
}

/// Runs `not-found` on a relay-server (or a node of a cluster).
pub async fn not_found(
    target: &Target,
    options: &NotFoundOptions,
) -> Result<NotFoundReport, String> {
    let Target::Relay(addr) = target else {
        return Err("not-found runs on relay only".into());
    };
    let NotFoundOptions { clients, rate, duration, stall } = *options;
    if clients == 0 || rate == 0 {
        return Err("need at least one client and a rate above zero".into());
    }
    let run = format!("nf{}", std::process::id());
    let origin = Instant::now();
    let warm_up = if duration > 2 * WARM_UP { WARM_UP } else { Duration::ZERO };
    let mut tasks = JoinSet::new();
    for index in 0..clients {
        let (client, mut events) =
            Client::connect(addr, &format!("{run}.q{index}")).await.map_err(|e| e.to_string())?;
        let per_client = rate as f64 / clients as f64;
        let to = format!("{run}.nobody{index}");
        tasks.spawn(async move {
            let shared = Arc::new(Mutex::new(Timing {
                pending: HashMap::new(),
                early: HashMap::new(),
                histogram: Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3)
                    .map_err(|e| e.to_string())?,
                answered: 0,
                other: 0,
                done: false,
            }));
            let listening = shared.clone();
            let listener = tokio::spawn(async move {
                while let Ok(Some(event)) = tokio::time::timeout(stall, events.next()).await {
                    let now = Instant::now();
                    let (id, not_found) = match event {
                        Event::NotFound { id, .. } => (id, true),
                        Event::Rejected { id, .. } | Event::Stored { id, .. } => (id, false),
                        _ => continue,
                    };
                    let mut timing = lock(&listening);
                    if not_found {
                        timing.answered += 1;
                    } else {
                        timing.other += 1;
                    }
                    match timing.pending.remove(&id) {
                        Some(sent) => timing.record(sent, now, origin, warm_up),
                        // Answered before its sender noted the send: it notes the answer.
                        None => drop(timing.early.insert(id, now)),
                    }
                    if timing.done && timing.pending.is_empty() {
                        break;
                    }
                }
            });
            let mut ticks = tokio::time::interval(Duration::from_millis(1));
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            let mut sent = 0u64;
            loop {
                ticks.tick().await;
                let elapsed = origin.elapsed();
                let due = ((elapsed.as_secs_f64() * per_client) as u64)
                    .min((duration.as_secs_f64() * per_client) as u64);
                while sent < due {
                    // The time is taken before the send, so the answer's wait includes it.
                    let at = Instant::now();
                    let id = client.send(&to, "?").await.map_err(|e| e.to_string())?;
                    let mut timing = lock(&shared);
                    match timing.early.remove(&id) {
                        Some(answered) => timing.record(at, answered, origin, warm_up),
                        None => drop(timing.pending.insert(id, at)),
                    }
                    sent += 1;
                }
                if elapsed >= duration {
                    break;
                }
            }
            {
                let mut timing = lock(&shared);
                timing.done = true;
                if timing.pending.is_empty() {
                    listener.abort();
                }
            }
            let _ = listener.await;
            drop(client);
            let timing = lock(&shared);
            Ok::<_, String>((sent, timing.histogram.clone(), timing.answered, timing.other))
        });
    }
    let mut histogram =
        Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3).map_err(|e| e.to_string())?;
    let mut report = NotFoundReport {
        clients,
        rate,
        sent: 0,
        answered: 0,
        other: 0,
        p50_us: 0.0,
        p99_us: 0.0,
        p999_us: 0.0,
        max_us: 0.0,
    };
    while let Some(done) = tasks.join_next().await {
        let (sent, part, answered, other) =
            done.map_err(|e| format!("a benchmark task failed: {e}"))??;
        report.sent += sent;
        report.answered += answered;
        report.other += other;
        histogram.add(part).map_err(|e| e.to_string())?;
    }
    let us = |q: f64| histogram.value_at_quantile(q) as f64 / 1000.0;
    report.p50_us = us(0.5);
    report.p99_us = us(0.99);
    report.p999_us = us(0.999);
    report.max_us = histogram.max() as f64 / 1000.0;
    Ok(report)
}

impl NotFoundReport {
    /// The report as a small table.
    pub fn table(&self) -> String {
        let mut out = format!(
            "not-found on relay: {} clients, {} msgs/s to names nobody holds\n",
            self.clients, self.rate
        );
        let rows = [
            ("sent", self.sent.to_string()),
            ("NotFound", self.answered.to_string()),
            ("other answer", self.other.to_string()),
            ("p50", format!("{:.0} us", self.p50_us)),
            ("p99", format!("{:.0} us", self.p99_us)),
            ("p99.9", format!("{:.0} us", self.p999_us)),
            ("max", format!("{:.0} us", self.max_us)),
        ];
        for (name, value) in rows {
            out.push_str(&format!("  {name:<14}{value}\n"));
        }
        out
    }
}
