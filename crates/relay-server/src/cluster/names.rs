//! The cluster's name table: [`NameStore`] over a NATS JetStream key-value bucket, the second
//! implementation of the seam (the embedded one is `RedbStore`).
//!
//! The bucket holds two kinds of key, both hex-encoded (see [`kv_key`]):
//!
//! - `name.<canonical>`: the [`NameRecord`], in the embedded store's record layout;
//! - `skel.<skeleton>`: the canonical name holding that look-alike skeleton.
//!
//! A first binding is a compare-and-set create of the skeleton key, then of the name key; a
//! login advances the epoch with a compare-and-set update on the record's revision. Two nodes
//! racing for one name cannot both win: the loser's create or update fails and it reads again.

use async_nats::jetstream::kv::{self, CreateErrorKind, Operation, UpdateErrorKind};
use bytes::Bytes;
use futures_util::future::BoxFuture;

use super::wire::kv_key;
use crate::names::{Claimed, GuestCheck, KeyClaim, NameRecord, NameStore, StoreError};
use crate::redb_store;

/// How many times a claim reads again after losing a compare-and-set race before giving up.
const RACES: usize = 16;

/// The name table in a NATS key-value bucket.
#[derive(Clone)]
pub(crate) struct NatsNames {
    kv: kv::Store,
}

impl std::fmt::Debug for NatsNames {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NatsNames")
    }
}

fn name_key(canonical: &str) -> String {
    kv_key("name.", canonical)
}

fn skeleton_key(skeleton: &str) -> String {
    kv_key("skel.", skeleton)
}

fn failed(what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError(format!("NATS key-value {what}: {e}"))
}

/// A live (not deleted) entry, if any; and the revision a create or update must expect.
async fn live(kv: &kv::Store, key: &str) -> Result<(Option<kv::Entry>, u64), StoreError> {
    match kv.entry(key).await.map_err(|e| failed("read", e))? {
        Some(entry) if entry.operation == Operation::Put => {
            let revision = entry.revision;
            Ok((Some(entry), revision))
        }
        Some(entry) => Ok((None, entry.revision)),
        None => Ok((None, 0)),
    }
}

impl NatsNames {
    pub(crate) fn new(kv: kv::Store) -> NatsNames {
        NatsNames { kv }
    }

    /// The bucket (the inboxes keep their counters in it too).
    pub(crate) fn bucket(&self) -> kv::Store {
        self.kv.clone()
    }

    /// Raises `canonical`'s epoch to at least `epoch` (a live session's, reserved by the
    /// inbox), so every later login numbers above it.
    pub(crate) async fn raise_epoch(&self, canonical: &str, epoch: u64) -> Result<(), StoreError> {
        for _ in 0..RACES {
            let Some((mut record, revision)) = self.record(canonical).await? else {
                return Err(StoreError(format!("{canonical:?} is no longer bound")));
            };
            if record.epoch >= epoch {
                return Ok(());
            }
            record.epoch = epoch;
            let value = Bytes::from(redb_store::encode(&record));
            match self.kv.update(name_key(canonical), value, revision).await {
                Ok(_) => return Ok(()),
                Err(e) if e.kind() == UpdateErrorKind::WrongLastRevision => continue,
                Err(e) => return Err(failed("update", e)),
            }
        }
        Err(StoreError(format!("{canonical} is being claimed too busily; try again")))
    }

    async fn record(&self, canonical: &str) -> Result<Option<(NameRecord, u64)>, StoreError> {
        let (entry, _) = live(&self.kv, &name_key(canonical)).await?;
        Ok(entry.and_then(|e| {
            let record = redb_store::decode(canonical, &e.value);
            if record.is_none() {
                tracing::warn!(name = %canonical, "unreadable name record in the NATS bucket");
            }
            record.map(|r| (r, e.revision))
        }))
    }

    /// Whoever holds `skeleton`, if that name is still bound; a skeleton entry left behind by
    /// a release that stopped half-way does not count.
    async fn skeleton_holder(
        &self,
        skeleton: &str,
    ) -> Result<(Option<NameRecord>, u64), StoreError> {
        let (entry, revision) = live(&self.kv, &skeleton_key(skeleton)).await?;
        let Some(entry) = entry else { return Ok((None, revision)) };
        let holder = String::from_utf8_lossy(&entry.value).into_owned();
        Ok((self.record(&holder).await?.map(|(record, _)| record), revision))
    }

    async fn claim_once(&self, claim: &KeyClaim) -> Result<Option<Claimed>, StoreError> {
        if let Some((mut record, revision)) = self.record(&claim.canonical).await? {
            if record.key != claim.key {
                return Ok(Some(Claimed::Owned { display: record.display }));
            }
            record.epoch += 1;
            record.last_seen = record.last_seen.max(claim.now);
            let value = Bytes::from(redb_store::encode(&record));
            return match self.kv.update(name_key(&claim.canonical), value, revision).await {
                Ok(_) => Ok(Some(Claimed::Bound { record, first: false })),
                Err(e) if e.kind() == UpdateErrorKind::WrongLastRevision => Ok(None),
                Err(e) => Err(failed("update", e)),
            };
        }
        let (holder, revision) = self.skeleton_holder(&claim.skeleton).await?;
        if let Some(other) = holder
            && other.canonical != claim.canonical
        {
            return Ok(Some(Claimed::Confusable { display: other.display }));
        }
        // The skeleton first: whoever takes it may bind; a name of the same canonical form
        // then races on the name key itself.
        let key = skeleton_key(&claim.skeleton);
        let value = Bytes::from(claim.canonical.clone().into_bytes());
        // (lost a race, error)
        let taken = match revision {
            0 => self
                .kv
                .create(key, value)
                .await
                .map(drop)
                .map_err(|e| (e.kind() == CreateErrorKind::AlreadyExists, e.to_string())),
            _ => self
                .kv
                .update(key, value, revision)
                .await
                .map(drop)
                .map_err(|e| (e.kind() == UpdateErrorKind::WrongLastRevision, e.to_string())),
        };
        match taken {
            Ok(()) => {}
            // Someone else took the skeleton meanwhile (perhaps for this very name): read
            // again.
            Err((true, _)) => return Ok(None),
            Err((false, e)) => return Err(failed("write", e)),
        }
        let record = NameRecord {
            display: claim.display.clone(),
            canonical: claim.canonical.clone(),
            skeleton: claim.skeleton.clone(),
            key: claim.key,
            bound_at: claim.now,
            last_seen: claim.now,
            epoch: 1,
        };
        let value = Bytes::from(redb_store::encode(&record));
        match self.kv.create(name_key(&claim.canonical), value).await {
            Ok(_) => Ok(Some(Claimed::Bound { record, first: true })),
            Err(e) if e.kind() == CreateErrorKind::AlreadyExists => Ok(None),
            Err(e) => Err(failed("create", e)),
        }
    }
}

impl NameStore for NatsNames {
    fn claim(&self, claim: KeyClaim) -> BoxFuture<'static, Result<Claimed, StoreError>> {
        let me = self.clone();
        Box::pin(async move {
            for _ in 0..RACES {
                if let Some(claimed) = me.claim_once(&claim).await? {
                    return Ok(claimed);
                }
            }
            Err(StoreError(format!("{} is being claimed too busily; try again", claim.display)))
        })
    }

    fn check_guest(
        &self,
        canonical: String,
        skeleton: String,
    ) -> BoxFuture<'static, Result<GuestCheck, StoreError>> {
        let me = self.clone();
        Box::pin(async move {
            if let Some((record, _)) = me.record(&canonical).await? {
                return Ok(GuestCheck::Owned { display: record.display });
            }
            match me.skeleton_holder(&skeleton).await? {
                (Some(other), _) => Ok(GuestCheck::Confusable { display: other.display }),
                (None, _) => Ok(GuestCheck::Free),
            }
        })
    }

    fn seen(&self, canonical: String, now: u64) -> BoxFuture<'static, Result<(), StoreError>> {
        let me = self.clone();
        Box::pin(async move {
            for _ in 0..RACES {
                let Some((mut record, revision)) = me.record(&canonical).await? else {
                    return Ok(());
                };
                record.last_seen = record.last_seen.max(now);
                let value = Bytes::from(redb_store::encode(&record));
                match me.kv.update(name_key(&canonical), value, revision).await {
                    Ok(_) => return Ok(()),
                    Err(e) if e.kind() == UpdateErrorKind::WrongLastRevision => continue,
                    Err(e) => return Err(failed("update", e)),
                }
            }
            Ok(())
        })
    }

    fn release(
        &self,
        canonical: String,
    ) -> BoxFuture<'static, Result<Option<NameRecord>, StoreError>> {
        let me = self.clone();
        Box::pin(async move {
            let Some((record, revision)) = me.record(&canonical).await? else {
                return Ok(None);
            };
            me.kv
                .delete_expect_revision(name_key(&canonical), Some(revision))
                .await
                .map_err(|e| failed("delete", e))?;
            // The skeleton entry only if it is still this name's (best effort: a stale one
            // is ignored by every reader, as its name is no longer bound).
            let (entry, revision) = live(&me.kv, &skeleton_key(&record.skeleton)).await?;
            if entry.is_some_and(|e| e.value == canonical.as_bytes())
                && let Err(e) = me
                    .kv
                    .delete_expect_revision(skeleton_key(&record.skeleton), Some(revision))
                    .await
            {
                tracing::debug!(name = %canonical, error = %e, "skeleton entry not removed");
            }
            Ok(Some(record))
        })
    }

    fn lookup(
        &self,
        canonical: String,
    ) -> BoxFuture<'static, Result<Option<NameRecord>, StoreError>> {
        let me = self.clone();
        Box::pin(async move { Ok(me.record(&canonical).await?.map(|(record, _)| record)) })
    }

    fn close(&self) -> BoxFuture<'static, ()> {
        // Nothing is buffered: every call above waited for the server's answer.
        Box::pin(async {})
    }
}
