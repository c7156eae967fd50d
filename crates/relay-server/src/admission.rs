//! Per-address admission, like ergo's connection limits: how many connections one address
//! (an IPv4 address, or an IPv6 /64, the block one host is usually given) may hold open, and
//! how fast it may open new ones. Loopback is exempt unless the operator says otherwise.
//!
//! Over a limit the connection is refused with `ServerFull` and a reason, and the refusal is
//! logged at most once per address every [`LOG_EVERY`], with the count since, so a flood from
//! one address costs one log line, not one per attempt.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

/// At most one refusal log line per address this often.
pub(crate) const LOG_EVERY: Duration = Duration::from_secs(10);

/// Entries for addresses with nothing open and a full bucket are forgotten on a sweep, run
/// at most once a second and only once the table holds this many.
const SWEEP_AFTER: usize = 1024;

/// The limits (from `Config`).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Limits {
    pub(crate) per_address: usize,
    pub(crate) new_per_sec: u32,
    pub(crate) loopback_exempt: bool,
}

/// One address's (or /64's) share.
#[derive(Debug)]
struct Entry {
    open: usize,
    /// New-connection tokens: up to `new_per_sec`, one more each `1 / new_per_sec`.
    tokens: f64,
    refilled: Instant,
    /// Refusals not yet logged, and when the last log line was written.
    unlogged: u64,
    logged: Option<Instant>,
}

#[derive(Debug, Default)]
struct Table {
    by_key: HashMap<IpAddr, Entry>,
    /// When the last sweep ran.
    swept: Option<Instant>,
}

/// Who holds how much; shared by the accept loop and the connections' guards.
#[derive(Debug)]
pub(crate) struct Admission {
    limits: Limits,
    table: Mutex<Table>,
}

/// Why a connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// The address holds its share of connections.
    TooMany,
    /// The address opened new connections faster than allowed.
    TooFast,
}

/// A refusal to log now (the first for its address in [`LOG_EVERY`]): how many there were
/// since the last line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct LogNow(pub(crate) u64);

/// A connection's place in its address's count; given back when dropped.
#[derive(Debug)]
pub(crate) struct Admitted {
    admission: Arc<Admission>,
    key: Option<IpAddr>,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        if let Some(key) = self.key {
            let mut table = self.admission.table();
            if let Some(entry) = table.by_key.get_mut(&key) {
                entry.open = entry.open.saturating_sub(1);
            }
        }
    }
}

/// The key an address is counted under: an IPv4 address (also when mapped into IPv6), or the
/// /64 of an IPv6 one.
pub(crate) fn key_of(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let [a, b, c, d, ..] = v6.segments();
                IpAddr::V6(Ipv6Addr::new(a, b, c, d, 0, 0, 0, 0))
            }
        },
    }
}

impl Admission {
    pub(crate) fn new(limits: Limits) -> Arc<Admission> {
        Arc::new(Admission { limits, table: Mutex::default() })
    }

    fn table(&self) -> MutexGuard<'_, Table> {
        // Nothing panics under the lock; a poisoned table still holds valid counts.
        self.table.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Admits a connection from `ip` at `now`, or says why not (and whether to log it).
    pub(crate) fn admit(
        self: &Arc<Self>,
        ip: IpAddr,
        now: Instant,
    ) -> Result<Admitted, (Refusal, Option<LogNow>)> {
        let ip = key_of(ip);
        if ip.is_loopback() && self.limits.loopback_exempt {
            return Ok(Admitted { admission: self.clone(), key: None });
        }
        let rate = f64::from(self.limits.new_per_sec.max(1));
        let mut table = self.table();
        let sweep_due = table
            .swept
            .is_none_or(|at| now.saturating_duration_since(at) >= Duration::from_secs(1));
        if table.by_key.len() >= SWEEP_AFTER && sweep_due {
            sweep(&mut table, now, rate);
        }
        let entry = table.by_key.entry(ip).or_insert(Entry {
            open: 0,
            tokens: rate,
            refilled: now,
            unlogged: 0,
            logged: None,
        });
        let earned = now.saturating_duration_since(entry.refilled).as_secs_f64() * rate;
        entry.tokens = (entry.tokens + earned).min(rate);
        entry.refilled = now;
        let refused = if entry.open >= self.limits.per_address {
            Some(Refusal::TooMany)
        } else if entry.tokens < 1.0 {
            Some(Refusal::TooFast)
        } else {
            None
        };
        if let Some(refusal) = refused {
            entry.unlogged += 1;
            let due = entry.logged.is_none_or(|at| now.saturating_duration_since(at) >= LOG_EVERY);
            let log = due.then(|| {
                entry.logged = Some(now);
                LogNow(std::mem::take(&mut entry.unlogged))
            });
            return Err((refusal, log));
        }
        entry.tokens -= 1.0;
        entry.open += 1;
        Ok(Admitted { admission: self.clone(), key: Some(ip) })
    }

    /// How many addresses are tracked (for tests).
    #[cfg(test)]
    fn tracked(&self) -> usize {
        self.table().by_key.len()
    }
}

/// Forgets addresses with nothing open whose bucket has refilled and that have nothing to log.
fn sweep(table: &mut Table, now: Instant, rate: f64) {
    table.by_key.retain(|_, e| {
        let full =
            e.tokens + now.saturating_duration_since(e.refilled).as_secs_f64() * rate >= rate;
        e.open > 0 || !full || e.unlogged > 0
    });
    table.swept = Some(now);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(per_address: usize, new_per_sec: u32) -> Limits {
        Limits { per_address, new_per_sec, loopback_exempt: false }
    }

    #[test]
    fn an_address_holds_at_most_its_share_and_gets_it_back() {
        let admission = Admission::new(limits(2, 100));
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let now = Instant::now();
        let a = admission.admit(ip, now).unwrap();
        let _b = admission.admit(ip, now).unwrap();
        let refused = admission.admit(ip, now).unwrap_err();
        assert_eq!(refused, (Refusal::TooMany, Some(LogNow(1))));
        // Logged once per address, with the count since.
        assert_eq!(admission.admit(ip, now).unwrap_err(), (Refusal::TooMany, None));
        let later = now + LOG_EVERY;
        drop(a);
        let _c = admission.admit(ip, later).unwrap();
        // The line counts the refusal not logged before, and this one.
        assert_eq!(admission.admit(ip, later).unwrap_err(), (Refusal::TooMany, Some(LogNow(2))));
        // Another address is not affected.
        admission.admit("10.0.0.2".parse().unwrap(), now).unwrap();
    }

    #[test]
    fn new_connections_are_paced_per_address() {
        let admission = Admission::new(limits(100, 4));
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let now = Instant::now();
        let held: Vec<_> = (0..4).map(|_| admission.admit(ip, now).unwrap()).collect();
        assert_eq!(admission.admit(ip, now).unwrap_err().0, Refusal::TooFast);
        // A quarter of a second later, one more.
        admission.admit(ip, now + Duration::from_millis(250)).unwrap();
        drop(held);
    }

    #[test]
    fn ipv6_counts_per_64_and_mapped_ipv4_as_ipv4() {
        let admission = Admission::new(limits(1, 100));
        let now = Instant::now();
        let _a = admission.admit("2001:db8:1:2::1".parse().unwrap(), now).unwrap();
        let same_64 = admission.admit("2001:db8:1:2:ffff::9".parse().unwrap(), now);
        assert_eq!(same_64.unwrap_err().0, Refusal::TooMany);
        admission.admit("2001:db8:1:3::1".parse().unwrap(), now).unwrap();
        let _v4 = admission.admit("10.1.1.1".parse().unwrap(), now).unwrap();
        let mapped = admission.admit("::ffff:10.1.1.1".parse().unwrap(), now);
        assert_eq!(mapped.unwrap_err().0, Refusal::TooMany);
    }

    #[test]
    fn loopback_is_exempt_unless_asked() {
        let exempt = Admission::new(Limits { loopback_exempt: true, ..limits(1, 1) });
        let now = Instant::now();
        let held: Vec<_> =
            (0..10).map(|_| exempt.admit("127.0.0.1".parse().unwrap(), now).unwrap()).collect();
        assert_eq!(held.len(), 10);
        assert_eq!(exempt.tracked(), 0);
        let strict = Admission::new(limits(1, 1));
        let _one = strict.admit("::1".parse().unwrap(), now).unwrap();
        assert!(strict.admit("::1".parse().unwrap(), now).is_err());
    }

    #[test]
    fn idle_addresses_are_forgotten() {
        let admission = Admission::new(limits(10, 1000));
        let now = Instant::now();
        for i in 0..(SWEEP_AFTER as u32 + 10) {
            let ip = IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 + i));
            drop(admission.admit(ip, now).unwrap());
        }
        // A later admission sweeps the ones whose buckets have refilled.
        admission.admit("192.0.2.1".parse().unwrap(), now + Duration::from_secs(5)).unwrap();
        assert!(admission.tracked() < 20, "{} tracked", admission.tracked());
    }
}
