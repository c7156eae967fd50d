//! Key files: where a user's Ed25519 key for a name lives, and reading and creating it
//! safely (as ssh does: a key file anyone but its owner can read is refused).
//!
//! A key file is two lines of text:
//!
//! ```text
//! relay-key-v1 ed25519
//! <the 32-byte secret seed as 64 lower-case hex digits>
//! ```
//!
//! By default the key for a name is `$XDG_CONFIG_HOME/relay/keys/<name>.key` (or
//! `~/.config/relay/keys/<name>.key`), with the name in its canonical form, so `Alice` and
//! `alice` share a key.

use std::io::Write;
use std::path::{Path, PathBuf};

use relay_proto::{Identity, SEED_LEN, canonical_name, hex};

/// The first line of a key file.
const HEADER: &str = "relay-key-v1 ed25519";

/// Why a key file could not be used. Each message says what to do.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// The file could not be read or written.
    #[error("key file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// Others can read the file, so the key may be known to them.
    #[error(
        "key file {path} is readable by others (mode {mode:o}); refusing to use it. \
         Fix with: chmod 600 {path}"
    )]
    TooOpen {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The file is not a key file.
    #[error("{path} is not a relay key file (expected '{HEADER}' and a 64-digit hex seed)")]
    NotAKey {
        /// The file.
        path: PathBuf,
    },
    /// There is no config directory to keep keys in.
    #[error("no config directory for keys: set XDG_CONFIG_HOME or HOME, or give --key PATH")]
    NoConfigDir,
    /// The OS gave no randomness for a new key.
    #[error("cannot create a key: {0}")]
    Random(String),
}

/// The default key file for `name`, under the user's config directory.
///
/// # Errors
/// [`KeyError::NoConfigDir`] if neither `XDG_CONFIG_HOME` nor `HOME` is set.
pub fn default_key_path(name: &str) -> Result<PathBuf, KeyError> {
    let base = match std::env::var_os("XDG_CONFIG_HOME").filter(|v| !v.is_empty()) {
        Some(dir) => PathBuf::from(dir),
        None => match std::env::var_os("HOME").filter(|v| !v.is_empty()) {
            Some(home) => PathBuf::from(home).join(".config"),
            None => return Err(KeyError::NoConfigDir),
        },
    };
    Ok(base.join("relay").join("keys").join(format!("{}.key", file_stem(name))))
}

/// A file name for a user name: its canonical form, with anything but letters, digits, `.`,
/// `_` and `-` percent-encoded, so no name can reach outside the keys directory.
fn file_stem(name: &str) -> String {
    let mut stem = String::new();
    for c in canonical_name(name).chars() {
        if c.is_alphanumeric() || c == '_' || c == '-' || (c == '.' && !stem.is_empty()) {
            stem.push(c);
        } else {
            let mut buf = [0; 4];
            for b in c.encode_utf8(&mut buf).bytes() {
                stem.push_str(&format!("%{b:02X}"));
            }
        }
    }
    stem
}

/// Reads the key in `path`.
///
/// # Errors
/// [`KeyError::Io`] if it cannot be read, [`KeyError::TooOpen`] if others may read it,
/// [`KeyError::NotAKey`] if it is not a key file.
pub fn load_key(path: &Path) -> Result<Identity, KeyError> {
    let io = |source| KeyError::Io { path: path.to_path_buf(), source };
    let file = std::fs::File::open(path).map_err(io)?;
    check_private(path, &file)?;
    let mut text = String::new();
    // A key file is tiny; anything bigger is not one.
    std::io::Read::read_to_string(&mut std::io::Read::take(file, 4096), &mut text)
        .map_err(|_| KeyError::NotAKey { path: path.to_path_buf() })?;
    parse(&text).ok_or_else(|| KeyError::NotAKey { path: path.to_path_buf() })
}

fn parse(text: &str) -> Option<Identity> {
    let mut lines = text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#'));
    if lines.next()? != HEADER {
        return None;
    }
    let digits = lines.next()?;
    if digits.len() != 2 * SEED_LEN || !digits.is_ascii() || lines.next().is_some() {
        return None;
    }
    let mut seed = [0; SEED_LEN];
    for (i, byte) in seed.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&digits[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(Identity::from_seed(&seed))
}

#[cfg(unix)]
fn check_private(path: &Path, file: &std::fs::File) -> Result<(), KeyError> {
    use std::os::unix::fs::PermissionsExt;
    let mode = file
        .metadata()
        .map_err(|source| KeyError::Io { path: path.to_path_buf(), source })?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        return Err(KeyError::TooOpen { path: path.to_path_buf(), mode: mode & 0o777 });
    }
    Ok(())
}

#[cfg(not(unix))]
fn check_private(_path: &Path, _file: &std::fs::File) -> Result<(), KeyError> {
    Ok(())
}

/// Creates a new key in `path` (and its directory), readable only by its owner. Never
/// overwrites an existing file.
///
/// # Errors
/// [`KeyError::Io`] if the file exists or cannot be written, [`KeyError::Random`] if the OS
/// has no randomness.
pub fn create_key(path: &Path) -> Result<Identity, KeyError> {
    let io = |source| KeyError::Io { path: path.to_path_buf(), source };
    let identity = Identity::generate().map_err(|e| KeyError::Random(e.to_string()))?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        let mut builder = std::fs::DirBuilder::new();
        builder.recursive(true);
        #[cfg(unix)]
        std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
        builder.create(dir).map_err(io)?;
    }
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(path).map_err(io)?;
    let text = format!("{HEADER}\n{}\n", hex(&identity.seed()));
    file.write_all(text.as_bytes()).and_then(|()| file.sync_all()).map_err(io)?;
    Ok(identity)
}

/// The key in `path`, creating it first if there is no file there. Returns whether it was
/// created.
///
/// # Errors
/// As [`load_key`] and [`create_key`].
pub fn load_or_create_key(path: &Path) -> Result<(Identity, bool), KeyError> {
    match load_key(path) {
        Ok(identity) => Ok((identity, false)),
        Err(KeyError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            match create_key(path) {
                Ok(identity) => Ok((identity, true)),
                // Another process created it in between: use theirs.
                Err(KeyError::Io { source, .. })
                    if source.kind() == std::io::ErrorKind::AlreadyExists =>
                {
                    load_key(path).map(|identity| (identity, false))
                }
                Err(e) => Err(e),
            }
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_then_load_the_same_key_and_never_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys/alice.key");
        let (made, created) = load_or_create_key(&path).unwrap();
        assert!(created);
        let (loaded, created) = load_or_create_key(&path).unwrap();
        assert!(!created);
        assert_eq!(loaded.public_key(), made.public_key());
        assert!(create_key(&path).is_err());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }

    #[cfg(unix)]
    #[test]
    fn a_key_others_can_read_is_refused_with_the_fix() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.key");
        create_key(&path).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = load_key(&path).unwrap_err();
        assert!(matches!(err, KeyError::TooOpen { mode: 0o644, .. }), "{err}");
        assert!(err.to_string().contains("chmod 600"), "{err}");
    }

    #[test]
    fn a_file_that_is_not_a_key_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        for (i, text) in
            ["hello\n", "relay-key-v1 ed25519\nzz\n", "", &"a".repeat(10_000)].iter().enumerate()
        {
            let path = dir.path().join(format!("{i}.key"));
            let mut options = std::fs::OpenOptions::new();
            options.write(true).create_new(true);
            #[cfg(unix)]
            std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
            options.open(&path).unwrap().write_all(text.as_bytes()).unwrap();
            assert!(matches!(load_key(&path), Err(KeyError::NotAKey { .. })), "{text:?}");
        }
    }

    #[test]
    fn key_file_names_cannot_escape_the_directory() {
        assert_eq!(file_stem("Alice"), "alice");
        assert_eq!(file_stem("a/b"), "a%2Fb");
        assert_eq!(file_stem(".."), "%2E.");
        assert_eq!(file_stem("zoë"), "zoë");
    }
}
