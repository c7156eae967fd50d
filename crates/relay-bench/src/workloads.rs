//! The workloads: flows of messages between pairs or many-to-one (`pairs`, `fan-in`), paced
//! one-way latency (`latency`), and many idle clients (`connections`).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::sync::oneshot;
use tokio::task::JoinSet;

use crate::payload::{HEADER_LEN, Header, nanos_since};
use crate::progress::{Progress, human};
use crate::target::{Receiver, Target, receiver_name};

/// A name prefix unique to this process and run, so runs never collide on one server.
fn run_id(workload: &str) -> String {
    static RUNS: AtomicU64 = AtomicU64::new(0);
    format!("{workload}{}x{}", std::process::id(), RUNS.fetch_add(1, Ordering::Relaxed))
}

fn join_error(e: tokio::task::JoinError) -> String {
    format!("a benchmark task failed: {e}")
}

/// Connects `count` receivers, a few at a time.
async fn connect_receivers(
    target: &Target,
    run: &str,
    count: usize,
    progress: Option<&Progress>,
    keys: bool,
) -> Result<Vec<Receiver>, String> {
    Ok(connect_timed(target, run, count, progress, keys, IN_FLIGHT).await?.0)
}

/// Connects in flight at once: enough to hide round trips, few enough not to overflow the
/// server's accept backlog.
const IN_FLIGHT: usize = 64;

/// [`connect_receivers`], with how long each took to connect and register.
async fn connect_timed(
    target: &Target,
    run: &str,
    count: usize,
    progress: Option<&Progress>,
    keys: bool,
    in_flight: usize,
) -> Result<(Vec<Receiver>, Vec<Duration>), String> {
    let mut receivers: Vec<Option<Receiver>> = (0..count).map(|_| None).collect();
    let mut took = Vec::with_capacity(count);
    let mut tasks = JoinSet::new();
    let mut finished = |done: Result<(usize, Result<Receiver, String>, Duration), _>| {
        let (i, receiver, elapsed) = done.map_err(join_error)?;
        receivers[i] = Some(receiver?);
        took.push(elapsed);
        if let Some(progress) = progress {
            progress.add(1);
        }
        Ok::<_, String>(())
    };
    for index in 0..count {
        if tasks.len() >= in_flight.max(1)
            && let Some(done) = tasks.join_next().await
        {
            finished(done)?;
        }
        let (target, run) = (target.clone(), run.to_string());
        tasks.spawn(async move {
            let start = Instant::now();
            let receiver = target.receiver(&run, index, keys).await;
            (index, receiver, start.elapsed())
        });
    }
    while let Some(done) = tasks.join_next().await {
        finished(done)?;
    }
    Ok((receivers.into_iter().flatten().collect(), took))
}

/// A report: its heading line, then one indented `name  value` line per row.
fn table(heading: String, rows: impl IntoIterator<Item = (&'static str, String)>) -> String {
    let mut out = heading;
    out.push('\n');
    for (name, value) in rows {
        out.push_str(&format!("  {name:<14}{value}\n"));
    }
    out
}

/// Settings for `pairs` and `fan-in`.
#[derive(Clone, Debug)]
pub struct FlowOptions {
    /// Sending clients.
    pub senders: usize,
    /// Receiving clients; sender `i` sends to receiver `i % receivers`.
    pub receivers: usize,
    /// Messages in all, split evenly between senders.
    pub messages: u64,
    /// Payload bytes per message (at least the 20-byte header).
    pub size: usize,
    /// A receiver that hears nothing for this long gives up and counts the rest as lost.
    pub stall: Duration,
    /// Relay only: every client registers with a new key, so receivers acknowledge what they
    /// take and senders get delivery receipts.
    pub keys: bool,
    /// Relay only: receivers take messages one event at a time (`Events::next`), not in place
    /// (`Events::drain`).
    pub one_at_a_time: bool,
}

impl FlowOptions {
    /// A flow of `messages` of `size` bytes from `senders` to `receivers`, guests taking
    /// messages in place (set `keys` or `one_at_a_time` on the result for the other kinds).
    pub fn new(
        senders: usize,
        receivers: usize,
        messages: u64,
        size: usize,
        stall: Duration,
    ) -> FlowOptions {
        FlowOptions { senders, receivers, messages, size, stall, keys: false, one_at_a_time: false }
    }
}

/// What a flow run measured.
#[derive(Clone, Debug, Serialize)]
pub struct FlowReport {
    /// `pairs` or `fan-in`.
    pub workload: String,
    /// `relay` or `nats`.
    pub target: String,
    /// Sending clients.
    pub senders: usize,
    /// Receiving clients.
    pub receivers: usize,
    /// Payload bytes per message.
    pub size: usize,
    /// Messages sent.
    pub sent: u64,
    /// Messages received.
    pub delivered: u64,
    /// Messages sent and never received.
    pub lost: u64,
    /// Messages that arrived after a later one from the same sender.
    pub out_of_order: u64,
    /// Messages the server reported as not delivered (relay only).
    pub refused: u64,
    /// From the first send to the last delivery.
    pub seconds: f64,
    /// Delivered messages per second.
    pub msgs_per_sec: f64,
    /// Delivered payload megabytes (10^6) per second.
    pub mb_per_sec: f64,
}

struct Received {
    count: u64,
    out_of_order: u64,
    last: Instant,
}

/// Runs a flow: every sender sends its share of the messages as fast as the connection takes
/// them, and receivers check each sender's sequence.
pub async fn flow(
    target: &Target,
    senders_at: &Target,
    workload: &str,
    options: &FlowOptions,
) -> Result<FlowReport, String> {
    let FlowOptions {
        senders,
        receivers: receiver_count,
        messages,
        size,
        stall,
        keys,
        one_at_a_time,
    } = *options;
    if senders == 0 || receiver_count == 0 {
        return Err("need at least one sender and one receiver".into());
    }
    if size < HEADER_LEN {
        return Err(format!("--size must be at least {HEADER_LEN} (the benchmark header)"));
    }
    let run = run_id(workload);
    let share =
        |i: usize| messages / senders as u64 + u64::from((i as u64) < messages % senders as u64);
    let mut expected = vec![0u64; receiver_count];
    for i in 0..senders {
        expected[i % receiver_count] += share(i);
    }
    let receivers = connect_receivers(target, &run, receiver_count, None, keys).await?;
    let refused = Arc::new(AtomicU64::new(0));
    let mut sender_conns = Vec::with_capacity(senders);
    for i in 0..senders {
        sender_conns.push(senders_at.sender(&run, i, refused.clone(), keys).await?);
    }

    let progress = Progress::new();
    let display = progress.display(format!("{workload} on {}", target.kind()), messages, "msgs");
    let mut receiving = JoinSet::new();
    for (index, mut receiver) in receivers.into_iter().enumerate() {
        let (expected, progress) = (expected[index], progress.clone());
        receiving.spawn(async move {
            let mut next_seq = vec![0u64; senders];
            let mut got = Received { count: 0, out_of_order: 0, last: Instant::now() };
            let mut unreported = 0;
            while got.count < expected {
                // Everything that has arrived, checked one message at a time.
                let (count, out_of_order) = (&mut got.count, &mut got.out_of_order);
                let handed = receiver.drain_within(stall, one_at_a_time, |payload| {
                    *count += 1;
                    if let Some(h) = Header::read(payload)
                        && let Some(next) = next_seq.get_mut(h.sender as usize)
                    {
                        if h.seq < *next {
                            *out_of_order += 1;
                        }
                        *next = (*next).max(h.seq + 1);
                    }
                });
                match handed.await {
                    Ok(0) => {
                        // Stalled: the rest is lost, and the run ended when the last one came.
                        got.last = Instant::now() - stall;
                        return (got, receiver);
                    }
                    Ok(handed) => {
                        unreported += handed as u64;
                        if unreported >= 1024 {
                            progress.add(unreported);
                            unreported = 0;
                        }
                    }
                    Err(_) => break,
                }
            }
            got.last = Instant::now();
            (got, receiver)
        });
    }

    let origin = Instant::now();
    let mut sending = JoinSet::new();
    for (index, mut sender) in sender_conns.into_iter().enumerate() {
        let to = receiver_name(&run, index % receiver_count);
        let count = share(index);
        sending.spawn(async move {
            let mut payload = vec![b'x'; size];
            for seq in 0..count {
                // A flow checks order, not latency: no clock read per message.
                Header { sender: index as u32, seq, sent_ns: 0 }.write(&mut payload);
                sender.send(&to, &payload).await?;
            }
            sender.flush().await?;
            Ok::<_, String>(sender)
        });
    }

    let mut delivered = 0;
    let mut out_of_order = 0;
    let mut last = origin;
    let mut keep = Vec::new();
    while let Some(done) = receiving.join_next().await {
        let (got, receiver) = done.map_err(join_error)?;
        delivered += got.count;
        out_of_order += got.out_of_order;
        last = last.max(got.last);
        keep.push(receiver);
    }
    drop(display);
    let seconds = last.duration_since(origin).as_secs_f64().max(1e-9);
    let mut send_errors = Vec::new();
    while let Some(done) = sending.join_next().await {
        match done.map_err(join_error)? {
            Ok(sender) => {
                let _ = sender.close().await;
            }
            Err(e) => send_errors.push(e),
        }
    }
    if let Some(e) = send_errors.first() {
        eprintln!("{} sender(s) failed; first: {e}", send_errors.len());
    }
    drop(keep);
    Ok(FlowReport {
        workload: workload.to_string(),
        target: target.kind().to_string(),
        senders,
        receivers: receiver_count,
        size,
        sent: messages,
        delivered,
        lost: messages - delivered.min(messages),
        out_of_order,
        refused: refused.load(Ordering::Relaxed),
        seconds,
        msgs_per_sec: delivered as f64 / seconds,
        mb_per_sec: (delivered * size as u64) as f64 / seconds / 1e6,
    })
}

impl FlowReport {
    /// A readable table.
    pub fn table(&self) -> String {
        let heading = format!(
            "{} on {}: {} sender(s) -> {} receiver(s), {} B payloads",
            self.workload, self.target, self.senders, self.receivers, self.size
        );
        table(
            heading,
            [
                ("delivered", format!("{} of {}", self.delivered, self.sent)),
                ("msgs/s", human(self.msgs_per_sec)),
                ("MB/s", format!("{:.1}", self.mb_per_sec)),
                ("lost", self.lost.to_string()),
                ("out of order", self.out_of_order.to_string()),
                ("refused", self.refused.to_string()),
                ("time", format!("{:.2} s", self.seconds)),
            ],
        )
    }
}

/// Settings for `latency`.
#[derive(Clone, Debug)]
pub struct LatencyOptions {
    /// Sender/receiver pairs.
    pub pairs: usize,
    /// Messages per second, all pairs together.
    pub rate: u64,
    /// How long to send.
    pub duration: Duration,
    /// Payload bytes per message.
    pub size: usize,
    /// A receiver that hears nothing for this long gives up.
    pub stall: Duration,
}

/// What a latency run measured. Times are one-way, send call to receipt, in microseconds.
#[derive(Clone, Debug, Serialize)]
pub struct LatencyReport {
    /// `relay` or `nats`.
    pub target: String,
    /// Sender/receiver pairs.
    pub pairs: usize,
    /// Messages per second asked for.
    pub rate: u64,
    /// Messages per second actually sent.
    pub achieved_rate: f64,
    /// Payload bytes per message.
    pub size: usize,
    /// Messages sent.
    pub sent: u64,
    /// Messages sent and never received.
    pub lost: u64,
    /// Messages measured (those sent after the first second of warm-up).
    pub measured: u64,
    /// Median.
    pub p50_us: f64,
    /// 99th percentile.
    pub p99_us: f64,
    /// 99.9th percentile.
    pub p999_us: f64,
    /// Slowest.
    pub max_us: f64,
}

/// Messages sent in the first moments are not measured: connections and caches warm up.
const WARM_UP: Duration = Duration::from_secs(1);

/// Runs `latency`: each pair sends its share of `rate`, spread over millisecond ticks (and the
/// pairs' ticks spread over the millisecond), and each receiver records how long every message
/// took.
pub async fn latency(
    target: &Target,
    senders_at: &Target,
    options: &LatencyOptions,
) -> Result<LatencyReport, String> {
    let LatencyOptions { pairs, rate, duration, size, stall } = *options;
    if pairs == 0 || rate == 0 {
        return Err("need at least one pair and a rate above zero".into());
    }
    if size < HEADER_LEN {
        return Err(format!("--size must be at least {HEADER_LEN} (the benchmark header)"));
    }
    let run = run_id("latency");
    let receivers = connect_receivers(target, &run, pairs, None, false).await?;
    let refused = Arc::new(AtomicU64::new(0));
    let mut senders = Vec::with_capacity(pairs);
    for i in 0..pairs {
        senders.push(senders_at.sender(&run, i, refused.clone(), false).await?);
    }
    let warm_up_ns = if duration > 2 * WARM_UP { WARM_UP.as_nanos() as u64 } else { 0 };
    let progress = Progress::new();
    let total = (rate as f64 * duration.as_secs_f64()) as u64;
    let display = progress.display(format!("latency on {}", target.kind()), total, "msgs");

    let origin = Instant::now();
    let mut receiving = JoinSet::new();
    let mut sending = JoinSet::new();
    for (index, (mut receiver, mut sender)) in receivers.into_iter().zip(senders).enumerate() {
        let (sent_tx, mut sent_rx) = oneshot::channel::<u64>();
        let progress = progress.clone();
        receiving.spawn(async move {
            let mut histogram = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3)
                .map_err(|e| e.to_string())?;
            let mut count = 0u64;
            let mut sent = None;
            loop {
                if sent.is_some_and(|sent| count >= sent) {
                    break;
                }
                tokio::select! {
                    total = &mut sent_rx, if sent.is_none() => sent = Some(total.unwrap_or(0)),
                    payload = receiver.next_within(stall) => {
                        let Ok(Some(payload)) = payload else { break };
                        let now = nanos_since(origin);
                        count += 1;
                        progress.add(1);
                        if let Some(h) = Header::read(&payload)
                            && h.sent_ns >= warm_up_ns
                        {
                            histogram.saturating_record(now.saturating_sub(h.sent_ns).max(1));
                        }
                    }
                }
            }
            Ok::<_, String>((count, histogram, receiver))
        });
        let to = receiver_name(&run, index);
        let per_pair = rate as f64 / pairs as f64;
        let offset = Duration::from_micros(1000 * index as u64 / pairs as u64);
        sending.spawn(async move {
            let start = origin + offset;
            let mut ticks = tokio::time::interval_at(start.into(), Duration::from_millis(1));
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            let mut sent = 0u64;
            let mut payload = vec![b'x'; size];
            loop {
                ticks.tick().await;
                let elapsed = start.elapsed();
                let due = ((elapsed.as_secs_f64() * per_pair) as u64)
                    .min((duration.as_secs_f64() * per_pair) as u64);
                while sent < due {
                    let header =
                        Header { sender: index as u32, seq: sent, sent_ns: nanos_since(origin) };
                    header.write(&mut payload);
                    sender.send(&to, &payload).await?;
                    sent += 1;
                }
                sender.flush().await?;
                if elapsed >= duration {
                    break;
                }
            }
            let _ = sent_tx.send(sent);
            Ok::<_, String>((sent, sender))
        });
    }
    let mut sent = 0;
    let mut closing = Vec::new();
    while let Some(done) = sending.join_next().await {
        let (count, sender) = done.map_err(join_error)??;
        sent += count;
        closing.push(sender);
    }
    let send_secs = origin.elapsed().as_secs_f64();
    let mut histogram =
        Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3).map_err(|e| e.to_string())?;
    let mut received = 0;
    let mut keep = Vec::new();
    while let Some(done) = receiving.join_next().await {
        let (count, part, receiver) = done.map_err(join_error)??;
        received += count;
        histogram.add(part).map_err(|e| e.to_string())?;
        keep.push(receiver);
    }
    drop(display);
    for sender in closing {
        let _ = sender.close().await;
    }
    drop(keep);
    let us = |ns: u64| ns as f64 / 1000.0;
    Ok(LatencyReport {
        target: target.kind().to_string(),
        pairs,
        rate,
        achieved_rate: sent as f64 / send_secs,
        size,
        sent,
        lost: sent - received.min(sent),
        measured: histogram.len(),
        p50_us: us(histogram.value_at_quantile(0.5)),
        p99_us: us(histogram.value_at_quantile(0.99)),
        p999_us: us(histogram.value_at_quantile(0.999)),
        max_us: us(histogram.max()),
    })
}

impl LatencyReport {
    /// A readable table.
    pub fn table(&self) -> String {
        let heading = format!(
            "latency on {}: {} pair(s), {} msgs/s asked, {} B payloads",
            self.target, self.pairs, self.rate, self.size
        );
        table(
            heading,
            [
                ("sent", format!("{} ({}/s)", self.sent, human(self.achieved_rate))),
                ("lost", self.lost.to_string()),
                ("measured", self.measured.to_string()),
                ("p50", format!("{:.0} us", self.p50_us)),
                ("p99", format!("{:.0} us", self.p99_us)),
                ("p99.9", format!("{:.0} us", self.p999_us)),
                ("max", format!("{:.0} us", self.max_us)),
            ],
        )
    }
}

/// Settings for `connections`.
#[derive(Clone, Debug)]
pub struct ConnectionsOptions {
    /// Idle registered clients to open.
    pub clients: usize,
    /// The server's process id, to read its memory from `/proc` (Linux).
    pub server_pid: Option<u32>,
    /// Relay only: each client registers with a new Ed25519 key (a signature per login, and
    /// a first claim the server binds and stores), instead of as a guest.
    pub keys: bool,
    /// Registrations in flight at once.
    pub in_flight: usize,
}

/// What a connections run measured.
#[derive(Clone, Debug, Serialize)]
pub struct ConnectionsReport {
    /// `relay` or `nats`.
    pub target: String,
    /// Clients connected and registered.
    pub clients: usize,
    /// Whether they registered with keys.
    pub keys: bool,
    /// Time to connect and register them all.
    pub seconds: f64,
    /// Server RSS before, in KiB (with `--server-pid`).
    pub rss_before_kib: Option<u64>,
    /// Server RSS with every client connected, in KiB.
    pub rss_after_kib: Option<u64>,
    /// Server RSS per client, in KiB.
    pub kib_per_client: Option<f64>,
    /// Registrations that were in flight at once.
    pub in_flight: usize,
    /// Time to connect and register one client, median, in ms.
    pub register_p50_ms: f64,
    /// The same, 99th percentile.
    pub register_p99_ms: f64,
}

/// Resident memory of process `pid` in KiB, from `/proc/PID/status`.
pub fn rss_kib(pid: u32) -> Result<u64, String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|e| format!("cannot read the memory of process {pid}: {e}"))?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| format!("no VmRSS for process {pid}"))
}

/// CPU time process `pid` has used so far (all threads, user and system), in seconds, from
/// `/proc/PID/stat`.
pub fn cpu_seconds(pid: u32) -> Result<f64, String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map_err(|e| format!("cannot read the CPU time of process {pid}: {e}"))?;
    parse_cpu_seconds(&stat).ok_or_else(|| format!("no CPU time for process {pid}"))
}

/// `utime + stime` from a `/proc/PID/stat` line. They are in clock ticks of `USER_HZ`, which
/// Linux fixes at 100 per second for everything it reports in `/proc`.
fn parse_cpu_seconds(stat: &str) -> Option<f64> {
    // The command name (field 2) is in parentheses and may hold spaces; count from after it.
    let (_, rest) = stat.rsplit_once(')')?;
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some((utime + stime) as f64 / 100.0)
}

/// Runs `connections`: opens idle registered clients (relay) or subscribed connections (NATS)
/// and measures the time and, given its pid, the server's memory.
pub async fn connections(
    target: &Target,
    options: &ConnectionsOptions,
) -> Result<ConnectionsReport, String> {
    let ConnectionsOptions { clients, server_pid, keys, in_flight } = *options;
    let before = server_pid.map(rss_kib).transpose()?;
    let progress = Progress::new();
    let display =
        progress.display(format!("connections on {}", target.kind()), clients as u64, "clients");
    let start = Instant::now();
    let run = run_id("idle");
    let (held, mut took) =
        connect_timed(target, &run, clients, Some(&progress), keys, in_flight).await?;
    took.sort_unstable();
    let at = |q: f64| {
        let i = ((took.len() as f64 * q).ceil() as usize).saturating_sub(1);
        took.get(i).map_or(0.0, |d| d.as_secs_f64() * 1000.0)
    };
    let (register_p50_ms, register_p99_ms) = (at(0.50), at(0.99));
    let seconds = start.elapsed().as_secs_f64();
    drop(display);
    // Let the server finish any work the last registrations started before reading its memory.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = server_pid.map(rss_kib).transpose()?;
    drop(held);
    let kib_per_client = match (before, after) {
        (Some(b), Some(a)) if clients > 0 => Some(a.saturating_sub(b) as f64 / clients as f64),
        _ => None,
    };
    Ok(ConnectionsReport {
        target: target.kind().to_string(),
        clients,
        keys,
        seconds,
        rss_before_kib: before,
        rss_after_kib: after,
        kib_per_client,
        in_flight,
        register_p50_ms,
        register_p99_ms,
    })
}

impl ConnectionsReport {
    /// A readable table.
    pub fn table(&self) -> String {
        let with = if self.keys { " with new keys" } else { "" };
        let heading =
            format!("connections on {}: {} idle clients{with}", self.target, self.clients);
        let rate = human(self.clients as f64 / self.seconds.max(1e-9));
        let mut rows = vec![
            ("connect all", format!("{:.2} s ({rate}/s)", self.seconds)),
            (
                "register p50",
                format!(
                    "{:.2} ms (p99 {:.2} ms; {} in flight)",
                    self.register_p50_ms, self.register_p99_ms, self.in_flight
                ),
            ),
        ];
        if let (Some(b), Some(a), Some(per)) =
            (self.rss_before_kib, self.rss_after_kib, self.kib_per_client)
        {
            rows.push(("server RSS", format!("{b} -> {a} KiB")));
            rows.push(("per client", format!("{per:.2} KiB")));
        }
        table(heading, rows)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_time_is_read_after_the_command_name() {
        let stat = "42 (tokio rt) S 1 42 42 0 -1 4194560 100 0 0 0 250 75 0 0 20 0 3 0 1";
        assert_eq!(parse_cpu_seconds(stat), Some(3.25));
        assert_eq!(parse_cpu_seconds("42 (x) S 1"), None);
    }
}
