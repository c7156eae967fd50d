//! Every limit and timeout the server enforces, with its default, in one place.

use std::path::PathBuf;
use std::time::Duration;

use crate::inbox::InboxLimits;
use relay_proto::{AuthMode, DEFAULT_MAX_FRAME_LEN, FRAME_HEADER_LEN, PRE_REGISTER_MAX_FRAME_LEN};

/// Server limits. `Config::default()` gives the documented defaults; each has a command-line
/// flag on `relay-server`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// Largest frame body a registered client may send or be sent (default 64 KiB; a power of
    /// two from 256 B to 16 MiB). A longer frame closes the connection with `FrameTooLarge`.
    pub max_frame_len: usize,
    /// Largest frame body accepted before a client has registered (default 1 KiB, and never
    /// more than `max_frame_len`), so a socket that sends one huge length header cannot make
    /// the server reserve a large buffer.
    pub pre_register_max_frame_len: usize,
    /// How long a new connection has to register (default 5 s).
    pub register_timeout: Duration,
    /// After this long without hearing from a client the server pings it (default 30 s).
    pub ping_interval: Duration,
    /// A client that sends nothing, not even a pong, for this long is disconnected and its
    /// name freed (default 60 s). This bounds how long a dead peer holds its name.
    pub idle_timeout: Duration,
    /// Bytes of encoded frames that may wait to be written to one client (default 1 MiB).
    pub outbox_bytes: usize,
    /// How long a message for a client whose outbox is full waits for room (default 1 s).
    /// Meanwhile its sender's connection reads nothing, so a sender that outruns a receiver
    /// is slowed to the receiver's pace instead of losing messages. If no room comes, the
    /// message is refused with `NotDelivered`, and so are further messages to that receiver,
    /// without waiting, until it takes bytes again.
    pub send_wait: Duration,
    /// A client whose socket accepts no bytes for this long while the server has data for it
    /// is disconnected as a slow consumer (default 10 s).
    pub write_timeout: Duration,
    /// A frame that has started must finish within this long (default 10 s); a client that
    /// trickles bytes is disconnected with `FrameTimeout`. Only whole frames count as signs
    /// of life for the idle timeout.
    pub frame_timeout: Duration,
    /// Most connections served at once (default 10,000). Further connections get `ServerFull`.
    pub max_clients: usize,
    /// On shutdown, how long clients get to receive what is queued for them and the shutdown
    /// notice before their connections are dropped (default 5 s).
    pub shutdown_timeout: Duration,
    /// Most connections one address (an IPv4 address, or an IPv6 /64) may hold open
    /// (default 64); beyond, `ServerFull` with the reason.
    pub max_per_address: usize,
    /// New connections one address may open per second, as a burst of that many refilled
    /// over a second (default 20); faster ones get `ServerFull` with the reason.
    pub connects_per_sec: u32,
    /// Whether loopback addresses are exempt from the per-address limits (default yes).
    pub loopback_exempt: bool,
    /// Most users one listing gives (default 1,000); a longer one is paged (the client asks
    /// for the next page after the last name it got).
    pub list_page: usize,
    /// User listings a connection may ask for in a burst (default 5)...
    pub list_burst: u32,
    /// ...and then one more each this often (default 1 s); over that, `RateLimited`.
    pub list_interval: Duration,
    /// Whether names are bound to keys (default [`AuthMode::Optional`]: keys bind names,
    /// guests may use names no key holds). [`AuthMode::None`] stores nothing.
    pub auth: AuthMode,
    /// Where the name table lives (default `./relay-data`; created on start). Unused with
    /// [`AuthMode::None`].
    pub data_dir: PathBuf,
    /// Limits on messages stored for offline users: per inbox (default 10,000 messages and
    /// 64 MiB), for the whole store (default 1 GiB), and by age (default 7 days).
    pub inbox: InboxLimits,
    /// Bytes held for messages delivered to a keyed client and not yet acknowledged (default
    /// 2 MiB): the frames are kept as the writer wrote them, so replies written in the same
    /// batch count too. Past it, messages for it wait for acknowledgements as for room in its
    /// outbox.
    pub unacked_window: usize,
    /// How often stored messages past the age limit are removed (default 1 min).
    pub inbox_sweep: Duration,
    /// Bytes the kernel may hold unsent for one client (`TCP_NOTSENT_LOWAT`), so a client
    /// that does not read backs up into its outbox, where the outbox limit and the write
    /// timeout see it, instead of into kernel memory (up to the kernel's 4 MiB send buffer
    /// otherwise: 2.8 MB measured for a client that reads nothing, 1 MiB with a 1 MiB bound).
    /// Default 1 MiB. 0: the kernel's own sizing. The bound costs nothing until a client falls
    /// that far behind; a saturated server pays for it (the kernel signals write space more
    /// often): about 20 ns more server CPU per 64 B message on pairs, fan-in 2–8 % slower at
    /// 1 MiB, 10–19 % at 256 KiB.
    pub kernel_unsent: usize,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            max_frame_len: DEFAULT_MAX_FRAME_LEN,
            pre_register_max_frame_len: PRE_REGISTER_MAX_FRAME_LEN,
            register_timeout: Duration::from_secs(5),
            ping_interval: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(60),
            outbox_bytes: 1024 * 1024,
            send_wait: Duration::from_secs(1),
            write_timeout: Duration::from_secs(10),
            frame_timeout: Duration::from_secs(10),
            max_clients: 10_000,
            shutdown_timeout: Duration::from_secs(5),
            max_per_address: 64,
            connects_per_sec: 20,
            loopback_exempt: true,
            list_page: 1000,
            list_burst: 5,
            list_interval: Duration::from_secs(1),
            auth: AuthMode::Optional,
            data_dir: PathBuf::from("relay-data"),
            inbox: InboxLimits::default(),
            unacked_window: 2 * 1024 * 1024,
            inbox_sweep: Duration::from_secs(60),
            kernel_unsent: 1024 * 1024,
        }
    }
}

impl Config {
    /// The frame limit before registering: the configured one, capped by the frame limit
    /// (so `--max-frame 256` works with the 1 KiB default).
    pub fn pre_register_limit(&self) -> usize {
        self.pre_register_max_frame_len.min(self.max_frame_len)
    }

    /// Checks that the limits make sense together.
    ///
    /// # Errors
    /// A message naming the first bad setting.
    pub fn validate(&self) -> Result<(), String> {
        relay_proto::check_max_frame_len(self.max_frame_len)?;
        relay_proto::check_max_frame_len(self.pre_register_max_frame_len)
            .map_err(|e| format!("pre-register limit: {e}"))?;
        if self.outbox_bytes < self.max_frame_len + FRAME_HEADER_LEN {
            return Err(format!(
                "the outbox ({} bytes) must hold at least one largest frame ({} bytes)",
                self.outbox_bytes,
                self.max_frame_len + FRAME_HEADER_LEN
            ));
        }
        if self.unacked_window < self.max_frame_len + FRAME_HEADER_LEN {
            return Err(format!(
                "the unacknowledged window ({} bytes) must hold at least one largest frame",
                self.unacked_window
            ));
        }
        if self.inbox.messages == 0 || self.inbox.bytes == 0 || self.inbox.store_bytes == 0 {
            return Err("the inbox limits must be at least 1".into());
        }
        if self.max_per_address == 0 || self.connects_per_sec == 0 {
            return Err("the per-address limits must be at least 1".into());
        }
        if self.list_page == 0 || self.list_burst == 0 {
            return Err("the list page and the list burst must be at least 1".into());
        }
        if self.max_clients == 0 {
            return Err("max clients must be at least 1".into());
        }
        for (name, d) in [
            ("register timeout", self.register_timeout),
            ("ping interval", self.ping_interval),
            ("idle timeout", self.idle_timeout),
            ("write timeout", self.write_timeout),
            ("inbox sweep", self.inbox_sweep),
            ("frame timeout", self.frame_timeout),
        ] {
            if d.is_zero() {
                return Err(format!("{name} must be more than zero"));
            }
        }
        if self.ping_interval >= self.idle_timeout {
            return Err("the ping interval must be shorter than the idle timeout".into());
        }
        Ok(())
    }
}

/// Parses a duration written as a number with a unit: `500ms`, `5s`, `2m` (a bare number is
/// seconds).
///
/// # Errors
/// A message naming the accepted forms.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: f64 =
        number.parse().map_err(|_| format!("'{text}' is not a duration like 500ms, 5s or 2m"))?;
    let seconds = match unit {
        "ms" => value / 1000.0,
        "" | "s" => value,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        "d" => value * 86_400.0,
        _ => return Err(format!("'{text}' has an unknown unit; use ms, s, m, h or d")),
    };
    Duration::try_from_secs_f64(seconds).map_err(|e| format!("'{text}': {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        assert_eq!(Config::default().validate(), Ok(()));
    }

    #[test]
    fn bad_settings_are_named() {
        let bad = Config { max_frame_len: 100_000, ..Config::default() };
        assert!(bad.validate().unwrap_err().contains("power of two"));
        let bad = Config { outbox_bytes: 1000, ..Config::default() };
        assert!(bad.validate().unwrap_err().contains("outbox"));
        let bad = Config { ping_interval: Duration::from_secs(90), ..Config::default() };
        assert!(bad.validate().unwrap_err().contains("ping interval"));
        let bad = Config { max_clients: 0, ..Config::default() };
        assert!(bad.validate().is_err());
    }

    #[test]
    fn the_smallest_frame_limits_are_accepted() {
        for max_frame_len in [256, 512] {
            let config = Config { max_frame_len, ..Config::default() };
            assert_eq!(config.validate(), Ok(()));
            assert_eq!(config.pre_register_limit(), max_frame_len);
        }
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("5"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("0.25s"), Ok(Duration::from_millis(250)));
        assert!(parse_duration("soon").is_err());
        assert_eq!(parse_duration("7d"), Ok(Duration::from_secs(7 * 86_400)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert!(parse_duration("5y").is_err());
        assert!(parse_duration("").is_err());
    }
}
