//! The server's greeting (version 2): what it speaks, how it authenticates, the limits a
//! client must respect, and the nonce a key signs. It travels as the `content` of a
//! [`Kind::Greeting`](crate::Kind) message, as `key=value` lines of UTF-8 text, so a client in
//! any language reads it with a split; a reader ignores keys it does not know.

use std::time::Duration;

use crate::auth::{NONCE_LEN, hex};

/// Whether a server wants keys. See `relay-server --auth`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum AuthMode {
    /// No keys, nothing stored: every name is a guest name (protocol version 1 behaviour).
    None,
    /// Keys bind names; guests may use names no key holds (the default).
    Optional,
    /// Every registration must carry a key.
    Required,
}

impl AuthMode {
    /// The word used on the wire and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            AuthMode::None => "none",
            AuthMode::Optional => "optional",
            AuthMode::Required => "required",
        }
    }
}

impl std::str::FromStr for AuthMode {
    type Err = String;

    fn from_str(s: &str) -> Result<AuthMode, String> {
        match s {
            "none" => Ok(AuthMode::None),
            "optional" => Ok(AuthMode::Optional),
            "required" => Ok(AuthMode::Required),
            other => Err(format!("unknown auth mode '{other}'; use none, optional or required")),
        }
    }
}

/// The greeting's fields.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Greeting {
    /// Protocol versions the server speaks (`versions=1,2`).
    pub versions: Vec<u16>,
    /// How the server authenticates (`auth=optional`).
    pub auth: AuthMode,
    /// This connection's nonce, for the registration's signature (`nonce=` 64 hex digits).
    pub nonce: [u8; NONCE_LEN],
    /// Largest frame body after registering (`max_frame=65536`).
    pub max_frame_len: usize,
    /// Largest frame body before registering (`pre_register_max_frame=1024`).
    pub pre_register_max_frame_len: usize,
    /// Longest name in bytes (`max_name=64`).
    pub max_name_len: usize,
    /// Time left to register (`register_timeout_ms=5000`).
    pub register_timeout: Duration,
    /// The server pings a client quiet for this long (`ping_interval_ms=30000`).
    pub ping_interval: Duration,
    /// The server disconnects a client silent for this long (`idle_timeout_ms=60000`).
    pub idle_timeout: Duration,
}

impl Greeting {
    /// A greeting with these values.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        auth: AuthMode,
        nonce: [u8; NONCE_LEN],
        max_frame_len: usize,
        pre_register_max_frame_len: usize,
        register_timeout: Duration,
        ping_interval: Duration,
        idle_timeout: Duration,
    ) -> Greeting {
        Greeting {
            versions: vec![crate::MIN_PROTOCOL_VERSION, crate::PROTOCOL_VERSION],
            auth,
            nonce,
            max_frame_len,
            pre_register_max_frame_len,
            max_name_len: crate::MAX_NAME_LEN,
            register_timeout,
            ping_interval,
            idle_timeout,
        }
    }

    /// The greeting as message content: one `key=value` line per field.
    pub fn to_content(&self) -> String {
        let versions: Vec<String> = self.versions.iter().map(u16::to_string).collect();
        format!(
            "versions={}\nauth={}\nnonce={}\nmax_frame={}\npre_register_max_frame={}\n\
             max_name={}\nregister_timeout_ms={}\nping_interval_ms={}\nidle_timeout_ms={}\n",
            versions.join(","),
            self.auth.as_str(),
            hex(&self.nonce),
            self.max_frame_len,
            self.pre_register_max_frame_len,
            self.max_name_len,
            self.register_timeout.as_millis(),
            self.ping_interval.as_millis(),
            self.idle_timeout.as_millis(),
        )
    }

    /// Reads a greeting's content. Unknown keys are ignored; `versions`, `auth` and `nonce`
    /// are required, the limits default to the protocol's defaults.
    ///
    /// # Errors
    /// What is missing or malformed.
    pub fn parse(content: &[u8]) -> Result<Greeting, String> {
        let text = std::str::from_utf8(content).map_err(|_| "greeting is not UTF-8")?;
        let mut g = Greeting::new(
            AuthMode::Optional,
            [0; NONCE_LEN],
            crate::DEFAULT_MAX_FRAME_LEN,
            crate::PRE_REGISTER_MAX_FRAME_LEN,
            Duration::from_secs(5),
            Duration::from_secs(30),
            Duration::from_secs(60),
        );
        let (mut versions, mut auth, mut nonce) = (None, None, None);
        for line in text.lines().filter(|l| !l.is_empty()) {
            let Some((key, value)) = line.split_once('=') else {
                return Err(format!("greeting line without '=': {line:?}"));
            };
            let number = || value.parse::<u64>().map_err(|_| format!("greeting {key}={value:?}"));
            match key {
                "versions" => {
                    let parsed: Result<Vec<u16>, _> = value.split(',').map(str::parse).collect();
                    versions = Some(parsed.map_err(|_| format!("greeting versions={value:?}"))?);
                }
                "auth" => auth = Some(value.parse::<AuthMode>()?),
                "nonce" => nonce = Some(parse_hex::<NONCE_LEN>(value)?),
                "max_frame" => g.max_frame_len = usize::try_from(number()?).unwrap_or(usize::MAX),
                "pre_register_max_frame" => {
                    g.pre_register_max_frame_len = usize::try_from(number()?).unwrap_or(usize::MAX)
                }
                "max_name" => g.max_name_len = usize::try_from(number()?).unwrap_or(usize::MAX),
                "register_timeout_ms" => g.register_timeout = Duration::from_millis(number()?),
                "ping_interval_ms" => g.ping_interval = Duration::from_millis(number()?),
                "idle_timeout_ms" => g.idle_timeout = Duration::from_millis(number()?),
                _ => {}
            }
        }
        g.versions = versions.ok_or("greeting without versions")?;
        g.auth = auth.ok_or("greeting without auth")?;
        g.nonce = nonce.ok_or("greeting without nonce")?;
        Ok(g)
    }
}

fn parse_hex<const N: usize>(text: &str) -> Result<[u8; N], String> {
    let bad = || format!("expected {} hex digits, got {text:?}", N * 2);
    if text.len() != N * 2 || !text.is_ascii() {
        return Err(bad());
    }
    let mut out = [0; N];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_documented_text() {
        let g = Greeting::new(
            AuthMode::Optional,
            [0xab; 32],
            65536,
            1024,
            Duration::from_secs(5),
            Duration::from_secs(30),
            Duration::from_secs(60),
        );
        let text = g.to_content();
        assert_eq!(
            text,
            format!(
                "versions=1,2\nauth=optional\nnonce={}\nmax_frame=65536\n\
                 pre_register_max_frame=1024\nmax_name=64\nregister_timeout_ms=5000\n\
                 ping_interval_ms=30000\nidle_timeout_ms=60000\n",
                "ab".repeat(32)
            )
        );
        assert_eq!(Greeting::parse(text.as_bytes()).unwrap(), g);
        // Unknown keys are ignored; required ones are required.
        let extra = format!("{text}future=1\n");
        assert_eq!(Greeting::parse(extra.as_bytes()).unwrap(), g);
        assert!(Greeting::parse(b"versions=1,2\nauth=none\n").is_err());
        assert!(Greeting::parse(b"\xff").is_err());
        assert!(
            Greeting::parse(format!("versions=1\nauth=x\nnonce={}", "00".repeat(32)).as_bytes())
                .is_err()
        );
    }
}
