//! The inbox journal: a write-ahead log in front of the redb tables (`inbox-a.journal` and
//! `inbox-b.journal` in the data directory).
//!
//! Why it exists: a durable redb commit syncs every page its transaction dirtied, and storing
//! messages for 16 recipients dirties about 30 scattered pages; on this project's machines a
//! sync of 30 scattered pages takes about 820 µs against about 170 µs for one page. So what a
//! batch of inbox requests changes is appended here as one record and synced, one sequential
//! write, before anyone is told `Stored`; the tables are committed without a sync
//! (`Durability::None`, kept in the process's memory). Stores go further: they do not touch
//! redb at all until a checkpoint (or until another request needs the tables); they live in
//! memory (`redb_inbox::AppendCache`) and here, so a checkpoint writes each recipient's new
//! messages as one segment.
//!
//! A **checkpoint** ([`CHECKPOINT_BYTES`] of records, or [`CHECKPOINT_AGE`] since the first)
//! writes the stores into the tables and commits durably, on a thread of its own; meanwhile
//! records go to the other file. Once it is durable, the file it covered may be written over.
//! A batch that changes names (a claim, a login, a release) is committed durably in place,
//! which makes both files free: the journal starts over.
//!
//! A record holds a batch's changes as values ("this key now holds these bytes", "this key is
//! gone"), and stores as "these records were added to this segment". Every redb commit also
//! writes the number of the last record whose changes it holds into the tables (the `journal`
//! table), in the same transaction, so the tables always say exactly which records they hold,
//! and opening the store replays the ones after that, in order, from both files.
//!
//! File layout: records one after another from offset 0, each `len` (u32 LE, the payload's
//! length) · `crc` (u32 LE, CRC-32 of `lsn` and the payload) · `lsn` (u64 LE, one more than the
//! record before) · payload. A file is written again from offset 0 rather than truncated,
//! because a sync that must also record a new file length costs more than one that overwrites
//! (about 230 against 145 µs here). A reader therefore stops at the first record whose
//! checksum fails or whose number does not follow the one before it: whatever lies after that
//! is older. Payload: changes one after another, each a kind byte, the key's name (u16 LE
//! length, bytes), then for segments the first sequence number (u64 LE), then for values the
//! value (u32 LE length, bytes).

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::time::{Duration, Instant};

/// The journal's two files in the data directory: records go to one while the other's are
/// being checkpointed.
pub const JOURNAL_FILES: [&str; 2] = ["inbox-a.journal", "inbox-b.journal"];

/// Records past this many bytes make a checkpoint due.
pub(crate) const CHECKPOINT_BYTES: u64 = 4 << 20;

/// A record older than this makes a checkpoint due (also when the server is idle), so the
/// tables on disk are never far behind and a restart has little to replay. Measured with
/// `relay-bench store`: at 1 s a checkpoint's burst of work on the 2-core machine pushed the
/// store-ack p99 at 20,000 msgs/s to 6–7 ms, at 200 ms to 5 ms, at 100 ms it is 3–4 ms.
pub(crate) const CHECKPOINT_AGE: Duration = Duration::from_millis(100);

/// Bytes of a record before its payload.
const HEADER: usize = 16;

const NAME: u8 = 1;
const META: u8 = 2;
const META_GONE: u8 = 3;
const SEGMENT: u8 = 4;
const SEGMENT_GONE: u8 = 5;
const SEGMENT_APPEND: u8 = 6;

/// What one transaction changed, being recorded.
#[derive(Debug, Default)]
pub(crate) struct Redo {
    buf: Vec<u8>,
}

impl Redo {
    /// The name record of `name` is now `value`.
    pub(crate) fn name(&mut self, name: &str, value: &[u8]) {
        self.change(NAME, name, None, Some(value));
    }

    /// The inbox counts of `name` are now `value`.
    pub(crate) fn meta(&mut self, name: &str, value: &[u8]) {
        self.change(META, name, None, Some(value));
    }

    /// The inbox counts of `name` are gone.
    pub(crate) fn meta_gone(&mut self, name: &str) {
        self.change(META_GONE, name, None, None);
    }

    /// The segment of `name` starting at `first` is now `value`.
    pub(crate) fn segment(&mut self, name: &str, first: u64, value: &[u8]) {
        self.change(SEGMENT, name, Some(first), Some(value));
    }

    /// `records` were added at the end of the segment of `name` starting at `first` (created
    /// if it was not there). The one change that is not a value: replayed only onto tables
    /// that hold every record before it, which the `journal` table's number guarantees.
    pub(crate) fn segment_append(&mut self, name: &str, first: u64, records: &[u8]) {
        self.change(SEGMENT_APPEND, name, Some(first), Some(records));
    }

    /// The segment of `name` starting at `first` is gone.
    pub(crate) fn segment_gone(&mut self, name: &str, first: u64) {
        self.change(SEGMENT_GONE, name, Some(first), None);
    }

    fn change(&mut self, kind: u8, name: &str, first: Option<u64>, value: Option<&[u8]>) {
        // Names are at most a few dozen bytes and values a segment of a bounded inbox; the
        // `min`s only keep a record self-consistent if that ever stopped being so.
        let name = &name.as_bytes()[..name.len().min(usize::from(u16::MAX))];
        self.buf.push(kind);
        self.buf.extend_from_slice(&(name.len() as u16).to_le_bytes());
        self.buf.extend_from_slice(name);
        if let Some(first) = first {
            self.buf.extend_from_slice(&first.to_le_bytes());
        }
        if let Some(value) = value {
            let len = u32::try_from(value.len()).unwrap_or(u32::MAX);
            self.buf.extend_from_slice(&len.to_le_bytes());
            self.buf.extend_from_slice(&value[..len as usize]);
        }
    }

    /// Nothing recorded.
    pub(crate) fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// Forgets what was recorded (keeping the buffer).
    pub(crate) fn clear(&mut self) {
        self.buf.clear();
    }
}

/// One change of a record, decoded.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Change<'a> {
    /// A name record's new value.
    Name(&'a str, &'a [u8]),
    /// A recipient's inbox counts' new value.
    Meta(&'a str, &'a [u8]),
    /// A recipient's inbox counts removed.
    MetaGone(&'a str),
    /// A segment's new value.
    Segment(&'a str, u64, &'a [u8]),
    /// A segment removed.
    SegmentGone(&'a str, u64),
    /// Records added at the end of a segment.
    SegmentAppend(&'a str, u64, &'a [u8]),
}

/// The changes of a record's payload, in order; `None` where it is damaged (and nothing
/// after). The payload passed its checksum, so damage here means a bug, not a torn write.
pub(crate) fn changes(mut payload: &[u8]) -> impl Iterator<Item = Option<Change<'_>>> {
    std::iter::from_fn(move || {
        if payload.is_empty() {
            return None;
        }
        let change = (|| {
            let (&kind, rest) = payload.split_first()?;
            let (len, rest) = rest.split_at_checked(2)?;
            let len = usize::from(u16::from_le_bytes(len.try_into().ok()?));
            let (name, mut rest) = rest.split_at_checked(len)?;
            let name = std::str::from_utf8(name).ok()?;
            let mut first = 0;
            if matches!(kind, SEGMENT | SEGMENT_GONE | SEGMENT_APPEND) {
                let (bytes, after) = rest.split_at_checked(8)?;
                first = u64::from_le_bytes(bytes.try_into().ok()?);
                rest = after;
            }
            let mut value: &[u8] = &[];
            if matches!(kind, NAME | META | SEGMENT | SEGMENT_APPEND) {
                let (len, after) = rest.split_at_checked(4)?;
                let len = u32::from_le_bytes(len.try_into().ok()?) as usize;
                (value, rest) = after.split_at_checked(len)?;
            }
            let change = match kind {
                NAME => Change::Name(name, value),
                META => Change::Meta(name, value),
                META_GONE => Change::MetaGone(name),
                SEGMENT => Change::Segment(name, first, value),
                SEGMENT_GONE => Change::SegmentGone(name, first),
                SEGMENT_APPEND => Change::SegmentAppend(name, first, value),
                _ => return None,
            };
            Some((change, rest))
        })();
        match change {
            Some((change, rest)) => {
                payload = rest;
                Some(Some(change))
            }
            None => {
                payload = &[];
                Some(None)
            }
        }
    })
}

/// The journal's files, one of them open for appending records.
#[derive(Debug)]
pub(crate) struct Journal {
    files: [File; 2],
    /// The file records go to.
    current: usize,
    /// Where the next record goes in it (the file position is kept there).
    end: u64,
    /// Where the last record written starts, while it may still be taken back.
    last_at: Option<u64>,
    /// The number the next record gets.
    next: u64,
    /// When the first record in the current file was written.
    since: Option<Instant>,
    /// The record being written (reused).
    buf: Vec<u8>,
    /// The other file holds nothing the tables on disk lack (false after a failure, until a
    /// durable commit lets the journal start over).
    other_free: bool,
}

/// Opens (creating if need be) one journal file.
fn open_file(path: &Path) -> io::Result<File> {
    let existed = path.exists();
    let file = File::options().read(true).write(true).create(true).truncate(false).open(path)?;
    if !existed && let Some(dir) = path.parent() {
        // The new file's directory entry.
        File::open(dir)?.sync_all()?;
    }
    Ok(file)
}

impl Journal {
    /// Opens (creating if need be) the journal's files in `dir`; call [`Journal::records`]
    /// and then [`Journal::restart`] before appending.
    pub(crate) fn open(dir: &Path) -> io::Result<Journal> {
        let files =
            [open_file(&dir.join(JOURNAL_FILES[0]))?, open_file(&dir.join(JOURNAL_FILES[1]))?];
        Ok(Journal {
            files,
            current: 0,
            end: 0,
            last_at: None,
            next: 1,
            since: None,
            buf: Vec::new(),
            other_free: false,
        })
    }

    /// The readable records of both files, (number, payload), by number. Each file's run of
    /// consecutive records from its start; older ones are for the caller to skip.
    pub(crate) fn records(&mut self) -> io::Result<Vec<(u64, Vec<u8>)>> {
        let mut out = Vec::new();
        for mut file in &self.files {
            let mut all = Vec::new();
            file.seek(SeekFrom::Start(0))?;
            file.read_to_end(&mut all)?;
            let mut rest = all.as_slice();
            let mut expect: Option<u64> = None;
            while let Some((lsn, payload, after)) = parse(rest) {
                if expect.is_some_and(|n| n != lsn) {
                    break;
                }
                expect = lsn.checked_add(1);
                out.push((lsn, payload.to_vec()));
                rest = after;
            }
        }
        out.sort_by_key(|r| r.0);
        out.dedup_by_key(|r| r.0);
        Ok(out)
    }

    /// Starts writing from the beginning of the current file, the next record numbered
    /// `after + 1` (after a durable commit: the tables on disk hold everything up to `after`,
    /// so neither file holds anything still needed).
    pub(crate) fn restart(&mut self, after: u64) -> io::Result<()> {
        self.next = after.saturating_add(1);
        self.other_free = true;
        self.begin_file()
    }

    /// The tables on disk may lack records of either file: neither may be written over until
    /// the next [`Journal::restart`].
    pub(crate) fn keep_both(&mut self) {
        self.other_free = false;
    }

    /// [`Journal::switch`] may be used: the other file holds nothing still needed.
    pub(crate) fn can_switch(&self) -> bool {
        self.other_free
    }

    /// Moves on to the other file (a checkpoint of everything up to [`Journal::last`] has
    /// started; the file left must be kept until it is durable).
    pub(crate) fn switch(&mut self) -> io::Result<()> {
        if !self.other_free {
            return Err(io::Error::other("the other journal file is still needed"));
        }
        self.current = 1 - self.current;
        // The file left is needed until the checkpoint that started is durable; the caller
        // says so with `restart` or `checkpointed`.
        self.other_free = false;
        self.begin_file()
    }

    /// The checkpoint started at the last [`Journal::switch`] is durable: the other file is
    /// free again.
    pub(crate) fn checkpointed(&mut self) {
        self.other_free = true;
    }

    fn begin_file(&mut self) -> io::Result<()> {
        self.files[self.current].seek(SeekFrom::Start(0))?;
        self.end = 0;
        self.last_at = None;
        self.since = None;
        Ok(())
    }

    /// The number of the last record written (0 when none ever was).
    pub(crate) fn last(&self) -> u64 {
        self.next - 1
    }

    /// The number the next record will get.
    pub(crate) fn next(&self) -> u64 {
        self.next
    }

    /// Appends `redo` as the next record and syncs it. On failure the record is made
    /// unreadable (as far as the disk lets), so a restart does not replay a change its asker
    /// was told had failed.
    pub(crate) fn append(&mut self, redo: &Redo) -> io::Result<u64> {
        let lsn = self.next;
        self.buf.clear();
        self.buf
            .extend_from_slice(&u32::try_from(redo.buf.len()).unwrap_or(u32::MAX).to_le_bytes());
        self.buf.extend_from_slice(&checksum(lsn, &redo.buf).to_le_bytes());
        self.buf.extend_from_slice(&lsn.to_le_bytes());
        self.buf.extend_from_slice(&redo.buf);
        let at = self.end;
        let mut file = &self.files[self.current];
        let written = file.write_all(&self.buf).and_then(|()| file.sync_data());
        if let Err(e) = written {
            self.last_at = Some(at);
            // Best effort: the original error is the one to report.
            let _ = self.retract();
            return Err(e);
        }
        self.end = at + self.buf.len() as u64;
        self.last_at = Some(at);
        self.next += 1;
        self.since.get_or_insert_with(Instant::now);
        Ok(lsn)
    }

    /// Takes back the last record (its transaction did not commit): overwrites its header with
    /// zeros, syncs, and writes the next record in its place.
    pub(crate) fn retract(&mut self) -> io::Result<()> {
        let Some(at) = self.last_at.take() else { return Ok(()) };
        if at < self.end {
            self.next -= 1;
        }
        self.end = at;
        let mut file = &self.files[self.current];
        file.seek(SeekFrom::Start(at))?;
        file.write_all(&[0u8; HEADER])?;
        file.sync_data()?;
        file.seek(SeekFrom::Start(at))?;
        Ok(())
    }

    /// Records in the current file wait for a checkpoint.
    pub(crate) fn pending(&self) -> bool {
        self.since.is_some()
    }

    /// How long until the records waiting make a checkpoint due by age (`None`: none wait).
    pub(crate) fn due_in(&self) -> Option<Duration> {
        self.since.map(|t| CHECKPOINT_AGE.saturating_sub(t.elapsed()))
    }

    /// A checkpoint is due (by size or by age).
    pub(crate) fn due(&self) -> bool {
        self.end >= CHECKPOINT_BYTES || self.due_in().is_some_and(|d| d.is_zero())
    }
}

fn checksum(lsn: u64, payload: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&lsn.to_le_bytes());
    hasher.update(payload);
    hasher.finalize()
}

/// The record at the start of `bytes`, if it is whole and its checksum holds: (number,
/// payload, what follows).
fn parse(bytes: &[u8]) -> Option<(u64, &[u8], &[u8])> {
    let (header, rest) = bytes.split_at_checked(HEADER)?;
    let len = u32::from_le_bytes(header.get(..4)?.try_into().ok()?) as usize;
    let crc = u32::from_le_bytes(header.get(4..8)?.try_into().ok()?);
    let lsn = u64::from_le_bytes(header.get(8..16)?.try_into().ok()?);
    let (payload, after) = rest.split_at_checked(len)?;
    (lsn != 0 && checksum(lsn, payload) == crc).then_some((lsn, payload, after))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The numbers of the records the journal at `path` holds, as a new open reads them.
    fn numbers(path: &std::path::Path) -> Vec<u64> {
        Journal::open(path).unwrap().records().unwrap().iter().map(|r| r.0).collect()
    }

    fn redo(i: u64) -> Redo {
        let mut r = Redo::default();
        r.segment("bob", i, format!("segment {i}").as_bytes());
        r.meta("bob", &i.to_le_bytes());
        r
    }

    #[test]
    fn changes_round_trip() {
        let mut r = Redo::default();
        r.name("alice", b"record");
        r.meta("bob", b"counts");
        r.meta_gone("carol");
        r.segment("bob", 7, b"seg");
        r.segment_gone("bob", 3);
        r.segment_append("bob", 9, b"more");
        let got: Vec<_> = changes(&r.buf).collect();
        assert_eq!(
            got,
            vec![
                Some(Change::Name("alice", b"record")),
                Some(Change::Meta("bob", b"counts")),
                Some(Change::MetaGone("carol")),
                Some(Change::Segment("bob", 7, b"seg")),
                Some(Change::SegmentGone("bob", 3)),
                Some(Change::SegmentAppend("bob", 9, b"more")),
            ]
        );
        // A cut record decodes as a prefix of the changes, then `None` unless the cut fell
        // between two changes.
        for cut in 1..r.buf.len() {
            let all: Vec<_> = changes(&r.buf[..cut]).collect();
            let whole = all.iter().take_while(|c| c.is_some()).count();
            assert!(whole < got.len(), "cut at {cut}");
            assert_eq!(all[..whole], got[..whole], "cut at {cut}");
            assert!(all.len() == whole || all.len() == whole + 1, "cut at {cut}");
        }
    }

    #[test]
    fn records_survive_a_reopen_and_a_restart_hides_the_old_ones() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path();
        let mut j = Journal::open(path).unwrap();
        assert!(j.records().unwrap().is_empty(), "a new journal holds nothing");
        j.restart(0).unwrap();
        for i in 1..=5 {
            assert_eq!(j.append(&redo(i)).unwrap(), i);
        }
        drop(j);
        let mut j = Journal::open(path).unwrap();
        let got = j.records().unwrap();
        assert_eq!(got.iter().map(|r| r.0).collect::<Vec<_>>(), vec![1, 2, 3, 4, 5]);
        assert_eq!(got[2].1, redo(3).buf);
        // A checkpoint at 5: the next records overwrite the start; what follows them is older
        // and is not read.
        j.restart(5).unwrap();
        j.append(&redo(6)).unwrap();
        drop(j);
        let mut j = Journal::open(path).unwrap();
        let got = j.records().unwrap();
        assert_eq!(got.iter().map(|r| r.0).collect::<Vec<_>>(), vec![6]);
    }

    #[test]
    fn records_of_both_files_are_read_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path();
        let mut j = Journal::open(path).unwrap();
        j.restart(0).unwrap();
        for i in 1..=3 {
            j.append(&redo(i)).unwrap();
        }
        // A checkpoint up to 3 starts: 4 and 5 go to the other file.
        j.switch().unwrap();
        for i in 4..=5 {
            j.append(&redo(i)).unwrap();
        }
        assert_eq!(numbers(path), vec![1, 2, 3, 4, 5]);
        // Not before that checkpoint is durable.
        assert!(j.switch().is_err());
        j.checkpointed();
        // The next checkpoint (up to 5) reuses the first file from its start.
        j.switch().unwrap();
        j.append(&redo(6)).unwrap();
        assert_eq!(numbers(path), vec![4, 5, 6]);
    }

    #[test]
    fn a_retracted_record_is_not_read_and_its_number_is_reused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path();
        let mut j = Journal::open(path).unwrap();
        j.restart(10).unwrap();
        j.append(&redo(1)).unwrap();
        j.append(&redo(2)).unwrap();
        j.retract().unwrap();
        assert_eq!(j.last(), 11);
        assert_eq!(numbers(path), vec![11]);
        assert_eq!(j.append(&redo(3)).unwrap(), 12);
        let got = Journal::open(path).unwrap().records().unwrap();
        assert_eq!(got.iter().map(|r| r.0).collect::<Vec<_>>(), vec![11, 12]);
        assert_eq!(got[1].1, redo(3).buf);
    }

    #[test]
    fn a_torn_or_damaged_tail_ends_the_records() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path();
        let mut j = Journal::open(path).unwrap();
        j.restart(0).unwrap();
        for i in 1..=3 {
            j.append(&redo(i)).unwrap();
        }
        let end = j.end;
        drop(j);
        let file = path.join(JOURNAL_FILES[0]);
        let mut bytes = std::fs::read(&file).unwrap();
        // Damage one byte of the third record's payload.
        bytes[end as usize - 2] ^= 0xff;
        std::fs::write(&file, &bytes).unwrap();
        assert_eq!(numbers(path), vec![1, 2]);
        // Cut inside the second record: only the first is whole.
        let first_len = HEADER + redo(1).buf.len();
        std::fs::write(&file, &bytes[..first_len + 5]).unwrap();
        assert_eq!(numbers(path), vec![1]);
    }
}
