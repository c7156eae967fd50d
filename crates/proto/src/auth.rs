//! Keys and what they sign: a client proves it holds the key a name is bound to by signing the
//! server's fresh nonce together with the name and its own public key (Ed25519, as NATS nkeys
//! do). The server keeps only public keys; it never sees a secret.
//!
//! The signed bytes ([`signing_input`]) are, in order:
//!
//! | bytes | what |
//! |------:|------|
//! | 20 | the ASCII text `relay-register-v2` followed by three zero bytes (domain separation) |
//! | 32 | the nonce from the server's greeting |
//! | 1  | the length of the name in bytes (1 to 64) |
//! | n  | the name exactly as sent in the registration's `from` (UTF-8) |
//! | 32 | the public key sent in the registration |
//! | 32 | over TLS only: the session's exporter value ([`TLS_EXPORTER_LABEL`], no context, 32 bytes) |
//!
//! A signature is therefore good for one name, one key and one connection's nonce: it cannot
//! be replayed on another connection or for another name. Over TLS it is also bound to the TLS
//! session: a machine in the middle that terminates the client's TLS and opens its own to the
//! server has two sessions with two exporter values, so the signature it passes on does not
//! verify.

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};

/// Bytes of a public key.
pub const PUBLIC_KEY_LEN: usize = 32;
/// Bytes of a signature.
pub const SIGNATURE_LEN: usize = 64;
/// Bytes of a registration's credentials: the public key, then the signature.
pub const CREDENTIALS_LEN: usize = PUBLIC_KEY_LEN + SIGNATURE_LEN;
/// Bytes of the nonce in a greeting.
pub const NONCE_LEN: usize = 32;
/// Bytes of a secret key seed.
pub const SEED_LEN: usize = 32;

/// The label of the TLS exporter value a registration over TLS signs (RFC 8446, 7.5).
pub const TLS_EXPORTER_LABEL: &[u8] = b"EXPORTER-relay-register";

/// Bytes of that exporter value.
pub const TLS_BINDING_LEN: usize = 32;

/// The domain-separation prefix of [`signing_input`]: 20 bytes.
pub const SIGNING_DOMAIN: &[u8; 20] = b"relay-register-v2\0\0\0";

/// The bytes a registration's signature covers (see the module documentation).
pub fn signing_input(
    nonce: &[u8; NONCE_LEN],
    name: &str,
    public_key: &[u8; PUBLIC_KEY_LEN],
) -> Vec<u8> {
    signing_input_bound(nonce, name, public_key, None)
}

/// [`signing_input`], with the TLS session's exporter value at the end when the connection
/// runs over TLS (`tls`).
pub fn signing_input_bound(
    nonce: &[u8; NONCE_LEN],
    name: &str,
    public_key: &[u8; PUBLIC_KEY_LEN],
    tls: Option<&[u8; TLS_BINDING_LEN]>,
) -> Vec<u8> {
    let mut input = Vec::with_capacity(SIGNING_DOMAIN.len() + NONCE_LEN + 1 + name.len() + 32 + 32);
    input.extend_from_slice(SIGNING_DOMAIN);
    input.extend_from_slice(nonce);
    // Names are at most 64 bytes; a longer one is refused before anything is signed.
    input.push(u8::try_from(name.len()).unwrap_or(u8::MAX));
    input.extend_from_slice(name.as_bytes());
    input.extend_from_slice(public_key);
    if let Some(binding) = tls {
        input.extend_from_slice(binding);
    }
    input
}

/// A fresh random nonce from the operating system's generator.
///
/// # Errors
/// If the OS has no randomness to give (no usable `getrandom`), which a server must not paper
/// over.
pub fn fresh_nonce() -> Result<[u8; NONCE_LEN], getrandom::Error> {
    let mut nonce = [0; NONCE_LEN];
    getrandom::fill(&mut nonce)?;
    Ok(nonce)
}

/// Why a registration's credentials were refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AuthError {
    /// The credentials are not a 32-byte key followed by a 64-byte signature.
    #[error("credentials must be {CREDENTIALS_LEN} bytes (a 32-byte key, a 64-byte signature)")]
    WrongLength,
    /// The 32 bytes are not a valid Ed25519 public key.
    #[error("not a valid Ed25519 public key")]
    BadKey,
    /// The signature does not verify for this nonce, name and key.
    #[error("the signature does not match this connection's nonce, the name and the key")]
    BadSignature,
}

/// A public key, as bound to a name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PublicKey(pub [u8; PUBLIC_KEY_LEN]);

impl PublicKey {
    /// The key as lower-case hex, as logs and the console show it.
    pub fn to_hex(&self) -> String {
        hex(&self.0)
    }

    /// A short form for log lines: the first 8 bytes in hex.
    pub fn fingerprint(&self) -> String {
        hex(&self.0[..8])
    }
}

impl std::fmt::Display for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ed25519:{}", self.to_hex())
    }
}

/// Lower-case hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Checks a registration's `credentials` (key then signature) against the connection's
/// `nonce` and the `name` as sent, and returns the key they prove.
///
/// # Errors
/// [`AuthError`] saying what is wrong.
pub fn verify_credentials(
    nonce: &[u8; NONCE_LEN],
    name: &str,
    credentials: &[u8],
) -> Result<PublicKey, AuthError> {
    verify_credentials_bound(nonce, name, credentials, None)
}

/// [`verify_credentials`] for a connection over TLS, whose exporter value the signature
/// must cover (`tls`; `None` for plain TCP).
///
/// # Errors
/// [`AuthError`] saying what is wrong.
pub fn verify_credentials_bound(
    nonce: &[u8; NONCE_LEN],
    name: &str,
    credentials: &[u8],
    tls: Option<&[u8; TLS_BINDING_LEN]>,
) -> Result<PublicKey, AuthError> {
    if credentials.len() != CREDENTIALS_LEN {
        return Err(AuthError::WrongLength);
    }
    let (key, signature) = credentials.split_at(PUBLIC_KEY_LEN);
    let key: [u8; PUBLIC_KEY_LEN] = key.try_into().map_err(|_| AuthError::WrongLength)?;
    let signature: [u8; SIGNATURE_LEN] =
        signature.try_into().map_err(|_| AuthError::WrongLength)?;
    let verifying = VerifyingKey::from_bytes(&key).map_err(|_| AuthError::BadKey)?;
    // `verify_strict` also refuses weak keys and non-canonical signatures, so one key has
    // exactly one identity and a signature cannot be mangled into another valid one.
    verifying
        .verify_strict(
            &signing_input_bound(nonce, name, &key, tls),
            &Signature::from_bytes(&signature),
        )
        .map_err(|_| AuthError::BadSignature)?;
    Ok(PublicKey(key))
}

/// A secret key: what a client keeps in its key file and signs registrations with.
#[derive(Clone)]
pub struct Identity {
    key: SigningKey,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the secret.
        f.debug_struct("Identity").field("public", &self.public_key().to_hex()).finish()
    }
}

impl Identity {
    /// A new key from the operating system's random generator.
    ///
    /// # Errors
    /// If the OS has no randomness to give.
    pub fn generate() -> Result<Identity, getrandom::Error> {
        let mut seed = [0; SEED_LEN];
        getrandom::fill(&mut seed)?;
        Ok(Identity::from_seed(&seed))
    }

    /// The key with this secret seed.
    pub fn from_seed(seed: &[u8; SEED_LEN]) -> Identity {
        Identity { key: SigningKey::from_bytes(seed) }
    }

    /// The secret seed, for saving in a key file.
    pub fn seed(&self) -> [u8; SEED_LEN] {
        self.key.to_bytes()
    }

    /// The public key.
    pub fn public_key(&self) -> PublicKey {
        PublicKey(self.key.verifying_key().to_bytes())
    }

    /// The credentials for registering `name` on the connection whose greeting carried
    /// `nonce`: the public key followed by the signature over [`signing_input`].
    pub fn credentials(&self, nonce: &[u8; NONCE_LEN], name: &str) -> [u8; CREDENTIALS_LEN] {
        self.credentials_bound(nonce, name, None)
    }

    /// [`Identity::credentials`] for a connection over TLS: the signature also covers the
    /// session's exporter value (`tls`; `None` for plain TCP).
    pub fn credentials_bound(
        &self,
        nonce: &[u8; NONCE_LEN],
        name: &str,
        tls: Option<&[u8; TLS_BINDING_LEN]>,
    ) -> [u8; CREDENTIALS_LEN] {
        let public = self.public_key().0;
        let signature = self.key.sign(&signing_input_bound(nonce, name, &public, tls));
        let mut out = [0; CREDENTIALS_LEN];
        out[..PUBLIC_KEY_LEN].copy_from_slice(&public);
        out[PUBLIC_KEY_LEN..].copy_from_slice(&signature.to_bytes());
        out
    }
}

#[cfg(test)]
mod binding_tests {
    use super::*;

    #[test]
    fn a_signature_over_one_tls_session_does_not_verify_over_another_or_over_plain_tcp() {
        let id = Identity::from_seed(&[9; SEED_LEN]);
        let nonce = [4; NONCE_LEN];
        let (here, there) = ([1; TLS_BINDING_LEN], [2; TLS_BINDING_LEN]);
        let bound = id.credentials_bound(&nonce, "alice", Some(&here));
        assert!(verify_credentials_bound(&nonce, "alice", &bound, Some(&here)).is_ok());
        assert_eq!(
            verify_credentials_bound(&nonce, "alice", &bound, Some(&there)),
            Err(AuthError::BadSignature)
        );
        assert_eq!(verify_credentials(&nonce, "alice", &bound), Err(AuthError::BadSignature));
        // And a plain signature is refused over TLS.
        let plain = id.credentials(&nonce, "alice");
        assert!(verify_credentials_bound(&nonce, "alice", &plain, Some(&here)).is_err());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_verify_only_for_their_nonce_name_and_key() {
        let alice = Identity::from_seed(&[7; SEED_LEN]);
        let nonce = [1; NONCE_LEN];
        let creds = alice.credentials(&nonce, "alice");
        assert_eq!(verify_credentials(&nonce, "alice", &creds), Ok(alice.public_key()));
        // Another nonce (a replay on another connection), another name.
        assert_eq!(
            verify_credentials(&[2; NONCE_LEN], "alice", &creds),
            Err(AuthError::BadSignature)
        );
        assert_eq!(verify_credentials(&nonce, "alicf", &creds), Err(AuthError::BadSignature));
        // Someone else's key with alice's signature.
        let mut swapped = creds;
        swapped[..32].copy_from_slice(&Identity::from_seed(&[8; 32]).public_key().0);
        assert_eq!(verify_credentials(&nonce, "alice", &swapped), Err(AuthError::BadSignature));
        // Flipped signature bit.
        let mut flipped = creds;
        flipped[90] ^= 1;
        assert_eq!(verify_credentials(&nonce, "alice", &flipped), Err(AuthError::BadSignature));
        // Wrong lengths.
        assert_eq!(verify_credentials(&nonce, "alice", &creds[..95]), Err(AuthError::WrongLength));
        assert_eq!(verify_credentials(&nonce, "alice", &[]), Err(AuthError::WrongLength));
    }

    #[test]
    fn the_signed_bytes_are_as_documented() {
        let input = signing_input(&[0xaa; 32], "bob", &[0xbb; 32]);
        assert_eq!(input.len(), 20 + 32 + 1 + 3 + 32);
        assert_eq!(&input[..20], b"relay-register-v2\0\0\0");
        assert_eq!(&input[20..52], &[0xaa; 32]);
        assert_eq!(input[52], 3);
        assert_eq!(&input[53..56], b"bob");
        assert_eq!(&input[56..], &[0xbb; 32]);
    }

    #[test]
    fn seeds_round_trip_and_nonces_differ() {
        let id = Identity::generate().unwrap();
        assert_eq!(Identity::from_seed(&id.seed()).public_key(), id.public_key());
        assert_ne!(fresh_nonce().unwrap(), fresh_nonce().unwrap());
        assert!(!format!("{id:?}").contains(&hex(&id.seed())));
    }
}
