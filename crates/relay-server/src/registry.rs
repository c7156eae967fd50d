//! The name registry: who is online, at which address, and where their outbox is.

use std::collections::HashMap;
use std::collections::hash_map::{Entry, RandomState};
use std::hash::{BuildHasher, Hash};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use crate::outbox::Outbox;

/// One registered client.
#[derive(Debug)]
pub(crate) struct Registered {
    /// Distinguishes this registration from a later one of the same name, so a stale guard
    /// can never remove its successor.
    pub(crate) token: u64,
    pub(crate) addr: SocketAddr,
    pub(crate) outbox: Outbox,
}

/// Number of independently locked shards. Lookups for different names mostly take different
/// locks, so senders on different cores do not fight over one lock word; 64 keeps the chance of
/// two busy names sharing a shard low at little memory cost.
const SHARDS: usize = 64;

#[derive(Debug, Default)]
struct NameShard {
    by_name: HashMap<Arc<str>, Registered>,
}

#[derive(Debug, Default)]
struct AddrShard {
    /// The name registered from each address, and that registration's token.
    by_addr: HashMap<SocketAddr, (Arc<str>, u64)>,
}

/// Registered names, sharded by hash, each shard behind a reader-writer lock. Routing takes a
/// read lock on one shard; only registering and leaving take write locks. Std locks, not
/// Tokio's: no method holds one across an `.await`.
#[derive(Debug)]
pub(crate) struct Registry {
    names: Box<[RwLock<NameShard>]>,
    addrs: Box<[RwLock<AddrShard>]>,
    hasher: RandomState,
    next_token: AtomicU64,
    len: AtomicUsize,
}

impl Default for Registry {
    fn default() -> Registry {
        Registry {
            names: (0..SHARDS).map(|_| RwLock::default()).collect(),
            addrs: (0..SHARDS).map(|_| RwLock::default()).collect(),
            hasher: RandomState::new(),
            next_token: AtomicU64::new(1),
            len: AtomicUsize::new(0),
        }
    }
}

/// An address in the form users see and type: an IPv4 client of a dual-stack (`::`) listener
/// shows as `1.2.3.4:5`, not `[::ffff:1.2.3.4]:5`.
fn canonical(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::from((v4, v6.port())),
            None => addr,
        },
        SocketAddr::V4(_) => addr,
    }
}

/// The name is already registered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct NameTaken;

fn read<T>(lock: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    // No code panics while holding a lock; a poisoned shard is still consistent.
    lock.read().unwrap_or_else(PoisonError::into_inner)
}

fn write<T>(lock: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(PoisonError::into_inner)
}

impl Registry {
    fn shard<K: Hash + ?Sized>(&self, key: &K) -> usize {
        (self.hasher.hash_one(key) % SHARDS as u64) as usize
    }

    fn name_shard(&self, name: &str) -> &RwLock<NameShard> {
        &self.names[self.shard(name)]
    }

    fn addr_shard(&self, addr: &SocketAddr) -> &RwLock<AddrShard> {
        &self.addrs[self.shard(addr)]
    }

    /// Registers `name` for the client at `addr`. Exactly one of any number of concurrent
    /// calls for the same name succeeds. Returns the name as shared and its token.
    pub(crate) fn insert(
        &self,
        name: &str,
        addr: SocketAddr,
        outbox: Outbox,
    ) -> Result<(Arc<str>, u64), NameTaken> {
        let addr = canonical(addr);
        let name: Arc<str> = Arc::from(name);
        let token = self.next_token.fetch_add(1, Ordering::Relaxed);
        match write(self.name_shard(&name)).by_name.entry(name.clone()) {
            Entry::Occupied(_) => return Err(NameTaken),
            Entry::Vacant(slot) => {
                slot.insert(Registered { token, addr, outbox });
            }
        }
        self.len.fetch_add(1, Ordering::Relaxed);
        // A live connection's address is unique, so this never replaces a live entry; a stale
        // one (same port, earlier connection) is overwritten and its token no longer matches.
        write(self.addr_shard(&addr)).by_addr.insert(addr, (name.clone(), token));
        Ok((name, token))
    }

    /// Removes `name` if it is still the registration identified by `token`.
    pub(crate) fn remove(&self, name: &str, token: u64) {
        let addr = {
            let mut shard = write(self.name_shard(name));
            match shard.by_name.get(name) {
                Some(entry) if entry.token == token => {
                    let addr = entry.addr;
                    shard.by_name.remove(name);
                    addr
                }
                _ => return,
            }
        };
        self.len.fetch_sub(1, Ordering::Relaxed);
        let mut shard = write(self.addr_shard(&addr));
        if shard.by_addr.get(&addr).is_some_and(|(_, t)| *t == token) {
            shard.by_addr.remove(&addr);
        }
    }

    /// Runs `f` on the client registered as `name`, under its shard's read lock.
    pub(crate) fn with_name<R>(&self, name: &str, f: impl FnOnce(&Registered) -> R) -> Option<R> {
        read(self.name_shard(name)).by_name.get(name).map(f)
    }

    /// Runs `f` on the client registered from `addr`, under its shard's read lock.
    pub(crate) fn with_addr<R>(
        &self,
        addr: SocketAddr,
        f: impl FnOnce(&str, &Registered) -> R,
    ) -> Option<R> {
        let addr = canonical(addr);
        let (name, token) = read(self.addr_shard(&addr)).by_addr.get(&addr).cloned()?;
        // The name may have left (or been re-registered from elsewhere) in between: only the
        // registration this address belongs to counts.
        read(self.name_shard(&name))
            .by_name
            .get(&*name)
            .filter(|entry| entry.token == token)
            .map(|entry| f(&name, entry))
    }

    /// Everyone online, sorted by name.
    pub(crate) fn list(&self) -> Vec<(Arc<str>, SocketAddr)> {
        let mut all: Vec<_> = self
            .names
            .iter()
            .flat_map(|shard| {
                read(shard)
                    .by_name
                    .iter()
                    .map(|(name, e)| (name.clone(), e.addr))
                    .collect::<Vec<_>>()
            })
            .collect();
        all.sort();
        all
    }

    /// How many names are registered.
    pub(crate) fn len(&self) -> usize {
        self.len.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    #[test]
    fn names_are_unique_and_freed_only_by_their_owner() {
        let registry = Registry::default();
        let (_, first) = registry.insert("alice", addr(1), Outbox::new(100)).unwrap();
        assert_eq!(registry.insert("alice", addr(2), Outbox::new(100)), Err(NameTaken));
        registry.remove("alice", first);
        let (_, second) = registry.insert("alice", addr(3), Outbox::new(100)).unwrap();
        // A stale token does not remove the new owner.
        registry.remove("alice", first);
        assert_eq!(registry.with_name("alice", |e| e.token), Some(second));
        assert_eq!(registry.with_addr(addr(3), |n, _| n.to_string()), Some("alice".into()));
        assert_eq!(registry.with_addr(addr(1), |n, _| n.to_string()), None);
        registry.remove("alice", second);
        assert_eq!(registry.len(), 0);
    }

    #[test]
    fn ipv4_clients_of_a_dual_stack_listener_are_known_by_their_ipv4_address() {
        let registry = Registry::default();
        let mapped: SocketAddr = "[::ffff:10.1.2.3]:4000".parse().unwrap();
        registry.insert("bob", mapped, Outbox::new(100)).unwrap();
        let plain: SocketAddr = "10.1.2.3:4000".parse().unwrap();
        assert_eq!(registry.list(), vec![(Arc::from("bob"), plain)]);
        assert_eq!(registry.with_addr(plain, |n, _| n.to_string()), Some("bob".into()));
        assert_eq!(registry.with_addr(mapped, |n, _| n.to_string()), Some("bob".into()));
    }
}
