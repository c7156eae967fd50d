//! TLS for the server (rustls, no OpenSSL): a certificate and key from PEM files, or a
//! self-signed certificate made at the first start and kept in the data directory, so its
//! fingerprint (what clients pin) survives restarts.

use std::path::Path;
use std::sync::Arc;

use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// The self-signed certificate's file in the data directory.
pub const SELF_SIGNED_CERT: &str = "tls-self-signed.pem";
/// Its private key's file (readable by the owner only).
pub const SELF_SIGNED_KEY: &str = "tls-self-signed.key";

/// A server's TLS settings, ready for its listener.
#[derive(Clone, Debug)]
pub struct Tls {
    config: Arc<ServerConfig>,
    /// SHA-256 of the certificate the server presents, as clients pin it.
    fingerprint: String,
}

impl Tls {
    /// The certificate chain in `cert` and the private key in `key` (both PEM).
    ///
    /// # Errors
    /// A file that cannot be read or holds no certificate or key, or a key that does not
    /// match; one line naming the file.
    pub fn from_pem_files(cert: &Path, key: &Path) -> Result<Tls, String> {
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
            .map_err(|e| format!("cannot read the certificate {}: {e}", cert.display()))?
            .collect::<Result<_, _>>()
            .map_err(|e| format!("cannot read the certificate {}: {e}", cert.display()))?;
        if chain.is_empty() {
            return Err(format!("{} holds no certificate (PEM)", cert.display()));
        }
        let private = PrivateKeyDer::from_pem_file(key)
            .map_err(|e| format!("cannot read the private key {}: {e}", key.display()))?;
        Tls::new(chain, private)
    }

    /// The self-signed certificate kept in `data_dir`, made for `names` (host names and
    /// addresses) if there is none yet. Returns it and whether it was made now.
    ///
    /// # Errors
    /// The directory or the files cannot be used; one line.
    pub fn self_signed(data_dir: &Path, names: &[String]) -> Result<(Tls, bool), String> {
        let (cert, key) = (data_dir.join(SELF_SIGNED_CERT), data_dir.join(SELF_SIGNED_KEY));
        if cert.exists() && key.exists() {
            return Ok((Tls::from_pem_files(&cert, &key)?, false));
        }
        std::fs::create_dir_all(data_dir)
            .map_err(|e| format!("cannot use data directory {}: {e}", data_dir.display()))?;
        let made = rcgen::generate_simple_self_signed(names.to_vec())
            .map_err(|e| format!("cannot make a self-signed certificate: {e}"))?;
        write_private(&key, made.signing_key.serialize_pem().as_bytes())?;
        std::fs::write(&cert, made.cert.pem())
            .map_err(|e| format!("cannot write {}: {e}", cert.display()))?;
        Ok((Tls::from_pem_files(&cert, &key)?, true))
    }

    fn new(
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    ) -> Result<Tls, String> {
        let fingerprint = chain.first().map(|c| fingerprint(c)).unwrap_or_default();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS: {e}"))?
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .map_err(|e| format!("the certificate and key do not go together: {e}"))?;
        Ok(Tls { config: Arc::new(config), fingerprint })
    }

    /// The SHA-256 fingerprint of the server's certificate (64 hex digits), what a client
    /// pins with `--tls-fingerprint`.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// An acceptor for TLS sessions with this certificate (what the server's TLS listener
    /// uses).
    pub fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(self.config.clone())
    }
}

/// SHA-256 of a certificate, as 64 lowercase hex digits.
pub fn fingerprint(cert: &[u8]) -> String {
    use sha2::Digest;
    relay_proto::hex(&sha2::Sha256::digest(cert))
}

/// Writes a file only its owner can read.
fn write_private(path: &Path, contents: &[u8]) -> Result<(), String> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file =
        options.open(path).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    file.write_all(contents).map_err(|e| format!("cannot write {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_self_signed_certificate_is_kept_and_its_fingerprint_stays() {
        let dir = tempfile::tempdir().unwrap();
        let (first, made) = Tls::self_signed(dir.path(), &["localhost".into()]).unwrap();
        assert!(made);
        assert_eq!(first.fingerprint().len(), 64);
        let (again, made) = Tls::self_signed(dir.path(), &["localhost".into()]).unwrap();
        assert!(!made);
        assert_eq!(first.fingerprint(), again.fingerprint());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join(SELF_SIGNED_KEY)).unwrap().permissions();
            assert_eq!(mode.mode() & 0o777, 0o600);
        }
    }

    #[test]
    fn unusable_files_are_one_line_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.pem");
        let e = Tls::from_pem_files(&missing, &missing).unwrap_err();
        assert!(e.contains("nope.pem") && !e.contains('\n'), "{e}");
        std::fs::write(dir.path().join("empty.pem"), "").unwrap();
        let empty = dir.path().join("empty.pem");
        let e = Tls::from_pem_files(&empty, &empty).unwrap_err();
        assert!(e.contains("no certificate"), "{e}");
    }
}
