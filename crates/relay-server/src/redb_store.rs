//! The embedded name table: a redb database (`names.redb`) in the data directory.
//!
//! redb is pure Rust, ACID and crash-safe: a commit is on disk when it returns (its default
//! `Durability::Immediate`), and a process killed at any point reopens to the last commit.
//! One thread owns the database and applies requests in batches: everything queued while a
//! batch is applied goes into the next, so many registrations at once share one fsync (group
//! commit) and none is answered before it is durable. A batch that changes names is committed
//! durably; one that changes only inboxes is made durable by the inbox journal instead
//! ([`crate::journal`]), and stores do not touch the tables until a checkpoint, which a second
//! thread writes while the first goes on.
//!
//! Tables: `names` (canonical name → record) and `skeletons` (skeleton → canonical name), kept
//! in step in the same transactions; the inboxes' tables (see [`crate::redb_inbox`]); and
//! `journal` (the last journal record the tables hold).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use futures_util::future::BoxFuture;
use redb::{Database, DatabaseError, Durability, ReadableDatabase, ReadableTable, TableDefinition};
use relay_proto::{PUBLIC_KEY_LEN, PublicKey};
use tokio::sync::oneshot;

use crate::inbox::{
    AppendDone, Appended, Envelope, ExpiredMessage, InboxLimits, InboxStore, Page, Totals,
};
use crate::journal::{Change, Journal, Redo, changes};
use crate::names::{Claimed, GuestCheck, KeyClaim, NameRecord, NameStore, StoreError};
use crate::redb_inbox::{
    AppendCache, INBOX, INBOX_META, InboxTables, append_one, append_segment, expire, forget_inbox,
    go_live, read_page, remove_upto,
};

const NAMES: TableDefinition<&str, &[u8]> = TableDefinition::new("names");
/// The number of the last journal record the tables hold (key [`APPLIED`]).
const JOURNAL: TableDefinition<&str, u64> = TableDefinition::new("journal");
const APPLIED: &str = "applied";
const SKELETONS: TableDefinition<&str, &str> = TableDefinition::new("skeletons");

/// Bits of a sequence number below its epoch (see [`crate::inbox`]).
pub(crate) const SEQ_EPOCH_SHIFT: u32 = 40;

/// The database file in the data directory.
pub const DB_FILE: &str = "names.redb";

/// Most requests applied in one batch (one journal record and sync). With 16 senders keeping
/// 1,000 stores each in flight, 1,024 capped the store rate near 300 k msgs/s (a batch per
/// sync); 8,192 lets it reach 420–490 k, and a batch of 64 B messages is then about 1 MiB.
const MAX_BATCH: usize = 8192;

/// Why the store could not be opened: each says what to do about it in one line.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The data directory could not be created or is not writable.
    #[error("cannot use data directory {dir}: {source}")]
    Dir {
        /// The directory.
        dir: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// Another process (a second server) has the database open.
    #[error("{path} is in use by another relay-server; give each server its own --data-dir")]
    Locked {
        /// The database file.
        path: PathBuf,
    },
    /// The file is not a readable redb database.
    #[error(
        "{path} is damaged or not a relay name table ({detail}); restore it from a backup or move it away"
    )]
    Corrupt {
        /// The database file.
        path: PathBuf,
        /// What redb said.
        detail: String,
    },
}

/// The embedded [`NameStore`]; share it behind an `Arc`.
#[derive(Debug)]
pub struct RedbStore {
    /// `None` once closed.
    requests: Mutex<Option<mpsc::Sender<Request>>>,
    /// Told when the worker has let go of the database.
    stopped: Mutex<Option<oneshot::Receiver<()>>>,
}

type Reply<T> = oneshot::Sender<Result<T, StoreError>>;

enum Request {
    Claim(KeyClaim, Reply<Claimed>),
    CheckGuest(String, String, Reply<GuestCheck>),
    Seen(String, u64, Reply<()>),
    Release(String, Reply<Option<NameRecord>>),
    Lookup(String, Reply<Option<NameRecord>>),
    Append(Envelope, AppendDone),
    Read { recipient: String, after: u64, max_bytes: usize, live: bool, reply: Reply<Page> },
    Remove(String, u64),
    Purge(String, Reply<u64>),
    Totals(Reply<Totals>),
    Expire(u64, Reply<Vec<ExpiredMessage>>),
}

impl RedbStore {
    /// Opens (creating if need be) the name table in `dir`, which is created too.
    ///
    /// # Errors
    /// [`OpenError`]: a directory that cannot be used, a database locked by another server,
    /// or a damaged file. A damaged file is never replaced.
    pub fn open(dir: &Path) -> Result<RedbStore, OpenError> {
        RedbStore::open_with(dir, InboxLimits::default())
    }

    /// [`RedbStore::open`] with these inbox limits.
    ///
    /// # Errors
    /// As [`RedbStore::open`].
    pub fn open_with(dir: &Path, limits: InboxLimits) -> Result<RedbStore, OpenError> {
        let dir_error = |source| OpenError::Dir { dir: dir.to_path_buf(), source };
        std::fs::create_dir_all(dir).map_err(dir_error)?;
        let path = dir.join(DB_FILE);
        let db = create(&path, dir)?;
        // Opened only once the database's lock is held: one server per data directory.
        let mut journal = Journal::open(dir).map_err(dir_error)?;
        let totals = recover(&db, &mut journal, &path, dir, true)?;
        let (requests, queue) = mpsc::channel();
        let (stopped_tx, stopped) = oneshot::channel();
        let place = Place { dir: dir.to_path_buf(), path };
        thread::Builder::new()
            .name("relay-names".into())
            .spawn(move || {
                let inboxes =
                    Inboxes { limits, totals, failing: None, cache: AppendCache::default() };
                worker(place, db, journal, queue, inboxes);
                // The database is dropped (and its file unlocked) before this is told.
                let _ = stopped_tx.send(());
            })
            .map_err(dir_error)?;
        Ok(RedbStore { requests: Mutex::new(Some(requests)), stopped: Mutex::new(Some(stopped)) })
    }

    fn ask<T: Send + 'static>(
        &self,
        make: impl FnOnce(Reply<T>) -> Request,
    ) -> BoxFuture<'static, Result<T, StoreError>> {
        let (tx, rx) = oneshot::channel();
        let sent = match &*lock(&self.requests) {
            Some(requests) => requests.send(make(tx)).is_ok(),
            None => false,
        };
        Box::pin(async move {
            if !sent {
                return Err(StoreError("the name table is closed".into()));
            }
            rx.await.map_err(|_| StoreError("the name table is closed".into()))?
        })
    }
}

/// Where the store lives: its directory and database file.
struct Place {
    dir: PathBuf,
    path: PathBuf,
}

/// Opens (creating if need be) the database file, each failure as the [`OpenError`] a person
/// can act on.
fn create(path: &Path, dir: &Path) -> Result<Database, OpenError> {
    Database::create(path).map_err(|e| match e {
        DatabaseError::DatabaseAlreadyOpen => OpenError::Locked { path: path.to_path_buf() },
        // redb reports a file that is not a database as invalid data.
        DatabaseError::Storage(redb::StorageError::Io(io))
            if io.kind() != std::io::ErrorKind::InvalidData =>
        {
            OpenError::Dir { dir: dir.to_path_buf(), source: io }
        }
        other => OpenError::Corrupt { path: path.to_path_buf(), detail: other.to_string() },
    })
}

/// Brings the tables up to date after an open: replays the journal's records the tables do
/// not hold yet (those after the number in the `journal` table). Returns the inboxes' totals.
///
/// At start (`at_start`): also checks every name record decodes, creates missing tables (so a
/// read-only or full disk shows at start, not at the first registration), commits durably
/// and starts the journal over. After a failure closed the database: commits without a sync
/// (a full disk may not take one) and leaves the journal as it is; the next checkpoint makes
/// it durable.
fn recover(
    db: &Database,
    journal: &mut Journal,
    path: &Path,
    dir: &Path,
    at_start: bool,
) -> Result<Totals, OpenError> {
    let corrupt = |e: &dyn std::fmt::Display| OpenError::Corrupt {
        path: path.to_path_buf(),
        detail: e.to_string(),
    };
    let records =
        journal.records().map_err(|source| OpenError::Dir { dir: dir.to_path_buf(), source })?;
    let mut tx = db.begin_write().map_err(|e| corrupt(&e))?;
    if !at_start {
        tx.set_durability(Durability::None).map_err(|e| corrupt(&e))?;
    }
    let totals;
    let last;
    {
        let mut applied_table = tx.open_table(JOURNAL).map_err(|e| corrupt(&e))?;
        let applied = applied_table.get(APPLIED).map_err(|e| corrupt(&e))?.map_or(0, |v| v.value());
        let mut names = tx.open_table(NAMES).map_err(|e| corrupt(&e))?;
        let mut inbox = tx.open_table(INBOX).map_err(|e| corrupt(&e))?;
        let mut meta = tx.open_table(INBOX_META).map_err(|e| corrupt(&e))?;
        let mut pending = records.iter().filter(|(lsn, _)| *lsn > applied).peekable();
        if let Some((first, _)) = pending.peek()
            && *first != applied + 1
        {
            return Err(corrupt(&format!(
                "the inbox journal lacks records {} to {}",
                applied + 1,
                first - 1
            )));
        }
        let mut replayed = applied;
        for (lsn, payload) in pending {
            for change in changes(payload) {
                let change = change
                    .ok_or_else(|| corrupt(&format!("inbox journal record {lsn} is damaged")))?;
                let done = match change {
                    Change::Name(name, value) => names.insert(name, value).map(drop),
                    Change::Meta(name, value) => meta.insert(name, value).map(drop),
                    Change::MetaGone(name) => meta.remove(name).map(drop),
                    Change::Segment(name, first, value) => {
                        inbox.insert((name, first), value).map(drop)
                    }
                    Change::SegmentGone(name, first) => inbox.remove((name, first)).map(drop),
                    Change::SegmentAppend(name, first, records) => {
                        append_segment(&mut inbox, name, first, records)
                            .map_err(|e| corrupt(&e))?;
                        Ok(())
                    }
                };
                done.map_err(|e| corrupt(&e))?;
            }
            replayed = *lsn;
        }
        last = replayed;
        applied_table.insert(APPLIED, last).map_err(|e| corrupt(&e))?;
        // Every record must decode: a table we cannot read is not silently ignored.
        for entry in names.iter().map_err(|e| corrupt(&e))?.take_while(|_| at_start) {
            let (key, value) = entry.map_err(|e| corrupt(&e))?;
            decode(key.value(), value.value())
                .ok_or_else(|| corrupt(&format!("bad record for {:?}", key.value())))?;
        }
        tx.open_table(SKELETONS).map_err(|e| corrupt(&e))?;
        totals = crate::redb_inbox::totals(&meta).map_err(|e| corrupt(&e))?;
    }
    tx.commit().map_err(|e| match e {
        redb::CommitError::Storage(redb::StorageError::Io(io)) => {
            OpenError::Dir { dir: dir.to_path_buf(), source: io }
        }
        other => corrupt(&other),
    })?;
    if at_start {
        journal
            .restart(last)
            .map_err(|source| OpenError::Dir { dir: dir.to_path_buf(), source })?;
    }
    Ok(totals)
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Nothing panics under these locks; a poisoned one still holds a valid value.
    mutex.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl NameStore for RedbStore {
    fn claim(&self, claim: KeyClaim) -> BoxFuture<'static, Result<Claimed, StoreError>> {
        self.ask(|tx| Request::Claim(claim, tx))
    }

    fn check_guest(
        &self,
        canonical: String,
        skeleton: String,
    ) -> BoxFuture<'static, Result<GuestCheck, StoreError>> {
        self.ask(|tx| Request::CheckGuest(canonical, skeleton, tx))
    }

    fn seen(&self, canonical: String, now: u64) -> BoxFuture<'static, Result<(), StoreError>> {
        self.ask(|tx| Request::Seen(canonical, now, tx))
    }

    fn release(
        &self,
        canonical: String,
    ) -> BoxFuture<'static, Result<Option<NameRecord>, StoreError>> {
        self.ask(|tx| Request::Release(canonical, tx))
    }

    fn lookup(
        &self,
        canonical: String,
    ) -> BoxFuture<'static, Result<Option<NameRecord>, StoreError>> {
        self.ask(|tx| Request::Lookup(canonical, tx))
    }

    fn close(&self) -> BoxFuture<'static, ()> {
        // Requests already queued are still applied; then the worker drops the database.
        drop(lock(&self.requests).take());
        let stopped = lock(&self.stopped).take();
        Box::pin(async move {
            if let Some(stopped) = stopped {
                let _ = stopped.await;
            }
        })
    }
}

impl InboxStore for RedbStore {
    fn append(&self, envelope: Envelope, done: AppendDone) {
        let failed = match &*lock(&self.requests) {
            Some(requests) => match requests.send(Request::Append(envelope, done)) {
                Ok(()) => return,
                Err(mpsc::SendError(request)) => request,
            },
            None => Request::Append(envelope, done),
        };
        if let Request::Append(_, done) = failed {
            done(Err(StoreError("the store is closed".into())));
        }
    }

    fn read(
        &self,
        recipient: String,
        after: u64,
        max_bytes: usize,
        live: bool,
    ) -> BoxFuture<'static, Result<Page, StoreError>> {
        self.ask(|reply| Request::Read { recipient, after, max_bytes, live, reply })
    }

    fn remove(&self, recipient: String, upto: u64) {
        if let Some(requests) = &*lock(&self.requests) {
            let _ = requests.send(Request::Remove(recipient, upto));
        }
    }

    fn purge(&self, recipient: String) -> BoxFuture<'static, Result<u64, StoreError>> {
        self.ask(|tx| Request::Purge(recipient, tx))
    }

    fn totals(&self) -> BoxFuture<'static, Result<Totals, StoreError>> {
        self.ask(Request::Totals)
    }

    fn expire(&self, now: u64) -> BoxFuture<'static, Result<Vec<ExpiredMessage>, StoreError>> {
        self.ask(|tx| Request::Expire(now, tx))
    }
}

impl Request {
    /// Changes the name table (not through the inboxes' journaled changes): committed durably.
    fn changes_names(&self) -> bool {
        matches!(self, Request::Claim(..) | Request::Seen(..) | Request::Release(..))
    }

    fn reads_only(&self) -> bool {
        matches!(
            self,
            Request::CheckGuest(..)
                | Request::Lookup(..)
                | Request::Totals(..)
                | Request::Read { live: false, .. }
        )
    }
}

/// Answers a batch of lookups from one read transaction.
fn answer_reads(
    db: &Database,
    batch: Vec<Request>,
    inboxes: &Inboxes,
    done: &mut Vec<Done>,
) -> Result<(), StoreError> {
    let tables = db.begin_read().map_err(store_error).and_then(|tx| {
        Ok((
            tx.open_table(NAMES).map_err(store_error)?,
            tx.open_table(SKELETONS).map_err(store_error)?,
            tx.open_table(INBOX).map_err(store_error)?,
            tx.open_table(INBOX_META).map_err(store_error)?,
        ))
    });
    let (names, skeletons, inbox, meta) = match tables {
        Ok(tables) => tables,
        Err(e) => return fail_all(batch, e, done),
    };
    for request in batch {
        match request {
            Request::CheckGuest(canonical, skeleton, tx) => {
                let r = check_guest(&names, &skeletons, &canonical, &skeleton);
                done.push(Done::CheckGuest(tx, r));
            }
            Request::Lookup(canonical, tx) => done.push(Done::Record(tx, get(&names, &canonical))),
            Request::Totals(tx) => done.push(Done::Totals(tx, Ok(inboxes.totals))),
            Request::Read { recipient, after, max_bytes, reply, .. } => {
                let page = read_page(&inbox, &meta, &recipient, after, max_bytes);
                done.push(Done::Page(reply, page));
            }
            // Not sent here: the caller checked `reads_only`.
            other => fail(other, &StoreError("not a lookup".into()), done),
        }
    }
    Ok(())
}

/// An answer waiting for its transaction to commit.
enum Done {
    Claim(Reply<Claimed>, Result<Claimed, StoreError>),
    CheckGuest(Reply<GuestCheck>, Result<GuestCheck, StoreError>),
    Seen(Reply<()>, Result<(), StoreError>),
    Record(Reply<Option<NameRecord>>, Result<Option<NameRecord>, StoreError>),
    Append(AppendDone, Result<Appended, StoreError>),
    Page(Reply<Page>, Result<Page, StoreError>),
    Count(Reply<u64>, Result<u64, StoreError>),
    Totals(Reply<Totals>, Result<Totals, StoreError>),
    Expired(Reply<Vec<ExpiredMessage>>, Result<Vec<ExpiredMessage>, StoreError>),
}

impl Done {
    /// Sends the answer, or `failed` instead if the commit did not happen.
    fn send(self, failed: Option<&StoreError>) {
        fn pick<T>(r: Result<T, StoreError>, failed: Option<&StoreError>) -> Result<T, StoreError> {
            match failed {
                Some(e) => Err(e.clone()),
                None => r,
            }
        }
        // The asker may have given up (its connection closed): nobody to tell.
        let _ = match self {
            Done::Claim(tx, r) => tx.send(pick(r, failed)).map_err(drop),
            Done::CheckGuest(tx, r) => tx.send(pick(r, failed)).map_err(drop),
            Done::Seen(tx, r) => tx.send(pick(r, failed)).map_err(drop),
            Done::Record(tx, r) => tx.send(pick(r, failed)).map_err(drop),
            Done::Append(done, r) => {
                done(pick(r, failed));
                Ok(())
            }
            Done::Page(tx, r) => tx.send(pick(r, failed)).map_err(drop),
            Done::Count(tx, r) => tx.send(pick(r, failed)).map_err(drop),
            Done::Totals(tx, r) => tx.send(pick(r, failed)).map_err(drop),
            Done::Expired(tx, r) => tx.send(pick(r, failed)).map_err(drop),
        };
    }
}

/// The worker's view of the inboxes: their limits and totals (kept in memory, so a limit check
/// reads no table), and the failure it last logged.
pub(crate) struct Inboxes {
    pub(crate) limits: InboxLimits,
    pub(crate) totals: Totals,
    /// The last commit error logged, so a failing disk is logged once per cause, not once per
    /// message; cleared (and the recovery logged) when a commit succeeds again.
    failing: Option<String>,
    /// Appends' working state, kept between transactions for its buffers.
    cache: AppendCache,
}

fn worker(
    place: Place,
    db: Database,
    journal: Journal,
    queue: mpsc::Receiver<Request>,
    inboxes: Inboxes,
) {
    // redb latches an I/O failure (a full disk, say): every later call fails until the
    // database is opened again. So a failed batch closes it, and the next batch opens it
    // afresh (recovering to the last durable commit and replaying the journal), which is how
    // the store comes back once there is space again.
    let mut w = Worker {
        place,
        db: Some(Arc::new(db)),
        journal,
        inboxes,
        redo: Redo::default(),
        running: None,
        retry_at: None,
    };
    loop {
        // While journal records wait for a checkpoint, wake for it even if nothing comes.
        let wait = match (&w.running, w.journal.due_in()) {
            (Some(_), due) => Some(due.unwrap_or(RUNNING_POLL).min(RUNNING_POLL)),
            (None, due) => due,
        };
        let first = match wait {
            Some(wait) => match queue.recv_timeout(wait) {
                Ok(first) => Some(first),
                Err(mpsc::RecvTimeoutError::Timeout) => None,
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            },
            None => match queue.recv() {
                Ok(first) => Some(first),
                Err(_) => break,
            },
        };
        let mut outcome = match first {
            Some(first) => w.serve(first, &queue),
            None => Ok(()),
        };
        if outcome.is_ok() {
            outcome = w.checkpoint_if_due();
        }
        if outcome.is_err() {
            w.close();
        }
        note_outcome(&outcome, &mut w.inboxes);
    }
    // A clean stop leaves the tables current and nothing to replay.
    let last = w.finish_checkpoint().and_then(|()| match &w.db {
        Some(db) if w.journal.pending() || !w.inboxes.cache.is_empty() => {
            let cache = std::mem::take(&mut w.inboxes.cache);
            flush_durably(db, cache, w.journal.last())
        }
        _ => Ok(()),
    });
    if let Err(e) = last {
        tracing::warn!(error = %e, "last checkpoint failed; the journal is replayed at next start");
    }
}

/// How often the worker looks whether a running checkpoint is done, when nothing else wakes it.
const RUNNING_POLL: Duration = Duration::from_millis(20);

/// The worker's state.
struct Worker {
    place: Place,
    /// `None` after a failure, until the next batch opens it again.
    db: Option<Arc<Database>>,
    journal: Journal,
    inboxes: Inboxes,
    /// The changes of the batch being applied (reused).
    redo: Redo,
    /// The checkpoint being written on its own thread, if one is.
    running: Option<Running>,
    /// No checkpoint is tried before this, after one failed.
    retry_at: Option<Instant>,
}

/// How long after a failed checkpoint the next is tried.
const RETRY: Duration = Duration::from_secs(1);

/// A checkpoint being written: the stores it flushes (everything up to a journal record) are
/// gone from the worker's cache, so their recipients' counts are kept here until it is
/// durable, for the stores that arrive meanwhile.
struct Running {
    thread: thread::JoinHandle<Result<(), StoreError>>,
    frozen: Arc<Frozen>,
}

/// Recipients' name records and counts as a running checkpoint will leave them.
pub(crate) type Frozen = HashMap<String, (Option<NameRecord>, crate::redb_inbox::Meta)>;

impl Worker {
    /// Takes `first` and whatever else is queued (up to [`MAX_BATCH`]) and applies them as one
    /// batch; answers each once its changes are durable, or with the failure.
    fn serve(&mut self, first: Request, queue: &mpsc::Receiver<Request>) -> Result<(), StoreError> {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match queue.try_recv() {
                Ok(next) => batch.push(next),
                Err(_) => break,
            }
        }
        let mut done = Vec::with_capacity(batch.len());
        let stores_only = batch.iter().all(|r| matches!(r, Request::Append(..)));
        // Anything but stores reads or writes the tables: any running checkpoint must be
        // in them first.
        let ready = if stores_only { Ok(()) } else { self.finish_checkpoint() };
        let ready = ready.and_then(|()| self.open());
        let db = match ready {
            Ok(db) => db,
            Err(e) => {
                let _ = fail_all(batch, e.clone(), &mut done);
                for answer in done {
                    answer.send(None);
                }
                return Err(e);
            }
        };
        let inboxes = &mut self.inboxes;
        // The totals change with the batch; they are put back if it fails.
        let before = inboxes.totals;
        self.redo.clear();
        let committed = if stores_only {
            let frozen = self.running.as_ref().map(|r| r.frozen.clone());
            append_only(
                &db,
                batch,
                inboxes,
                frozen.as_deref(),
                &mut self.journal,
                &mut self.redo,
                &mut done,
            )
        } else if inboxes.cache.is_empty() && batch.iter().all(Request::reads_only) {
            // Lookups alone (guests logging in) need no write transaction and no sync.
            answer_reads(&db, batch, inboxes, &mut done)
        } else {
            apply(&db, batch, inboxes, &mut self.journal, &mut self.redo, &mut done)
        };
        if committed.is_err() {
            inboxes.totals = before;
        }
        for answer in done {
            answer.send(committed.as_ref().err());
        }
        committed
    }

    /// The database, opened again (and the journal replayed) if a failure closed it.
    fn open(&mut self) -> Result<Arc<Database>, StoreError> {
        if let Some(db) = &self.db {
            return Ok(db.clone());
        }
        let place = &self.place;
        let reopened = create(&place.path, &place.dir).and_then(|reopened| {
            let totals = recover(&reopened, &mut self.journal, &place.path, &place.dir, false)?;
            Ok((reopened, totals))
        });
        match reopened {
            Ok((reopened, totals)) => {
                tracing::info!(path = %place.path.display(), "store reopened");
                self.inboxes.totals = totals;
                let db = Arc::new(reopened);
                self.db = Some(db.clone());
                Ok(db)
            }
            Err(e) => Err(StoreError(format!("the store cannot be opened: {e}"))),
        }
    }

    /// After a failure: waits for any running checkpoint, closes the database (releasing its
    /// file lock) and drops the cache; the next batch opens it again, and the journal brings
    /// back what the cache held.
    fn close(&mut self) {
        if let Some(running) = self.running.take() {
            let _ = running.thread.join();
        }
        self.db = None;
        self.inboxes.cache = AppendCache::default();
        // What the journal holds may now be needed at the next start, in either file.
        self.journal.keep_both();
    }

    /// Waits for the running checkpoint, if any, to be durable.
    fn finish_checkpoint(&mut self) -> Result<(), StoreError> {
        let Some(running) = self.running.take() else { return Ok(()) };
        running
            .thread
            .join()
            .unwrap_or_else(|_| Err(StoreError("the checkpoint thread failed".into())))?;
        self.journal.checkpointed();
        Ok(())
    }

    /// Starts a checkpoint when one is due: the cache (every store up to the last journal
    /// record) is handed to a thread that writes it into the tables and commits durably, while
    /// this one goes on storing into a fresh cache and the journal's other file.
    fn checkpoint_if_due(&mut self) -> Result<(), StoreError> {
        if let Some(running) = &self.running {
            if !running.thread.is_finished() {
                return Ok(());
            }
            self.finish_checkpoint()?;
        }
        let Some(db) = &self.db else { return Ok(()) };
        if !self.journal.can_switch() {
            // After a failure, records the tables on disk lack may be in both files: the
            // next checkpoint is written here and now, and its success lets the journal
            // start over. Tried at most once a second while it fails (a full disk).
            if self.retry_at.is_some_and(|at| Instant::now() < at) {
                return Ok(());
            }
            let cache = std::mem::take(&mut self.inboxes.cache);
            let upto = self.journal.last();
            if let Err(e) = flush_durably(db, cache, upto) {
                self.retry_at = Some(Instant::now() + RETRY);
                return Err(e);
            }
            self.retry_at = None;
            return self
                .journal
                .restart(upto)
                .map_err(|e| StoreError(format!("inbox journal: {e}")));
        }
        if !self.journal.due() {
            return Ok(());
        }
        let upto = self.journal.last();
        let cache = std::mem::take(&mut self.inboxes.cache);
        let frozen = Arc::new(cache.frozen());
        self.journal.switch().map_err(|e| StoreError(format!("inbox journal: {e}")))?;
        let db = db.clone();
        let thread = thread::Builder::new()
            .name("relay-checkpoint".into())
            .spawn(move || flush_durably(&db, cache, upto))
            .map_err(|e| StoreError(format!("cannot start a checkpoint: {e}")))?;
        self.running = Some(Running { thread, frozen });
        Ok(())
    }
}

/// Logs a store failure once per cause, and its end.
fn note_outcome(committed: &Result<(), StoreError>, inboxes: &mut Inboxes) {
    match (committed, &inboxes.failing) {
        (Err(e), Some(last)) if e.0 == *last => {}
        (Err(e), _) => {
            tracing::error!(error = %e, "store update failed (logged once until it changes)");
            inboxes.failing = Some(e.0.clone());
        }
        (Ok(()), Some(_)) => {
            tracing::warn!("store updates work again");
            inboxes.failing = None;
        }
        (Ok(()), None) => {}
    }
}

/// A batch of stores alone: applied to the cache, put in one journal record, synced. No redb
/// write transaction: the tables are read (and `frozen`, while a checkpoint runs) for
/// recipients not in the cache.
fn append_only(
    db: &Database,
    batch: Vec<Request>,
    inboxes: &mut Inboxes,
    frozen: Option<&Frozen>,
    journal: &mut Journal,
    redo: &mut Redo,
    done: &mut Vec<Done>,
) -> Result<(), StoreError> {
    let tables = db.begin_read().map_err(store_error).and_then(|tx| {
        Ok((
            tx.open_table(NAMES).map_err(store_error)?,
            tx.open_table(INBOX_META).map_err(store_error)?,
        ))
    });
    let (names, meta) = match tables {
        Ok(tables) => tables,
        Err(e) => return fail_all(batch, e, done),
    };
    let mut cache = std::mem::take(&mut inboxes.cache);
    for request in batch {
        match request {
            Request::Append(envelope, then) => {
                let r = append_one(&names, &meta, frozen, inboxes, &mut cache, envelope);
                done.push(Done::Append(then, r));
            }
            other => fail(other, &StoreError("not a store".into()), done),
        }
    }
    cache.journal(redo);
    inboxes.cache = cache;
    if !redo.is_empty() {
        journal.append(redo).map_err(|e| StoreError(format!("inbox journal: {e}")))?;
    }
    Ok(())
}

/// Records in the tables that they hold the journal up to record `lsn`.
fn set_applied(tx: &redb::WriteTransaction, lsn: u64) -> Result<(), StoreError> {
    let mut table = tx.open_table(JOURNAL).map_err(store_error)?;
    table.insert(APPLIED, lsn).map_err(store_error)?;
    Ok(())
}

/// A checkpoint: writes `cache` (the stores of every journal record up to `upto` not yet in
/// the tables) into the tables and commits durably.
fn flush_durably(db: &Database, mut cache: AppendCache, upto: u64) -> Result<(), StoreError> {
    let tx = db.begin_write().map_err(store_error)?;
    {
        let (mut names, mut inbox, mut meta) = tx
            .open_table(NAMES)
            .and_then(|n| Ok((n, tx.open_table(INBOX)?, tx.open_table(INBOX_META)?)))
            .map_err(store_error)?;
        // Everything in the cache is in the journal already: nothing new is recorded.
        let mut redo = Redo::default();
        let mut t =
            InboxTables { names: &mut names, inbox: &mut inbox, meta: &mut meta, redo: &mut redo };
        cache.flush(&mut t)?;
    }
    set_applied(&tx, upto)?;
    tx.commit().map_err(store_error)
}

pub(crate) fn store_error(e: impl std::fmt::Display) -> StoreError {
    StoreError(e.to_string())
}

/// Applies a batch in one write transaction and commits it. Each answer goes into `done`;
/// they are sent only once the commit returned (or fails, all together).
///
/// A batch that changes names is committed durably (a checkpoint: the journal starts over).
/// One that changes only inboxes is committed without a sync, and its changes, recorded in
/// `redo`, are appended to the journal and synced first ([`crate::journal`] says why).
fn apply(
    db: &Database,
    batch: Vec<Request>,
    inboxes: &mut Inboxes,
    journal: &mut Journal,
    redo: &mut Redo,
    done: &mut Vec<Done>,
) -> Result<(), StoreError> {
    let durable = batch.iter().any(Request::changes_names);
    let mut tx = match db.begin_write() {
        Ok(tx) => tx,
        Err(e) => return fail_all(batch, store_error(e), done),
    };
    if !durable && let Err(e) = tx.set_durability(Durability::None) {
        return fail_all(batch, store_error(e), done);
    }
    {
        let tables = tx.open_table(NAMES).and_then(|n| {
            Ok((n, tx.open_table(SKELETONS)?, tx.open_table(INBOX)?, tx.open_table(INBOX_META)?))
        });
        let (mut names, mut skeletons, mut inbox, mut meta) = match tables {
            Ok(tables) => tables,
            Err(e) => return fail_all(batch, store_error(e), done),
        };
        let mut t =
            InboxTables { names: &mut names, inbox: &mut inbox, meta: &mut meta, redo: &mut *redo };
        // Appends in a row keep their recipients' records and counts here, written once at the
        // end of the run rather than once per message.
        // Taken out for the transaction (the tables borrow the rest of `inboxes`).
        let mut cache = std::mem::take(&mut inboxes.cache);
        for request in batch {
            if !matches!(request, Request::Append(..))
                && let Err(e) = cache.flush(&mut t)
            {
                return Err(e);
            }
            match request {
                Request::Claim(claim, tx) => {
                    let r = claim_one(t.names, &mut skeletons, claim);
                    done.push(Done::Claim(tx, r));
                }
                Request::CheckGuest(canonical, skeleton, tx) => {
                    let r = check_guest(&*t.names, &skeletons, &canonical, &skeleton);
                    done.push(Done::CheckGuest(tx, r));
                }
                Request::Seen(canonical, now, tx) => {
                    let r = get(&*t.names, &canonical).and_then(|record| match record {
                        Some(mut record) => {
                            record.last_seen = record.last_seen.max(now);
                            put(t.names, &record)
                        }
                        None => Ok(()),
                    });
                    done.push(Done::Seen(tx, r));
                }
                Request::Release(canonical, tx) => {
                    let r = get(&*t.names, &canonical).and_then(|record| {
                        if let Some(record) = &record {
                            t.names.remove(canonical.as_str()).map_err(store_error)?;
                            skeletons.remove(record.skeleton.as_str()).map_err(store_error)?;
                            // What waited for the old owner is not the next owner's to read.
                            forget_inbox(&mut t, inboxes, &canonical)?;
                        }
                        Ok(record)
                    });
                    done.push(Done::Record(tx, r));
                }
                Request::Lookup(canonical, tx) => {
                    done.push(Done::Record(tx, get(t.names, &canonical)));
                }
                Request::Append(envelope, then) => {
                    let r = append_one(&*t.names, &*t.meta, None, inboxes, &mut cache, envelope);
                    done.push(Done::Append(then, r));
                }
                Request::Read { recipient, after, max_bytes, live, reply } => {
                    let page = read_page(&*t.inbox, &*t.meta, &recipient, after, max_bytes)
                        .and_then(|page| {
                            if live && !page.more {
                                go_live(&mut t, &recipient, page)
                            } else {
                                Ok(page)
                            }
                        });
                    done.push(Done::Page(reply, page));
                }
                Request::Remove(recipient, upto) => {
                    if let Err(e) = remove_upto(&mut t, inboxes, &recipient, upto) {
                        tracing::warn!(%recipient, error = %e, "could not remove acknowledged messages");
                    }
                }
                Request::Purge(recipient, tx) => {
                    let r = remove_upto(&mut t, inboxes, &recipient, u64::MAX);
                    done.push(Done::Count(tx, r));
                }
                Request::Totals(tx) => done.push(Done::Totals(tx, Ok(inboxes.totals))),
                Request::Expire(now, tx) => {
                    let r = expire(&mut t, inboxes, now);
                    done.push(Done::Expired(tx, r));
                }
            }
        }
        cache.flush(&mut t)?;
        inboxes.cache = cache;
    }
    // The tables say which journal record they hold: this batch's own, if it writes one.
    let logged = !durable && !redo.is_empty();
    let holds = if logged { journal.next() } else { journal.last() };
    set_applied(&tx, holds)?;
    if durable {
        tx.commit().map_err(store_error)?;
        return journal.restart(holds).map_err(|e| StoreError(format!("inbox journal: {e}")));
    }
    if logged {
        // On failure the transaction is dropped, which aborts it: nothing was changed.
        journal.append(redo).map_err(|e| StoreError(format!("inbox journal: {e}")))?;
    }
    if let Err(e) = tx.commit() {
        if logged && let Err(retract) = journal.retract() {
            tracing::error!(error = %retract, "could not take back a journal record whose commit failed");
        }
        return Err(store_error(e));
    }
    Ok(())
}

/// Answers every request of a batch that could not be applied with the error.
fn fail_all(batch: Vec<Request>, e: StoreError, done: &mut Vec<Done>) -> Result<(), StoreError> {
    for request in batch {
        fail(request, &e, done);
    }
    Err(e)
}

fn fail(request: Request, e: &StoreError, done: &mut Vec<Done>) {
    done.push(match request {
        Request::Claim(_, tx) => Done::Claim(tx, Err(e.clone())),
        Request::CheckGuest(_, _, tx) => Done::CheckGuest(tx, Err(e.clone())),
        Request::Seen(_, _, tx) => Done::Seen(tx, Err(e.clone())),
        Request::Release(_, tx) | Request::Lookup(_, tx) => Done::Record(tx, Err(e.clone())),
        Request::Append(_, then) => Done::Append(then, Err(e.clone())),
        Request::Read { reply, .. } => Done::Page(reply, Err(e.clone())),
        Request::Remove(..) => return,
        Request::Purge(_, tx) => Done::Count(tx, Err(e.clone())),
        Request::Totals(tx) => Done::Totals(tx, Err(e.clone())),
        Request::Expire(_, tx) => Done::Expired(tx, Err(e.clone())),
    });
}

pub(crate) type Names<'a> = redb::Table<'a, &'static str, &'static [u8]>;
type Skeletons<'a> = redb::Table<'a, &'static str, &'static str>;
fn claim_one(
    names: &mut Names<'_>,
    skeletons: &mut Skeletons<'_>,
    claim: KeyClaim,
) -> Result<Claimed, StoreError> {
    if let Some(mut record) = get(names, &claim.canonical)? {
        if record.key != claim.key {
            return Ok(Claimed::Owned { display: record.display });
        }
        record.epoch += 1;
        record.last_seen = record.last_seen.max(claim.now);
        put(names, &record)?;
        return Ok(Claimed::Bound { record, first: false });
    }
    if let Some(other) = skeletons.get(claim.skeleton.as_str()).map_err(store_error)? {
        let other = other.value().to_string();
        let display = get(names, &other)?.map_or(other, |r| r.display);
        return Ok(Claimed::Confusable { display });
    }
    let record = NameRecord {
        display: claim.display,
        canonical: claim.canonical,
        skeleton: claim.skeleton,
        key: claim.key,
        bound_at: claim.now,
        last_seen: claim.now,
        epoch: 1,
    };
    put(names, &record)?;
    skeletons.insert(record.skeleton.as_str(), record.canonical.as_str()).map_err(store_error)?;
    Ok(Claimed::Bound { record, first: true })
}

fn check_guest(
    names: &impl ReadableTable<&'static str, &'static [u8]>,
    skeletons: &impl ReadableTable<&'static str, &'static str>,
    canonical: &str,
    skeleton: &str,
) -> Result<GuestCheck, StoreError> {
    if let Some(record) = get(names, canonical)? {
        return Ok(GuestCheck::Owned { display: record.display });
    }
    if let Some(other) = skeletons.get(skeleton).map_err(store_error)? {
        let other = other.value().to_string();
        let display = get(names, &other)?.map_or(other, |r| r.display);
        return Ok(GuestCheck::Confusable { display });
    }
    Ok(GuestCheck::Free)
}

pub(crate) fn get(
    names: &impl ReadableTable<&'static str, &'static [u8]>,
    canonical: &str,
) -> Result<Option<NameRecord>, StoreError> {
    match names.get(canonical).map_err(store_error)? {
        None => Ok(None),
        Some(value) => decode(canonical, value.value())
            .map(Some)
            .ok_or_else(|| StoreError(format!("the record for {canonical:?} is damaged"))),
    }
}

pub(crate) fn put(names: &mut Names<'_>, record: &NameRecord) -> Result<(), StoreError> {
    names.insert(record.canonical.as_str(), encode(record).as_slice()).map_err(store_error)?;
    Ok(())
}

/// Record layout, version 1: `1`, key (32), bound_at, last_seen, epoch (u64 LE each), skeleton
/// length (u16 LE), skeleton, display (the rest). Small and fixed, so no serde format is
/// needed for it; the first byte lets a later layout be told apart.
pub(crate) fn encode(record: &NameRecord) -> Vec<u8> {
    let mut out = Vec::with_capacity(1 + 32 + 24 + 2 + record.skeleton.len() + 64);
    out.push(1);
    out.extend_from_slice(&record.key.0);
    out.extend_from_slice(&record.bound_at.to_le_bytes());
    out.extend_from_slice(&record.last_seen.to_le_bytes());
    out.extend_from_slice(&record.epoch.to_le_bytes());
    let skeleton_len = u16::try_from(record.skeleton.len()).unwrap_or(u16::MAX);
    out.extend_from_slice(&skeleton_len.to_le_bytes());
    out.extend_from_slice(&record.skeleton.as_bytes()[..usize::from(skeleton_len)]);
    out.extend_from_slice(record.display.as_bytes());
    out
}

pub(crate) fn decode(canonical: &str, bytes: &[u8]) -> Option<NameRecord> {
    let (&format, rest) = bytes.split_first()?;
    if format != 1 {
        return None;
    }
    let (key, rest) = rest.split_at_checked(PUBLIC_KEY_LEN)?;
    let (times, rest) = rest.split_at_checked(24)?;
    let u64_at = |i: usize| times.get(i..i + 8)?.try_into().ok().map(u64::from_le_bytes);
    let (len, rest) = rest.split_at_checked(2)?;
    let len = usize::from(u16::from_le_bytes(len.try_into().ok()?));
    let (skeleton, display) = rest.split_at_checked(len)?;
    Some(NameRecord {
        display: std::str::from_utf8(display).ok()?.to_string(),
        canonical: canonical.to_string(),
        skeleton: std::str::from_utf8(skeleton).ok()?.to_string(),
        key: PublicKey(key.try_into().ok()?),
        bound_at: u64_at(0)?,
        last_seen: u64_at(8)?,
        epoch: u64_at(16)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claim(name: &str, key: u8, now: u64) -> KeyClaim {
        let k = relay_proto::name_key(name).unwrap();
        KeyClaim {
            display: name.into(),
            canonical: k.canonical,
            skeleton: k.skeleton,
            key: PublicKey([key; 32]),
            now,
        }
    }

    #[tokio::test]
    async fn bind_log_in_refuse_release_and_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = RedbStore::open(dir.path()).unwrap();
            let first = store.claim(claim("alice", 1, 10)).await.unwrap();
            assert!(
                matches!(first, Claimed::Bound { first: true, ref record } if record.epoch == 1)
            );
            let again = store.claim(claim("Alice", 1, 20)).await.unwrap();
            assert!(matches!(again, Claimed::Bound { first: false, ref record }
                if record.epoch == 2 && record.display == "alice" && record.last_seen == 20));
            assert_eq!(
                store.claim(claim("alice", 2, 30)).await.unwrap(),
                Claimed::Owned { display: "alice".into() }
            );
            assert_eq!(
                store.claim(claim("аlice", 2, 30)).await.unwrap(),
                Claimed::Confusable { display: "alice".into() }
            );
            assert_eq!(
                store.check_guest("alice".into(), "alice".into()).await.unwrap(),
                GuestCheck::Owned { display: "alice".into() }
            );
            store.claim(claim("bob", 3, 40)).await.unwrap();
            assert!(store.release("bob".into()).await.unwrap().is_some());
            assert_eq!(store.release("bob".into()).await.unwrap(), None);
            store.close().await;
            assert!(store.lookup("alice".into()).await.is_err());
        }
        // The worker thread has the database until its channel closes; wait for the lock.
        let store = loop {
            match RedbStore::open(dir.path()) {
                Ok(store) => break store,
                Err(OpenError::Locked { .. }) => {
                    std::thread::sleep(std::time::Duration::from_millis(10))
                }
                Err(e) => panic!("{e}"),
            }
        };
        let alice = store.lookup("alice".into()).await.unwrap().unwrap();
        assert_eq!((alice.key, alice.epoch, alice.bound_at), (PublicKey([1; 32]), 2, 10));
        assert_eq!(store.lookup("bob".into()).await.unwrap(), None);
        // bob's look-alike index went with him.
        assert!(matches!(store.claim(claim("b0b", 4, 50)).await.unwrap(), Claimed::Bound { .. }));
    }

    #[test]
    fn records_round_trip_and_damage_is_noticed() {
        let record = NameRecord {
            display: "Zoë".into(),
            canonical: "zoë".into(),
            skeleton: "zoe\u{308}".into(),
            key: PublicKey([9; 32]),
            bound_at: 1,
            last_seen: 2,
            epoch: 3,
        };
        let bytes = encode(&record);
        assert_eq!(decode("zoë", &bytes), Some(record));
        for cut in 0..60 {
            assert_eq!(decode("zoë", &bytes[..cut]), None, "cut at {cut}");
        }
    }

    #[test]
    fn a_second_open_of_the_same_directory_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let _first = RedbStore::open(dir.path()).unwrap();
        let second = RedbStore::open(dir.path()).unwrap_err();
        assert!(matches!(second, OpenError::Locked { .. }), "{second}");
    }

    #[test]
    fn a_damaged_file_is_refused_and_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(DB_FILE);
        std::fs::write(&path, vec![0x5a; 8192]).unwrap();
        let err = RedbStore::open(dir.path()).unwrap_err();
        assert!(matches!(err, OpenError::Corrupt { .. }), "{err}");
        assert_eq!(std::fs::read(&path).unwrap(), vec![0x5a; 8192]);
    }

    /// Segments (first number, bytes) and counts.
    type InboxView = (Vec<(u64, Vec<u8>)>, Option<Vec<u8>>);

    /// What the tables hold of `bob`'s inbox.
    fn bob(db: &Database) -> InboxView {
        let tx = db.begin_read().unwrap();
        let inbox = tx.open_table(INBOX).unwrap();
        let meta = tx.open_table(INBOX_META).unwrap();
        let segments = inbox
            .range(("bob", 0)..=("bob", u64::MAX))
            .unwrap()
            .map(|e| e.map(|(k, v)| (k.value().1, v.value().to_vec())).unwrap())
            .collect();
        (segments, meta.get("bob").unwrap().map(|v| v.value().to_vec()))
    }

    /// Inbox counts of `count` messages of 3 bytes.
    fn counts(count: u64) -> Vec<u8> {
        let mut m = vec![0u8; 48];
        m[..8].copy_from_slice(&count.to_le_bytes());
        m[8..16].copy_from_slice(&(3 * count).to_le_bytes());
        m[40..].copy_from_slice(&u64::MAX.to_le_bytes());
        m
    }

    #[test]
    fn journal_records_the_tables_lack_are_replayed_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(DB_FILE);
        let db = create(&path, dir.path()).unwrap();
        let mut journal = Journal::open(dir.path()).unwrap();
        recover(&db, &mut journal, &path, dir.path(), true).unwrap();
        // Two stores reach the journal, not the tables (as between checkpoints), then the
        // process dies.
        let mut redo = Redo::default();
        redo.segment_append("bob", 7, b"one");
        redo.meta("bob", &counts(1));
        journal.append(&redo).unwrap();
        redo.clear();
        redo.segment_append("bob", 7, b"two");
        redo.meta("bob", &counts(2));
        journal.append(&redo).unwrap();
        assert_eq!(bob(&db), (vec![], None));
        drop((db, journal));

        // Opening replays them, in order, and starts the journal over.
        let db = create(&path, dir.path()).unwrap();
        let mut journal = Journal::open(dir.path()).unwrap();
        recover(&db, &mut journal, &path, dir.path(), true).unwrap();
        let expected = (vec![(7, b"onetwo".to_vec())], Some(counts(2)));
        assert_eq!(bob(&db), expected);
        assert_eq!(journal.last(), 2);
        drop((db, journal));

        // The tables say they hold record 2: a second open replays nothing again, although
        // the records are still in the file.
        let db = create(&path, dir.path()).unwrap();
        let mut journal = Journal::open(dir.path()).unwrap();
        assert_eq!(journal.records().unwrap().len(), 2);
        recover(&db, &mut journal, &path, dir.path(), true).unwrap();
        assert_eq!(bob(&db), expected);
        drop((db, journal));

        // A journal whose next record is missing is refused, not half replayed.
        let db = create(&path, dir.path()).unwrap();
        let mut journal = Journal::open(dir.path()).unwrap();
        journal.restart(5).unwrap();
        journal.append(&redo).unwrap();
        drop(journal);
        let mut journal = Journal::open(dir.path()).unwrap();
        let err = recover(&db, &mut journal, &path, dir.path(), true).unwrap_err();
        assert!(err.to_string().contains("lacks records 3 to 5"), "{err}");
        assert_eq!(bob(&db), expected);
    }
}
