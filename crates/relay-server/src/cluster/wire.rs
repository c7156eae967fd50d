//! What nodes send each other over NATS, and what they keep in its key-value buckets, byte for
//! byte.
//!
//! Everything here arrives from the network (through the NATS server), so it is decoded within
//! bounds and never trusted to be well formed: a record that does not decode is dropped with a
//! log line, never a panic. Integers are little-endian; a string is a `u16` length and UTF-8.
//! The first byte of every value is its layout version, so a later layout can be told apart.
//!
//! The chat message a [`Record::Deliver`] carries is a relay frame body in the version 2 layout
//! (`relay_proto`'s encoding module), so the protocol's encoding still lives in one place.

use std::net::SocketAddr;

use bytes::{BufMut, Bytes, BytesMut};

/// The layout version of every record and value below, but for a [`Batch`] head.
const LAYOUT: u8 = 1;

/// The layout version of a [`Batch`] head: 2 since it carries a deadline. Nodes exchanging
/// messages must agree on it; the values in the buckets keep [`LAYOUT`], so nodes of this
/// version read what nodes of the version before wrote there.
const HEAD_LAYOUT: u8 = 2;

/// The head of every NATS message on a node's subject: who sent it, its number among the
/// messages that node sent this one (1, 2, ...), which the receiver acknowledges, and until
/// when its chat messages may still be delivered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Batch {
    /// The sending node.
    pub(crate) node: String,
    /// Its incarnation.
    pub(crate) incarnation: u64,
    /// The message's number.
    pub(crate) number: u64,
    /// Its chat messages are delivered only until then (ms since the Unix epoch, on the
    /// sending node's clock; 0: no limit). Past it, the sender has told or will tell their
    /// senders they were not delivered, so the receiver drops them and reports the number
    /// as never received.
    pub(crate) deliver_by: u64,
}

impl Batch {
    /// Starts a NATS message's payload with this head.
    pub(crate) fn encode_into(&self, out: &mut BytesMut) {
        out.put_u8(HEAD_LAYOUT);
        put_str(out, &self.node);
        out.put_u64_le(self.incarnation);
        out.put_u64_le(self.number);
        out.put_u64_le(self.deliver_by);
    }

    /// The head of a payload, and where its records start.
    pub(crate) fn decode(payload: &[u8]) -> Result<(Batch, usize), Malformed> {
        let mut r = Reader(payload);
        if r.u8()? != HEAD_LAYOUT {
            return Err(Malformed);
        }
        let batch = Batch {
            node: r.str()?.to_owned(),
            incarnation: r.u64()?,
            number: r.u64()?,
            deliver_by: r.u64()?,
        };
        Ok((batch, payload.len() - r.0.len()))
    }
}

/// One node-to-node record. A NATS message on a node's subject carries a [`Batch`] head and
/// one or more records, each prefixed by its length (`u32`), so a busy link sends many in one
/// NATS message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Record<'a> {
    /// A chat message for `recipient` (a canonical name) online at the receiving node.
    Deliver {
        /// The recipient's canonical name.
        recipient: &'a str,
        /// Who sent it, for replies about it.
        origin: Origin<'a>,
        /// The frame body to deliver (version 2 layout).
        body: &'a [u8],
    },
    /// A reply or receipt for a sender online at the receiving node.
    Tell {
        /// The sender's canonical name.
        canonical: &'a str,
        /// Its registration (a guest is told only while that registration lasts).
        token: u64,
        /// A keyed sender is told whichever of its sessions is online.
        keyed: bool,
        /// The frame body to push (version 2 layout; the receiving node re-encodes it for a
        /// version 1 client).
        body: &'a [u8],
    },
    /// Disconnect `canonical`'s holder (registration `token`, or any if 0), telling it
    /// `status` and `detail`: the operator's `kick`, or a guest displaced by a key holder.
    Evict {
        /// The holder's canonical name.
        canonical: &'a str,
        /// Its registration, or 0 for whoever holds the name.
        token: u64,
        /// The status of the closing reply (its index on the wire).
        status: u32,
        /// Its detail.
        detail: &'a str,
    },
    /// The receiving node has taken in every message numbered up to `upto` that the node
    /// `incarnation` (the receiver of this record) sent it, except those in `lost`, which
    /// never arrived.
    Ack {
        /// The incarnation the acknowledged messages came from.
        incarnation: u64,
        /// The highest message number taken in.
        upto: u64,
        /// The latest ranges of numbers that never arrived (a NATS connection that died with
        /// them in it): repeated in every acknowledgement, so one lost acknowledgement does
        /// not make them look delivered.
        lost: Gaps,
    },
}

/// Ranges of message numbers a node never received from another: the latest [`Gaps::MAX`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Gaps {
    ranges: [(u64, u64); Gaps::MAX],
    len: u8,
}

impl Gaps {
    /// How many ranges an acknowledgement carries.
    pub(crate) const MAX: usize = 4;

    /// Adds `from..=to`, forgetting the oldest range if there are [`Gaps::MAX`] already. A
    /// range that starts right after the latest one extends it (a run of dropped messages
    /// takes one range).
    pub(crate) fn push(&mut self, from: u64, to: u64) {
        let len = usize::from(self.len);
        if let Some(last) = len.checked_sub(1).and_then(|i| self.ranges.get_mut(i))
            && last.1.checked_add(1) == Some(from)
        {
            last.1 = to;
            return;
        }
        if len == Gaps::MAX {
            self.ranges.rotate_left(1);
            self.ranges[Gaps::MAX - 1] = (from, to);
        } else {
            self.ranges[len] = (from, to);
            self.len += 1;
        }
    }

    /// Whether `number` is in one of the ranges.
    pub(crate) fn contains(&self, number: u64) -> bool {
        self.ranges[..usize::from(self.len)].iter().any(|&(from, to)| (from..=to).contains(&number))
    }

    #[cfg(test)]
    pub(crate) fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether a range ends at `number` or after it.
    pub(crate) fn reaches(&self, number: u64) -> bool {
        self.ranges[..usize::from(self.len)].iter().any(|&(_, to)| to >= number)
    }
}

/// The sender of a forwarded message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Origin<'a> {
    /// The node it is connected to.
    pub(crate) node: &'a str,
    /// Its canonical name.
    pub(crate) canonical: &'a str,
    /// Its registration on that node.
    pub(crate) token: u64,
    /// Its name is bound to a key.
    pub(crate) keyed: bool,
    /// It speaks version 2 (it knows `Stored`, receipts and the like).
    pub(crate) v2: bool,
}

const DELIVER: u8 = 1;
const TELL: u8 = 2;
const EVICT: u8 = 3;
const ACK: u8 = 4;

/// A record could not be decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("malformed cluster record")]
pub(crate) struct Malformed;

/// Appends `s`, at most `u16::MAX` bytes of it (names and details are far shorter).
fn put_str(out: &mut BytesMut, s: &str) {
    let mut end = s.len().min(usize::from(u16::MAX));
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    out.put_u16_le(u16::try_from(end).unwrap_or(u16::MAX));
    out.put_slice(&s.as_bytes()[..end]);
}

/// A [`Record::Deliver`] after its layout byte, up to its body.
fn put_deliver_head(out: &mut BytesMut, recipient: &str, origin: &Origin<'_>) {
    out.put_u8(DELIVER);
    put_str(out, recipient);
    put_str(out, origin.node);
    put_str(out, origin.canonical);
    out.put_u64_le(origin.token);
    out.put_u8(u8::from(origin.keyed) | u8::from(origin.v2) << 1);
}

/// Reads what [`put_str`] wrote and the rest of the bytes.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn bytes(&mut self, n: usize) -> Result<&'a [u8], Malformed> {
        let (head, rest) = self.0.split_at_checked(n).ok_or(Malformed)?;
        self.0 = rest;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, Malformed> {
        Ok(self.bytes(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, Malformed> {
        Ok(u16::from_le_bytes(self.bytes(2)?.try_into().map_err(|_| Malformed)?))
    }

    fn u32(&mut self) -> Result<u32, Malformed> {
        Ok(u32::from_le_bytes(self.bytes(4)?.try_into().map_err(|_| Malformed)?))
    }

    fn u64(&mut self) -> Result<u64, Malformed> {
        Ok(u64::from_le_bytes(self.bytes(8)?.try_into().map_err(|_| Malformed)?))
    }

    fn str(&mut self) -> Result<&'a str, Malformed> {
        let len = usize::from(self.u16()?);
        std::str::from_utf8(self.bytes(len)?).map_err(|_| Malformed)
    }

    fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.0)
    }

    fn rest_len(&self) -> usize {
        self.0.len()
    }
}

impl<'a> Record<'a> {
    /// Appends the record, prefixed by its length, to a NATS message's payload.
    pub(crate) fn encode_into(&self, out: &mut BytesMut) {
        let start = out.len();
        out.put_u32_le(0);
        out.put_u8(LAYOUT);
        match self {
            Record::Deliver { recipient, origin, body } => {
                put_deliver_head(out, recipient, origin);
                out.put_slice(body);
            }
            Record::Tell { canonical, token, keyed, body } => {
                out.put_u8(TELL);
                put_str(out, canonical);
                out.put_u64_le(*token);
                out.put_u8(u8::from(*keyed));
                out.put_slice(body);
            }
            Record::Evict { canonical, token, status, detail } => {
                out.put_u8(EVICT);
                put_str(out, canonical);
                out.put_u64_le(*token);
                out.put_u32_le(*status);
                put_str(out, detail);
            }
            Record::Ack { incarnation, upto, lost } => {
                out.put_u8(ACK);
                out.put_u64_le(*incarnation);
                out.put_u64_le(*upto);
                out.put_u8(lost.len);
                for &(from, to) in &lost.ranges[..usize::from(lost.len)] {
                    out.put_u64_le(from);
                    out.put_u64_le(to);
                }
            }
        }
        let len = u32::try_from(out.len() - start - 4).unwrap_or(u32::MAX);
        out[start..start + 4].copy_from_slice(&len.to_le_bytes());
    }

    /// Appends a [`Record::Deliver`] of `msg` (encoded here in the version 2 layout, with no
    /// copy of its body in between), prefixed by its length. `Err` if `msg` does not encode.
    pub(crate) fn encode_deliver(
        out: &mut BytesMut,
        recipient: &str,
        origin: &Origin<'_>,
        msg: &relay_proto::MessageRef<'_>,
    ) -> Result<(), relay_proto::ProtoError> {
        let start = out.len();
        out.reserve(48 + recipient.len() + origin.node.len() + origin.canonical.len());
        out.put_u32_le(0);
        out.put_u8(LAYOUT);
        put_deliver_head(out, recipient, origin);
        let msg =
            relay_proto::MessageRef { version: relay_proto::PROTOCOL_VERSION, seq: 0, ..*msg };
        if let Err(e) = relay_proto::encode_body_ref(&msg, out) {
            out.truncate(start);
            return Err(e);
        }
        let len = u32::try_from(out.len() - start - 4).unwrap_or(u32::MAX);
        out[start..start + 4].copy_from_slice(&len.to_le_bytes());
        Ok(())
    }

    /// Every record in a NATS message's payload, in order. Stops at the first that does not
    /// decode (what follows cannot be framed reliably).
    pub(crate) fn decode_all(
        payload: &'a [u8],
        start: usize,
    ) -> (Vec<Record<'a>>, Option<Malformed>) {
        let mut records = Vec::new();
        let mut at = start;
        while at < payload.len() {
            let mut reader = Reader(&payload[at..]);
            let Ok(len) = reader.u32().map(|len| len as usize) else {
                return (records, Some(Malformed));
            };
            let Some(end) = (at + 4).checked_add(len).filter(|&end| end <= payload.len()) else {
                return (records, Some(Malformed));
            };
            match Record::decode(&payload[at + 4..end]) {
                Ok(record) => records.push(record),
                Err(e) => return (records, Some(e)),
            }
            at = end;
        }
        (records, None)
    }

    fn decode(bytes: &'a [u8]) -> Result<Record<'a>, Malformed> {
        let mut r = Reader(bytes);
        if r.u8()? != LAYOUT {
            return Err(Malformed);
        }
        let record = match r.u8()? {
            DELIVER => {
                let recipient = r.str()?;
                let node = r.str()?;
                let canonical = r.str()?;
                let token = r.u64()?;
                let flags = r.u8()?;
                let origin =
                    Origin { node, canonical, token, keyed: flags & 1 != 0, v2: flags & 2 != 0 };
                Record::Deliver { recipient, origin, body: r.rest() }
            }
            TELL => {
                let canonical = r.str()?;
                let token = r.u64()?;
                let keyed = r.u8()? != 0;
                Record::Tell { canonical, token, keyed, body: r.rest() }
            }
            EVICT => {
                let canonical = r.str()?;
                let token = r.u64()?;
                let status = r.u32()?;
                let detail = r.str()?;
                Record::Evict { canonical, token, status, detail }
            }
            ACK => {
                let (incarnation, upto) = (r.u64()?, r.u64()?);
                let mut lost = Gaps::default();
                // A node from before gaps were reported sends none.
                let count = if r.rest_len() == 0 { 0 } else { usize::from(r.u8()?) };
                if count > Gaps::MAX {
                    return Err(Malformed);
                }
                for _ in 0..count {
                    lost.push(r.u64()?, r.u64()?);
                }
                Record::Ack { incarnation, upto, lost }
            }
            _ => return Err(Malformed),
        };
        Ok(record)
    }
}

/// Who holds a name online, as kept in the presence bucket (its key is the name's skeleton,
/// so look-alikes collide there too).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Presence {
    /// The node the holder is connected to.
    pub(crate) node: String,
    /// That node's incarnation: a node restarted under the same name holds none of the
    /// names its previous run held.
    pub(crate) incarnation: u64,
    /// The registration on that node.
    pub(crate) token: u64,
    /// A guest (no key): a key holder of the name displaces it.
    pub(crate) guest: bool,
    /// When it registered, in ms since the Unix epoch.
    pub(crate) since: u64,
    /// The client's address.
    pub(crate) addr: SocketAddr,
    /// The canonical name.
    pub(crate) canonical: String,
    /// The name as shown.
    pub(crate) display: String,
    /// The client's protocol version.
    pub(crate) version: u16,
}

impl Presence {
    /// The bucket value.
    pub(crate) fn encode(&self) -> Bytes {
        let mut out = BytesMut::with_capacity(64 + self.canonical.len() + self.display.len());
        out.put_u8(LAYOUT);
        put_str(&mut out, &self.node);
        out.put_u64_le(self.incarnation);
        out.put_u64_le(self.token);
        out.put_u8(u8::from(self.guest));
        out.put_u64_le(self.since);
        put_str(&mut out, &self.addr.to_string());
        put_str(&mut out, &self.canonical);
        put_str(&mut out, &self.display);
        out.put_u16_le(self.version);
        out.freeze()
    }

    /// Reads a bucket value.
    pub(crate) fn decode(bytes: &[u8]) -> Result<Presence, Malformed> {
        let mut r = Reader(bytes);
        if r.u8()? != LAYOUT {
            return Err(Malformed);
        }
        Ok(Presence {
            node: r.str()?.to_owned(),
            incarnation: r.u64()?,
            token: r.u64()?,
            guest: r.u8()? != 0,
            since: r.u64()?,
            addr: r.str()?.parse().map_err(|_| Malformed)?,
            canonical: r.str()?.to_owned(),
            display: r.str()?.to_owned(),
            version: r.u16()?,
        })
    }
}

/// A node's lease, as kept in the nodes bucket under the node's name.
pub(crate) fn encode_lease(incarnation: u64) -> Bytes {
    let mut out = BytesMut::with_capacity(9);
    out.put_u8(LAYOUT);
    out.put_u64_le(incarnation);
    out.freeze()
}

/// The incarnation in a node's lease.
pub(crate) fn decode_lease(bytes: &[u8]) -> Result<u64, Malformed> {
    let mut r = Reader(bytes);
    if r.u8()? != LAYOUT {
        return Err(Malformed);
    }
    r.u64()
}

/// A key-value key for `s`: NATS keys allow only `[-/_=.a-zA-Z0-9]`, and names are Unicode,
/// so every byte is written as two hex digits behind `prefix`.
pub(crate) fn kv_key(prefix: &str, s: &str) -> String {
    use std::fmt::Write;
    let mut key = String::with_capacity(prefix.len() + 2 * s.len());
    key.push_str(prefix);
    for b in s.bytes() {
        let _ = write!(key, "{b:02x}");
    }
    key
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gaps(ranges: &[(u64, u64)]) -> Gaps {
        let mut gaps = Gaps::default();
        for &(from, to) in ranges {
            gaps.push(from, to);
        }
        gaps
    }

    /// Gaps keep the latest ranges; an acknowledgement from a node that reports none (an
    /// older one) reads as having none; more ranges than allowed is malformed.
    #[test]
    fn acknowledgements_carry_the_latest_gaps() {
        let g = gaps(&[(1, 1), (3, 4), (6, 6), (8, 9), (11, 20)]);
        assert!(!g.contains(1), "the oldest range is forgotten past the limit");
        assert!(g.contains(4) && g.contains(15) && !g.contains(5) && !g.contains(21));
        assert!(g.reaches(20) && !g.reaches(21) && !Gaps::default().reaches(0));
        // A run of single numbers (messages dropped one after another) takes one range.
        let run = gaps(&[(2, 2), (3, 3), (4, 6), (7, 7), (8, 8), (9, 9), (12, 12)]);
        assert!((2..=9).all(|n| run.contains(n)) && run.contains(12) && !run.contains(10));

        let mut old = BytesMut::new();
        old.put_u8(LAYOUT);
        old.put_u8(ACK);
        old.put_u64_le(5);
        old.put_u64_le(9);
        assert_eq!(
            Record::decode(&old),
            Ok(Record::Ack { incarnation: 5, upto: 9, lost: Gaps::default() })
        );
        let mut too_many = old.clone();
        too_many.put_u8(5);
        assert_eq!(Record::decode(&too_many), Err(Malformed));
    }

    fn origin() -> Origin<'static> {
        Origin { node: "n1", canonical: "alice", token: 7, keyed: true, v2: true }
    }

    #[test]
    fn records_round_trip_in_one_payload() {
        let records = vec![
            Record::Deliver { recipient: "bob", origin: origin(), body: b"frame" },
            Record::Tell { canonical: "ålice", token: 3, keyed: false, body: b"reply" },
            Record::Evict { canonical: "carol", token: 0, status: 24, detail: "bye" },
            Record::Ack { incarnation: 5, upto: 9, lost: Gaps::default() },
            Record::Ack { incarnation: 5, upto: 12, lost: gaps(&[(3, 4), (10, 11)]) },
        ];
        let head = Batch { node: "n1".into(), incarnation: 77, number: 3, deliver_by: 1234 };
        let mut payload = BytesMut::new();
        head.encode_into(&mut payload);
        for r in &records {
            r.encode_into(&mut payload);
        }
        let payload = payload.freeze();
        let (batch, start) = Batch::decode(&payload).unwrap();
        assert_eq!(batch, head);
        let (decoded, error) = Record::decode_all(&payload, start);
        assert_eq!(error, None);
        assert_eq!(decoded, records);
        // A head in the layout before the deadline (a node of the previous version) is not
        // misread: it is refused whole.
        let mut old = payload.to_vec();
        old[0] = 1;
        assert_eq!(Batch::decode(&old), Err(Malformed));
    }

    #[test]
    fn a_deliver_record_encoded_from_a_message_reads_back_as_one() {
        let msg = relay_proto::MessageRef::deliver(9, "alice", "bob", b"hi");
        let mut out = BytesMut::new();
        Record::encode_deliver(&mut out, "bob", &origin(), &msg).unwrap();
        let (records, error) = Record::decode_all(&out, 0);
        assert_eq!(error, None);
        let [Record::Deliver { recipient, origin: o, body }] = records[..] else {
            panic!("{records:?}")
        };
        assert_eq!((recipient, o), ("bob", origin()));
        let back = relay_proto::decode_ref(body).unwrap();
        assert_eq!((back.id, back.from, back.to, back.content), (9, "alice", "bob", &b"hi"[..]));
    }

    #[test]
    fn truncated_and_garbage_payloads_are_refused_without_panicking() {
        let mut payload = BytesMut::new();
        Record::Deliver { recipient: "bob", origin: origin(), body: b"" }.encode_into(&mut payload);
        let full = payload.freeze();
        for cut in 0..full.len() {
            let (records, error) = Record::decode_all(&full[..cut], 0);
            assert!(records.is_empty());
            assert_eq!(error.is_some(), cut > 0, "cut at {cut}");
        }
        // A length that points past the end, an unknown kind, an unknown layout.
        for bad in [&[255u8, 255, 255, 255, 1][..], &[2, 0, 0, 0, 1, 9], &[2, 0, 0, 0, 9, 1]] {
            let (records, error) = Record::decode_all(bad, 0);
            assert!(records.is_empty() && error.is_some());
        }
        assert!(Presence::decode(b"\x01\xff\xff").is_err());
        assert!(Batch::decode(b"\x01\x02\x00n").is_err());
        assert!(decode_lease(b"").is_err());
    }

    #[test]
    fn presence_and_lease_round_trip() {
        let p = Presence {
            node: "n2".into(),
            incarnation: 99,
            token: 5,
            guest: true,
            since: 1234,
            addr: "[::1]:4000".parse().unwrap(),
            canonical: "bob".into(),
            display: "Bob".into(),
            version: 2,
        };
        assert_eq!(Presence::decode(&p.encode()), Ok(p));
        assert_eq!(decode_lease(&encode_lease(42)), Ok(42));
    }

    #[test]
    fn keys_are_hex_behind_their_prefix() {
        assert_eq!(kv_key("on.", "bö"), "on.62c3b6");
    }
}
