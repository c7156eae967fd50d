//! The name registry: who is online, at which address, and where their outbox is.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::net::SocketAddr;
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

#[derive(Debug, Default)]
struct Names {
    by_name: HashMap<Arc<str>, Registered>,
    by_addr: HashMap<SocketAddr, Arc<str>>,
    next_token: u64,
}

/// Registered names behind a reader-writer lock. Routing takes the read lock (many senders at
/// once); only registering and leaving take the write lock. A std lock, not Tokio's: no
/// method holds it across an `.await`.
#[derive(Debug, Default)]
pub(crate) struct Registry {
    names: RwLock<Names>,
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

impl Registry {
    fn read(&self) -> RwLockReadGuard<'_, Names> {
        // No code panics while holding the lock; a poisoned map is still consistent.
        self.names.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> RwLockWriteGuard<'_, Names> {
        self.names.write().unwrap_or_else(PoisonError::into_inner)
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
        let mut names = self.write();
        let name: Arc<str> = Arc::from(name);
        names.next_token += 1;
        let token = names.next_token;
        match names.by_name.entry(name.clone()) {
            Entry::Occupied(_) => return Err(NameTaken),
            Entry::Vacant(slot) => {
                slot.insert(Registered { token, addr, outbox });
            }
        }
        names.by_addr.insert(addr, name.clone());
        Ok((name, token))
    }

    /// Removes `name` if it is still the registration identified by `token`.
    pub(crate) fn remove(&self, name: &str, token: u64) {
        let mut names = self.write();
        if let Some(entry) = names.by_name.get(name)
            && entry.token == token
        {
            let addr = entry.addr;
            names.by_name.remove(name);
            names.by_addr.remove(&addr);
        }
    }

    /// Runs `f` on the client registered as `name`, under the read lock.
    pub(crate) fn with_name<R>(&self, name: &str, f: impl FnOnce(&Registered) -> R) -> Option<R> {
        self.read().by_name.get(name).map(f)
    }

    /// Runs `f` on the client registered from `addr`, under the read lock.
    pub(crate) fn with_addr<R>(
        &self,
        addr: SocketAddr,
        f: impl FnOnce(&str, &Registered) -> R,
    ) -> Option<R> {
        let names = self.read();
        let name = names.by_addr.get(&canonical(addr))?;
        names.by_name.get(name).map(|entry| f(name, entry))
    }

    /// Everyone online, sorted by name.
    pub(crate) fn list(&self) -> Vec<(Arc<str>, SocketAddr)> {
        let mut all: Vec<_> =
            self.read().by_name.iter().map(|(name, e)| (name.clone(), e.addr)).collect();
        all.sort();
        all
    }

    /// How many names are registered.
    pub(crate) fn len(&self) -> usize {
        self.read().by_name.len()
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
