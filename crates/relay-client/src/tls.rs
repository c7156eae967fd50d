//! TLS for the client (rustls, no OpenSSL): how the server's certificate is checked.

use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};

/// How a client connects over TLS, and trusts the server: [`Tls::system_roots`],
/// [`Tls::ca_file`], or [`Tls::pinned`] to a certificate's fingerprint (for a self-signed
/// server). Cheap to clone.
#[derive(Clone, Debug)]
pub struct Tls {
    config: Arc<ClientConfig>,
}

/// TLS settings that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct TlsError(String);

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl Tls {
    /// Trusts the certificate authorities this system trusts.
    ///
    /// # Errors
    /// If the system's roots cannot be read, or there are none.
    pub fn system_roots() -> Result<Tls, TlsError> {
        let found = rustls_native_certs::load_native_certs();
        let mut roots = RootCertStore::empty();
        let (added, _) = roots.add_parsable_certificates(found.certs);
        if added == 0 {
            return Err(TlsError(
                "this system trusts no certificate authorities (use --ca FILE or \
                 --tls-fingerprint)"
                    .into(),
            ));
        }
        Tls::with_roots(roots)
    }

    /// Trusts the certificate authorities in a PEM file (the server's own certificate, for a
    /// self-signed one, also works).
    ///
    /// # Errors
    /// If the file cannot be read or holds no certificate.
    pub fn ca_file(path: &Path) -> Result<Tls, TlsError> {
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
            .and_then(|certs| certs.collect::<Result<_, _>>())
            .map_err(|e| TlsError(format!("cannot read {}: {e}", path.display())))?;
        let mut roots = RootCertStore::empty();
        let (added, _) = roots.add_parsable_certificates(certs);
        if added == 0 {
            return Err(TlsError(format!("{} holds no certificate (PEM)", path.display())));
        }
        Tls::with_roots(roots)
    }

    /// Trusts exactly the server whose certificate has this SHA-256 fingerprint (64 hex
    /// digits; `:` between pairs allowed), whoever signed it and whatever names it carries:
    /// what the server logged at start.
    ///
    /// # Errors
    /// If `fingerprint` is not 32 bytes in hex.
    pub fn pinned(fingerprint: &str) -> Result<Tls, TlsError> {
        let digits: String = fingerprint.chars().filter(|c| *c != ':').collect();
        let bad =
            || TlsError(format!("'{fingerprint}' is not a SHA-256 fingerprint (64 hex digits)"));
        if digits.len() != 64 {
            return Err(bad());
        }
        let mut pin = [0u8; 32];
        for (i, byte) in pin.iter_mut().enumerate() {
            *byte = u8::from_str_radix(digits.get(2 * i..2 * i + 2).ok_or_else(bad)?, 16)
                .map_err(|_| bad())?;
        }
        let verifier = Pinned { pin, provider: provider() };
        let config = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError(format!("TLS: {e}")))?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_no_client_auth();
        Ok(Tls { config: Arc::new(config) })
    }

    fn with_roots(roots: RootCertStore) -> Result<Tls, TlsError> {
        let config = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError(format!("TLS: {e}")))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(Tls { config: Arc::new(config) })
    }

    /// A connector that checks servers as these settings say (what the client connects
    /// with).
    pub fn connector(&self) -> tokio_rustls::TlsConnector {
        tokio_rustls::TlsConnector::from(self.config.clone())
    }
}

/// The name the server's certificate must carry: the host part of `server` (`host:port`).
pub(crate) fn server_name(server: &str) -> Option<ServerName<'static>> {
    let host = match server.rsplit_once(':') {
        Some((host, port)) if port.parse::<u16>().is_ok() => host,
        _ => server,
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    ServerName::try_from(host.to_string()).ok()
}

/// What a failed handshake means, for a person.
pub(crate) fn explain(e: &std::io::Error) -> String {
    let inner = e.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>());
    match inner {
        Some(rustls::Error::InvalidCertificate(why)) => match why {
            rustls::CertificateError::UnknownIssuer => "the server's certificate is not signed \
                 by an authority this client trusts (for a self-signed server, pin it with \
                 --tls-fingerprint)"
                .into(),
            rustls::CertificateError::NotValidForName
            | rustls::CertificateError::NotValidForNameContext { .. } => {
                "the server's certificate is not for this host name".into()
            }
            rustls::CertificateError::Expired | rustls::CertificateError::ExpiredContext { .. } => {
                "the server's certificate has expired".into()
            }
            rustls::CertificateError::Other(other) => other.to_string(),
            other => format!("the server's certificate does not verify ({other:?})"),
        },
        Some(rustls::Error::InvalidMessage(_))
        | Some(rustls::Error::InappropriateMessage { .. }) => {
            "the server does not speak TLS here (a plain relay port? connect without --tls)".into()
        }
        Some(other) => other.to_string(),
        None if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            "the server closed the connection during the TLS handshake".into()
        }
        None => e.to_string(),
    }
}

/// Accepts exactly the certificate with the pinned fingerprint; the handshake's signatures
/// are still checked, so only the holder of that certificate's key gets through.
#[derive(Debug)]
struct Pinned {
    pin: [u8; 32],
    provider: Arc<CryptoProvider>,
}

/// A pin that does not match.
#[derive(Debug)]
struct WrongFingerprint(String);

impl std::fmt::Display for WrongFingerprint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the server's certificate has fingerprint {}, not the one pinned", self.0)
    }
}

impl std::error::Error for WrongFingerprint {}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        use sha2::Digest;
        let seen: [u8; 32] = sha2::Sha256::digest(end_entity.as_ref()).into();
        if seen == self.pin {
            return Ok(ServerCertVerified::assertion());
        }
        let hex = relay_proto::hex(&seen);
        Err(rustls::Error::InvalidCertificate(rustls::CertificateError::Other(rustls::OtherError(
            Arc::new(WrongFingerprint(hex)),
        ))))
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_are_64_hex_digits_with_or_without_colons() {
        let hex = "ab".repeat(32);
        assert!(Tls::pinned(&hex).is_ok());
        let colons = vec!["AB"; 32].join(":");
        assert!(Tls::pinned(&colons).is_ok());
        assert!(Tls::pinned("abcd").is_err());
        assert!(Tls::pinned(&"zz".repeat(32)).is_err());
    }

    #[test]
    fn the_host_is_the_name_checked() {
        assert_eq!(server_name("chat.example.org:8443").unwrap().to_str(), "chat.example.org");
        assert_eq!(server_name("127.0.0.1:8443").unwrap().to_str(), "127.0.0.1");
        assert_eq!(server_name("[::1]:8443").unwrap().to_str(), "::1");
    }
}
