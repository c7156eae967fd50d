//! The `store` workload (relay only): S senders send N messages to R recipients who are
//! offline (names bound to keys), each message acknowledged as stored (`Stored`, sent once it
//! is synced to disk), with up to a window of unacknowledged messages per sender; then the
//! recipients log in and drain their inboxes. Reports the store rate, the store-ack latency,
//! the drain rate, and what was lost, duplicated or out of order.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use relay_client::{Client, ClientConfig, Event, Identity};
use serde::Serialize;
use tokio::task::JoinSet;

use crate::payload::{HEADER_LEN, Header, nanos_since};
use crate::target::Target;

/// Settings for `store`.
#[derive(Clone, Debug)]
pub struct StoreOptions {
    /// Sending clients.
    pub senders: usize,
    /// Offline recipients; sender `i`'s k-th message goes to recipient `(i + k) % recipients`.
    pub recipients: usize,
    /// Messages in all, split evenly between senders.
    pub messages: u64,
    /// Payload bytes per message (at least the 20-byte header).
    pub size: usize,
    /// Messages a sender may have sent and not yet heard `Stored` for.
    pub window: usize,
    /// Messages per second, all senders together (0: as fast as the server stores).
    pub rate: u64,
    /// A recipient that hears nothing for this long gives up and counts the rest as lost.
    pub stall: Duration,
}

/// What a store run measured.
#[derive(Clone, Debug, Serialize)]
pub struct StoreReport {
    /// Sending clients.
    pub senders: usize,
    /// Offline recipients.
    pub recipients: usize,
    /// Payload bytes per message.
    pub size: usize,
    /// Window of unacknowledged messages per sender.
    pub window: usize,
    /// Messages per second asked for (0: unpaced).
    pub rate: u64,
    /// Messages sent.
    pub sent: u64,
    /// Messages the server said it stored.
    pub stored: u64,
    /// Messages it refused (`InboxFull`, `NotDelivered`, `NotFound`).
    pub refused: u64,
    /// Stored messages per second, first send to last `Stored`.
    pub store_msgs_per_sec: f64,
    /// Median time from send to `Stored`, in microseconds.
    pub ack_p50_us: f64,
    /// 99th percentile.
    pub ack_p99_us: f64,
    /// Slowest.
    pub ack_max_us: f64,
    /// Messages the recipients got.
    pub delivered: u64,
    /// Delivered messages per second, first login to last message.
    pub drain_msgs_per_sec: f64,
    /// Stored messages never delivered.
    pub lost: u64,
    /// Messages delivered more than once.
    pub duplicated: u64,
    /// Messages that arrived after a later one from the same sender.
    pub out_of_order: u64,
}

/// Runs `store` on a relay-server.
pub async fn store(target: &Target, options: &StoreOptions) -> Result<StoreReport, String> {
    let Target::Relay(addr) = target else {
        return Err("store runs on relay only (its anchors are measured separately)".into());
    };
    let StoreOptions { senders, recipients, messages, size, window, rate, stall } = *options;
    if senders == 0 || recipients == 0 || window == 0 {
        return Err("need at least one sender, one recipient and a window of one".into());
    }
    if size < HEADER_LEN {
        return Err(format!("--size must be at least {HEADER_LEN} (the benchmark header)"));
    }
    let clock = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let run = format!("st{}x{}", std::process::id(), clock % 1_000_000_000);
    let name = |j: usize| format!("{run}.r{j}");
    // Bind every recipient to a key, and take it offline.
    let mut keys = Vec::new();
    for j in 0..recipients {
        let key = Identity::generate().map_err(|e| e.to_string())?;
        let config = ClientConfig { identity: Some(key.clone()), ..ClientConfig::default() };
        let (client, _events) =
            Client::connect_with(addr, &name(j), config).await.map_err(|e| e.to_string())?;
        client.offline().await.map_err(|e| e.to_string())?;
        keys.push(key);
    }
    // The server frees a name once the session has ended: wait until none is listed.
    let (watcher, mut watch_events) =
        Client::connect(addr, &format!("{run}.w")).await.map_err(|e| e.to_string())?;
    loop {
        watcher.list_users().await.map_err(|e| e.to_string())?;
        let listed = loop {
            match watch_events.next().await {
                Some(Event::Users { users, .. }) => break users,
                Some(_) => {}
                None => return Err("the server closed the connection".into()),
            }
        };
        if !listed.iter().any(|u| u.name.starts_with(&format!("{run}.r"))) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    let origin = Instant::now();
    let per_sender = messages / senders as u64;
    let mut sending = JoinSet::new();
    let mut connected = Vec::new();
    for i in 0..senders {
        let (client, events) =
            Client::connect(addr, &format!("{run}.s{i}")).await.map_err(|e| e.to_string())?;
        connected.push((client, events));
    }
    let start = Instant::now();
    for (i, (client, mut events)) in connected.into_iter().enumerate() {
        let names: Vec<String> = (0..recipients).map(name).collect();
        let per_sender_rate = rate as f64 / senders as f64;
        sending.spawn(async move {
            let mut histogram = Histogram::<u64>::new_with_bounds(1, 600_000_000_000, 3)
                .map_err(|e| e.to_string())?;
            let mut waiting: HashMap<u64, (u64, usize)> = HashMap::with_capacity(window);
            let mut per_recipient = vec![0u64; names.len()];
            let (mut sent, mut stored, mut refused) = (0u64, 0u64, 0u64);
            let mut buf = vec![b'x'; size];
            let mut last = start;
            while stored + refused < per_sender {
                while waiting.len() < window && sent < per_sender {
                    if per_sender_rate > 0.0 {
                        let due = start + Duration::from_secs_f64(sent as f64 / per_sender_rate);
                        if due > Instant::now() {
                            if !waiting.is_empty() {
                                break;
                            }
                            tokio::time::sleep_until(due.into()).await;
                        }
                    }
                    let now = nanos_since(origin);
                    Header { sender: i as u32, seq: sent, sent_ns: now }.write(&mut buf);
                    let j = (i + sent as usize) % names.len();
                    let id = client.send(&names[j], &buf[..]).await.map_err(|e| e.to_string())?;
                    waiting.insert(id, (now, j));
                    sent += 1;
                }
                let event = if per_sender_rate > 0.0 && sent < per_sender && !waiting.is_empty() {
                    let due = start + Duration::from_secs_f64(sent as f64 / per_sender_rate);
                    match tokio::time::timeout_at(due.into(), events.next()).await {
                        Ok(event) => event,
                        Err(_) => continue,
                    }
                } else {
                    events.next().await
                };
                match event {
                    Some(Event::Stored { id, .. }) => {
                        if let Some((at, j)) = waiting.remove(&id) {
                            stored += 1;
                            per_recipient[j] += 1;
                            let _ = histogram.record(nanos_since(origin).saturating_sub(at).max(1));
                            last = Instant::now();
                        }
                    }
                    Some(Event::Rejected { id, .. } | Event::NotFound { id, .. }) => {
                        if waiting.remove(&id).is_some() {
                            refused += 1;
                        }
                    }
                    Some(_) => {}
                    None => return Err("a sender's connection ended".to_string()),
                }
            }
            Ok::<_, String>((sent, stored, refused, histogram, last, per_recipient, client, events))
        });
    }
    let mut histogram =
        Histogram::<u64>::new_with_bounds(1, 600_000_000_000, 3).map_err(|e| e.to_string())?;
    let (mut sent, mut stored, mut refused) = (0, 0, 0);
    let mut last = start;
    let mut keep = Vec::new();
    let mut expected_by = vec![0u64; recipients];
    while let Some(done) = sending.join_next().await {
        let (s, st, r, h, l, per, client, events) = done.map_err(|e| e.to_string())??;
        for (j, n) in per.into_iter().enumerate() {
            expected_by[j] += n;
        }
        sent += s;
        stored += st;
        refused += r;
        histogram.add(h).map_err(|e| e.to_string())?;
        last = last.max(l);
        // Senders stay online: their receipts are sent live while the recipients drain.
        keep.push((client, events));
    }
    let store_secs = last.duration_since(start).as_secs_f64().max(1e-9);

    // The recipients log in, all at once, and drain.
    let drain_start = Instant::now();
    let mut draining = JoinSet::new();
    let expected = stored;
    for (j, key) in keys.into_iter().enumerate() {
        let (addr, name, expect) = (addr.clone(), name(j), expected_by[j]);
        draining.spawn(async move {
            let config = ClientConfig { identity: Some(key), ..ClientConfig::default() };
            let (_client, mut events) =
                Client::connect_with(&addr, &name, config).await.map_err(|e| e.to_string())?;
            let mut highest: HashMap<u32, u64> = HashMap::new();
            let mut seen = std::collections::HashSet::new();
            let (mut got, mut duplicated, mut out_of_order) = (0u64, 0u64, 0u64);
            let mut last = Instant::now();
            // Until everything its senders were told was stored has come; a stall ends it
            // early, and what did not come counts as lost.
            while got - duplicated < expect {
                let event = match tokio::time::timeout(stall, events.next()).await {
                    Ok(Some(event)) => event,
                    Ok(None) | Err(_) => break,
                };
                let Event::Message { content, .. } = event else { continue };
                let Some(header) = Header::read(&content) else { continue };
                last = Instant::now();
                got += 1;
                if !seen.insert((header.sender, header.seq)) {
                    duplicated += 1;
                    continue;
                }
                // Messages refused along the way leave gaps; only going back is wrong.
                let top = highest.entry(header.sender).or_insert(header.seq);
                if header.seq < *top {
                    out_of_order += 1;
                }
                *top = (*top).max(header.seq);
            }
            Ok::<_, String>((got, duplicated, out_of_order, last))
        });
    }
    let (mut delivered, mut duplicated, mut out_of_order) = (0, 0, 0);
    let mut drain_last = drain_start;
    while let Some(done) = draining.join_next().await {
        let (g, d, o, l) = done.map_err(|e| e.to_string())??;
        delivered += g;
        duplicated += d;
        out_of_order += o;
        drain_last = drain_last.max(l);
    }
    drop(keep);
    let drain_secs = drain_last.duration_since(drain_start).as_secs_f64().max(1e-9);
    let us = |ns: u64| ns as f64 / 1000.0;
    Ok(StoreReport {
        senders,
        recipients,
        size,
        window,
        rate,
        sent,
        stored,
        refused,
        store_msgs_per_sec: stored as f64 / store_secs,
        ack_p50_us: us(histogram.value_at_quantile(0.5)),
        ack_p99_us: us(histogram.value_at_quantile(0.99)),
        ack_max_us: us(histogram.max()),
        delivered,
        drain_msgs_per_sec: delivered as f64 / drain_secs,
        lost: expected.saturating_sub(delivered - duplicated),
        duplicated,
        out_of_order,
    })
}

impl StoreReport {
    /// A readable table.
    pub fn table(&self) -> String {
        let mut out = format!(
            "store on relay: {} senders -> {} offline recipients, {} B payloads, window {}{}\n",
            self.senders,
            self.recipients,
            self.size,
            self.window,
            if self.rate > 0 { format!(", {} msgs/s asked", self.rate) } else { String::new() }
        );
        let rows = [
            ("sent", self.sent.to_string()),
            ("stored", self.stored.to_string()),
            ("refused", self.refused.to_string()),
            ("store rate", format!("{:.0} msgs/s", self.store_msgs_per_sec)),
            ("ack p50", format!("{:.0} us", self.ack_p50_us)),
            ("ack p99", format!("{:.0} us", self.ack_p99_us)),
            ("ack max", format!("{:.0} us", self.ack_max_us)),
            ("delivered", self.delivered.to_string()),
            ("drain rate", format!("{:.0} msgs/s", self.drain_msgs_per_sec)),
            ("lost", self.lost.to_string()),
            ("duplicated", self.duplicated.to_string()),
            ("out of order", self.out_of_order.to_string()),
        ];
        for (name, value) in rows {
            out.push_str(&format!("  {name:<14}{value}\n"));
        }
        out
    }
}
