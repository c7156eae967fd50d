//! What every benchmark message carries at its start: who sent it, its sequence number and when
//! it was sent, so receivers can check order and measure one-way latency.

use std::time::Instant;

use bytes::{BufMut, Bytes};

/// Bytes the header takes; payloads are at least this long.
pub const HEADER_LEN: usize = 20;

/// A decoded header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// Index of the sending client.
    pub sender: u32,
    /// 0, 1, 2, ... per sender.
    pub seq: u64,
    /// Nanoseconds from the run's clock origin to the moment of sending.
    pub sent_ns: u64,
}

/// Nanoseconds since `origin` (saturating; runs are far shorter than 584 years).
pub fn nanos_since(origin: Instant) -> u64 {
    u64::try_from(origin.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

impl Header {
    /// A payload of `size` bytes (at least [`HEADER_LEN`]) starting with this header.
    pub fn payload(&self, size: usize) -> Bytes {
        let mut buf = vec![b'x'; size.max(HEADER_LEN)];
        self.write(&mut buf);
        Bytes::from(buf)
    }

    /// Writes the header over the start of `payload` (at least [`HEADER_LEN`] bytes long), so
    /// a sender can reuse one payload buffer for every message.
    pub fn write(&self, payload: &mut [u8]) {
        let mut at = &mut payload[..HEADER_LEN];
        at.put_u32_le(self.sender);
        at.put_u64_le(self.seq);
        at.put_u64_le(self.sent_ns);
    }

    /// The header at the start of `payload`, if it is long enough to have one.
    pub fn read(payload: &[u8]) -> Option<Header> {
        let sender = u32::from_le_bytes(payload.get(0..4)?.try_into().ok()?);
        let seq = u64::from_le_bytes(payload.get(4..12)?.try_into().ok()?);
        let sent_ns = u64::from_le_bytes(payload.get(12..20)?.try_into().ok()?);
        Some(Header { sender, seq, sent_ns })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips_and_pads() {
        let header = Header { sender: 7, seq: 1 << 40, sent_ns: 123_456_789 };
        let payload = header.payload(64);
        assert_eq!(payload.len(), 64);
        assert_eq!(Header::read(&payload), Some(header));
        assert_eq!(Header::read(&payload[..19]), None);
    }
}
