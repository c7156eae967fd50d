//! The registry of who is online: each name's canonical form, how it is shown, its address and
//! its outbox.
//!
//! Routing reads it on every message that misses the route cache, so lookups go through 64
//! independently locked shards by canonical name. Registering and leaving are rare, and they
//! must decide atomically about look-alikes across shards, so they also take one mutex over
//! the claims (canonical name and skeleton of everyone online).

use std::collections::HashMap;
use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hash};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use relay_proto::{Message, NameKey, Status};

use crate::outbox::Outbox;

/// One registered client, as routing sees it.
#[derive(Debug)]
pub(crate) struct Registered {
    /// Distinguishes this registration from a later one of the same name, so a stale guard
    /// can never remove its successor.
    pub(crate) token: u64,
    /// The name as shown (stamped as `from`, listed).
    pub(crate) display: Arc<str>,
    pub(crate) addr: SocketAddr,
    pub(crate) outbox: Outbox,
    /// When it registered, in ms since the Unix epoch (the console's `who`).
    pub(crate) since: u64,
}

/// Number of independently locked shards. Lookups for different names mostly take different
/// locks, so senders on different cores do not fight over one lock word; 64 keeps the chance of
/// two busy names sharing a shard low at little memory cost.
const SHARDS: usize = 64;

#[derive(Debug, Default)]
struct NameShard {
    /// By canonical name.
    by_name: HashMap<Arc<str>, Registered>,
}

#[derive(Debug, Default)]
struct AddrShard {
    /// The canonical name registered from each address, and that registration's token.
    by_addr: HashMap<SocketAddr, (Arc<str>, u64)>,
}

/// A name held online, as the claims table sees it (the rest is in its name shard's
/// [`Registered`]; kept small, as every idle client has one).
#[derive(Debug)]
struct Holder {
    token: u64,
    /// A guest gives way to a key holder of the same (or a look-alike) name.
    guest: bool,
}

#[derive(Debug, Default)]
struct Claims {
    by_canonical: HashMap<Arc<str>, Holder>,
    /// Names claimed and not yet open to routing (see [`Registry::open`]); empty but for
    /// registrations in progress.
    pending: HashMap<Arc<str>, Registered>,
    /// Skeleton → canonical name of its holder. The skeleton is that of the name as shown,
    /// so it can be computed again when the name leaves, rather than kept twice.
    by_skeleton: HashMap<Box<str>, Arc<str>>,
}

/// The skeleton a registration was indexed under: that of its name as shown.
fn skeleton_of(display: &str) -> Option<String> {
    relay_proto::name_key(display).ok().map(|key| key.skeleton)
}

/// Removes `canonical`'s entry from the look-alike index, if it is still its own.
fn forget_skeleton(claims: &mut Claims, canonical: &str, display: &str) {
    if let Some(skeleton) = skeleton_of(display)
        && claims.by_skeleton.get(skeleton.as_str()).is_some_and(|c| &**c == canonical)
    {
        claims.by_skeleton.remove(skeleton.as_str());
    }
}

/// Registered names. Std locks, not Tokio's: no method holds one across an `.await`.
#[derive(Debug)]
pub(crate) struct Registry {
    claims: Mutex<Claims>,
    names: Box<[RwLock<NameShard>]>,
    addrs: Box<[RwLock<AddrShard>]>,
    hasher: RandomState,
    next_token: AtomicU64,
    len: AtomicUsize,
    /// How many names have been opened to routing: a destination that was not here stays
    /// not here until this moves (see [`Registry::opened`]).
    opened: AtomicU64,
}

impl Default for Registry {
    fn default() -> Registry {
        Registry {
            claims: Mutex::default(),
            names: (0..SHARDS).map(|_| RwLock::default()).collect(),
            addrs: (0..SHARDS).map(|_| RwLock::default()).collect(),
            hasher: RandomState::new(),
            next_token: AtomicU64::new(1),
            len: AtomicUsize::new(0),
            opened: AtomicU64::new(0),
        }
    }
}

/// An address in the form users see and type: an IPv4 client of a dual-stack (`::`) listener
/// shows as `1.2.3.4:5`, not `[::ffff:1.2.3.4]:5`.
pub(crate) fn canonical_addr(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::from((v4, v6.port())),
            None => addr,
        },
        SocketAddr::V4(_) => addr,
    }
}

/// Why a name could not be registered online.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Conflict {
    /// Someone online holds the name (the same canonical form).
    Taken,
    /// Someone online holds a name that looks like it; its display form.
    LooksLike(Arc<str>),
}

/// Who is registering.
#[derive(Debug)]
pub(crate) struct Entry<'a> {
    pub(crate) key: &'a NameKey,
    pub(crate) display: &'a str,
    pub(crate) addr: SocketAddr,
    pub(crate) outbox: Outbox,
    pub(crate) guest: bool,
}

fn lock<T>(lock: &Mutex<T>) -> MutexGuard<'_, T> {
    // No code panics while holding a lock; a poisoned table is still consistent.
    lock.lock().unwrap_or_else(PoisonError::into_inner)
}

fn read<T>(lock: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(PoisonError::into_inner)
}

fn write<T>(lock: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(PoisonError::into_inner)
}

impl Registry {
    fn shard<K: Hash + ?Sized>(&self, key: &K) -> usize {
        (self.hasher.hash_one(key) % SHARDS as u64) as usize
    }

    fn name_shard(&self, canonical: &str) -> &RwLock<NameShard> {
        &self.names[self.shard(canonical)]
    }

    fn addr_shard(&self, addr: &SocketAddr) -> &RwLock<AddrShard> {
        &self.addrs[self.shard(addr)]
    }

    /// Claims `entry.key` for a client. Exactly one of any number of concurrent calls for the
    /// same or look-alike names succeeds, except that a key holder (`guest: false`) displaces
    /// a guest holding the name or a look-alike: the guest's connection is closed with
    /// [`Status::NameOwned`]. Returns the name as shown and the registration's token.
    ///
    /// The name is not yet routable: the caller queues the client's welcome first and then
    /// calls [`Registry::open`], so nothing routed to it can overtake the welcome.
    pub(crate) fn insert(&self, entry: Entry<'_>) -> Result<(Arc<str>, u64), Conflict> {
        let addr = canonical_addr(entry.addr);
        let canonical: Arc<str> = Arc::from(entry.key.canonical.as_str());
        // Most names are shown as their canonical form: one allocation for both.
        let display =
            if entry.display == &*canonical { canonical.clone() } else { Arc::from(entry.display) };
        let token = self.next_token.fetch_add(1, Ordering::Relaxed);
        let mut claims = lock(&self.claims);
        if let Some(holder) = claims.by_canonical.get(&canonical) {
            if !holder.guest || entry.guest {
                return Err(Conflict::Taken);
            }
            self.evict(&mut claims, &canonical);
        }
        if let Some(other) = claims.by_skeleton.get(entry.key.skeleton.as_str()).cloned() {
            match claims.by_canonical.get(&other) {
                // A key holder displaces a look-alike guest.
                Some(holder) if holder.guest && !entry.guest => self.evict(&mut claims, &other),
                Some(_) => {
                    let pending = claims.pending.get(&other).map(|e| e.display.clone());
                    let shown = pending
                        .or_else(|| self.with_name(&other, |e| e.display.clone()))
                        .unwrap_or(other);
                    return Err(Conflict::LooksLike(shown));
                }
                // A stale index entry: its holder is gone.
                None => {
                    claims.by_skeleton.remove(entry.key.skeleton.as_str());
                }
            }
        }
        claims.by_skeleton.insert(entry.key.skeleton.as_str().into(), canonical.clone());
        claims.by_canonical.insert(canonical.clone(), Holder { token, guest: entry.guest });
        let since = crate::router::now_ms();
        let registered =
            Registered { token, display: display.clone(), addr, outbox: entry.outbox, since };
        claims.pending.insert(canonical, registered);
        Ok((display, token))
    }

    /// Opens a claimed name to routing (by name and by address). Returns false if the claim
    /// is gone (a key holder displaced the guest meanwhile).
    pub(crate) fn open(&self, canonical: &str, token: u64) -> bool {
        let mut claims = lock(&self.claims);
        if claims.pending.get(canonical).is_none_or(|e| e.token != token) {
            return false;
        }
        let Some((canonical, registered)) = claims.pending.remove_entry(canonical) else {
            return false;
        };
        let addr = registered.addr;
        write(self.name_shard(&canonical)).by_name.insert(canonical.clone(), registered);
        // A live connection's address is unique, so this never replaces a live entry; a stale
        // one (same port, earlier connection) is overwritten and its token no longer matches.
        write(self.addr_shard(&addr)).by_addr.insert(addr, (canonical, token));
        self.len.fetch_add(1, Ordering::Relaxed);
        // After the entry is in: whoever reads the new count finds it.
        self.opened.fetch_add(1, Ordering::Release);
        true
    }

    /// How many names have been opened to routing so far. Read it before a lookup that
    /// misses: while it has not moved, the same lookup misses again.
    pub(crate) fn opened(&self) -> u64 {
        self.opened.load(Ordering::Acquire)
    }

    /// Removes a guest holding `canonical` and closes its connection: a key holder takes the
    /// name.
    fn evict(&self, claims: &mut Claims, canonical: &Arc<str>) {
        let Some(holder) = claims.by_canonical.remove(canonical) else { return };
        let Some(gone) = self.unroute(claims, canonical, holder.token) else { return };
        tracing::info!(name = %gone.display, "guest displaced by the name's key holder");
        let detail = format!("{} now belongs to a key; you were a guest", gone.display);
        let farewell = Message::reply(0, Status::NameOwned, &*gone.display, detail).closing();
        gone.outbox.close(Some(&farewell));
    }

    /// Takes registration `token` of `canonical` out of routing (or out of the claims not
    /// yet open) and out of the look-alike index.
    fn unroute(&self, claims: &mut Claims, canonical: &str, token: u64) -> Option<Registered> {
        if claims.pending.get(canonical).is_some_and(|e| e.token == token) {
            let gone = claims.pending.remove(canonical)?;
            forget_skeleton(claims, canonical, &gone.display);
            return Some(gone);
        }
        let gone = {
            let mut shard = write(self.name_shard(canonical));
            if shard.by_name.get(canonical).is_none_or(|e| e.token != token) {
                return None;
            }
            shard.by_name.remove(canonical)?
        };
        self.len.fetch_sub(1, Ordering::Relaxed);
        forget_skeleton(claims, canonical, &gone.display);
        let mut shard = write(self.addr_shard(&gone.addr));
        if shard.by_addr.get(&gone.addr).is_some_and(|(_, t)| *t == token) {
            shard.by_addr.remove(&gone.addr);
        }
        Some(gone)
    }

    /// Removes `canonical` if it is still the registration identified by `token`.
    pub(crate) fn remove(&self, canonical: &str, token: u64) {
        let mut claims = lock(&self.claims);
        if claims.by_canonical.get(canonical).is_none_or(|holder| holder.token != token) {
            return;
        }
        claims.by_canonical.remove(canonical);
        self.unroute(&mut claims, canonical, token);
    }

    /// Runs `f` on the client registered under the canonical name `canonical`, under its
    /// shard's read lock.
    pub(crate) fn with_name<R>(
        &self,
        canonical: &str,
        f: impl FnOnce(&Registered) -> R,
    ) -> Option<R> {
        read(self.name_shard(canonical)).by_name.get(canonical).map(f)
    }

    /// Runs `f` on the client registered from `addr`, under its shard's read lock.
    pub(crate) fn with_addr<R>(
        &self,
        addr: SocketAddr,
        f: impl FnOnce(&Registered) -> R,
    ) -> Option<R> {
        let addr = canonical_addr(addr);
        let (name, token) = read(self.addr_shard(&addr)).by_addr.get(&addr).cloned()?;
        // The name may have left (or been re-registered from elsewhere) in between: only the
        // registration this address belongs to counts.
        read(self.name_shard(&name)).by_name.get(&*name).filter(|entry| entry.token == token).map(f)
    }

    /// Everyone online as `(name as shown, address)`, sorted by name.
    pub(crate) fn list(&self) -> Vec<(Arc<str>, SocketAddr)> {
        let mut all: Vec<_> = self
            .names
            .iter()
            .flat_map(|shard| {
                read(shard)
                    .by_name
                    .values()
                    .map(|e| (e.display.clone(), e.addr))
                    .collect::<Vec<_>>()
            })
            .collect();
        all.sort();
        all
    }

    /// Bytes queued for every client online and not yet written.
    pub(crate) fn queued_bytes(&self) -> u64 {
        // Outboxes collected first: no outbox lock is taken under a shard lock.
        let outboxes: Vec<Outbox> = self
            .names
            .iter()
            .flat_map(|shard| {
                read(shard).by_name.values().map(|e| e.outbox.clone()).collect::<Vec<_>>()
            })
            .collect();
        outboxes.iter().map(|o| o.queue().bytes).sum()
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

    fn insert(
        registry: &Registry,
        name: &str,
        port: u16,
        guest: bool,
    ) -> Result<(Arc<str>, u64), Conflict> {
        let key = relay_proto::name_key(name).unwrap();
        let (shown, token) = registry.insert(Entry {
            key: &key,
            display: name,
            addr: addr(port),
            outbox: Outbox::new(1000),
            guest,
        })?;
        assert!(registry.open(&key.canonical, token));
        Ok((shown, token))
    }

    #[test]
    fn names_are_unique_and_freed_only_by_their_owner() {
        let registry = Registry::default();
        let (_, first) = insert(&registry, "alice", 1, true).unwrap();
        assert_eq!(insert(&registry, "alice", 2, true), Err(Conflict::Taken));
        assert_eq!(insert(&registry, "ALICE", 2, true), Err(Conflict::Taken));
        assert_eq!(insert(&registry, "аlice", 2, true), Err(Conflict::LooksLike("alice".into())));
        registry.remove("alice", first);
        let (_, second) = insert(&registry, "alice", 3, true).unwrap();
        // A stale token does not remove the new owner.
        registry.remove("alice", first);
        assert_eq!(registry.with_name("alice", |e| e.token), Some(second));
        assert_eq!(registry.with_addr(addr(3), |e| e.display.to_string()), Some("alice".into()));
        assert_eq!(registry.with_addr(addr(1), |e| e.display.to_string()), None);
        registry.remove("alice", second);
        assert_eq!(registry.len(), 0);
        // The look-alike index went with the name.
        insert(&registry, "аlice", 4, true).unwrap();
    }

    #[test]
    fn a_key_holder_displaces_a_guest_and_not_the_other_way() {
        let registry = Registry::default();
        let key = relay_proto::name_key("Bob").unwrap();
        let guest_outbox = Outbox::new(1000);
        let entry = |outbox: &Outbox, guest| Entry {
            key: &key,
            display: "Bob",
            addr: addr(1),
            outbox: outbox.clone(),
            guest,
        };
        let (_, guest) = registry.insert(entry(&guest_outbox, true)).unwrap();
        assert!(registry.open("bob", guest));
        let owner = Outbox::new(1000);
        let (_, token) = registry.insert(entry(&owner, false)).unwrap();
        assert!(registry.open("bob", token));
        assert!(guest_outbox.is_closed());
        assert!(!owner.is_closed());
        assert_eq!(registry.insert(entry(&Outbox::new(1000), true)), Err(Conflict::Taken));
        assert_eq!(registry.len(), 1);
        // A look-alike guest is displaced the same way.
        let (_, guest) = insert(&registry, "carol", 5, true).unwrap();
        insert(&registry, "caroI", 6, false).unwrap();
        assert_eq!(registry.with_name("carol", |e| e.token), None);
        registry.remove("carol", guest);
        assert_eq!(registry.len(), 2);
    }

    #[test]
    fn ipv4_clients_of_a_dual_stack_listener_are_known_by_their_ipv4_address() {
        let registry = Registry::default();
        let mapped: SocketAddr = "[::ffff:10.1.2.3]:4000".parse().unwrap();
        let key = relay_proto::name_key("bob").unwrap();
        let (_, token) = registry
            .insert(Entry {
                key: &key,
                display: "bob",
                addr: mapped,
                outbox: Outbox::new(100),
                guest: true,
            })
            .unwrap();
        // Claimed, not routable until opened.
        assert_eq!(registry.with_addr(mapped, |_| ()), None);
        assert!(registry.open("bob", token));
        let plain: SocketAddr = "10.1.2.3:4000".parse().unwrap();
        assert_eq!(registry.list(), vec![(Arc::from("bob"), plain)]);
        assert_eq!(registry.with_addr(plain, |e| e.display.to_string()), Some("bob".into()));
        assert_eq!(registry.with_addr(mapped, |e| e.display.to_string()), Some("bob".into()));
    }
}
