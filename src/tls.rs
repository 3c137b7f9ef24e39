//! Inbound TLS on the proxy listener: the certificate chain and key from PEM files
//! (`server.tls_cert_file`, `server.tls_key_file`), ALPN h2 and http/1.1, and certificate
//! rotation without a restart. The only tokio-rustls user, and the server side of rustls
//! (the upstream client's side is in `upstream`).
//!
//! Rotation: the files are looked at every [`POLL_INTERVAL`] (their resolved path, inode,
//! size and modification time: a Kubernetes secret update swaps a symlink, which file-change
//! notifications on the path itself miss) and on every configuration reload. New files are
//! served to handshakes from then on; connections set up with the old certificate go on
//! unchanged. Files that do not load (half written, not PEM, a key that does not match the
//! certificate) keep the old certificate in service, are logged with the file and the reason,
//! and counted as `tls_certificate_reloads_total{result="error"}`.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, SystemTime};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::net::TcpStream;

use crate::config::TlsFiles;
use crate::metrics::{Metrics, ReloadResult};

/// How often the certificate files are looked at for a change, in seconds: a rotated
/// certificate is in service within about this long (at most twice it).
pub const POLL_INTERVAL: Duration = Duration::from_secs(1);

/// A TLS connection to a client.
pub type TlsStream = tokio_rustls::server::TlsStream<TcpStream>;

/// Why a certificate could not be loaded. Each names the file and what is wrong with it.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("{key} {path}: cannot read: {reason}")]
    Read {
        /// `server.tls_cert_file` or `server.tls_key_file`.
        key: &'static str,
        /// The file.
        path: PathBuf,
        /// The I/O or PEM error.
        reason: String,
    },
    /// The certificate file holds no `CERTIFICATE` block.
    #[error(
        "server.tls_cert_file {0}: no CERTIFICATE block found (expected a PEM certificate chain, leaf first)"
    )]
    NoCertificate(PathBuf),
    /// The key file holds no private key, or one rustls cannot use.
    #[error("server.tls_key_file {path}: {reason}")]
    Key {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The key is not the certificate's.
    #[error(
        "server.tls_key_file {key} does not match the certificate in server.tls_cert_file {cert}: {reason}"
    )]
    Mismatch {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
        /// What rustls found.
        reason: String,
    },
}

/// Reads and checks the certificate chain and key `files` name.
///
/// # Errors
/// [`TlsError`] naming the file that cannot be read, holds no certificate or key, or whose key
/// does not match the certificate.
pub fn load(files: &TlsFiles) -> Result<Arc<CertifiedKey>, TlsError> {
    let read = |key: &'static str, path: &Path| {
        std::fs::read(path).map_err(|e| TlsError::Read {
            key,
            path: path.to_owned(),
            reason: e.to_string(),
        })
    };
    let cert_pem = read("server.tls_cert_file", &files.cert)?;
    let key_pem = read("server.tls_key_file", &files.key)?;
    let chain = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Read {
            key: "server.tls_cert_file",
            path: files.cert.clone(),
            reason: format!("not a PEM certificate chain: {}", pem_reason(&e)),
        })?;
    if chain.is_empty() {
        return Err(TlsError::NoCertificate(files.cert.clone()));
    }
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| TlsError::Key {
        path: files.key.clone(),
        reason: format!(
            "no PEM private key found (PKCS#8, PKCS#1 or SEC1): {}",
            pem_reason(&e)
        ),
    })?;
    let provider = rustls::crypto::ring::default_provider();
    let key = provider
        .key_provider
        .load_private_key(key)
        .map_err(|e| TlsError::Key {
            path: files.key.clone(),
            reason: format!("not a usable private key: {e}"),
        })?;
    let certified = CertifiedKey::new(chain, key);
    match certified.keys_match() {
        Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {
            Ok(Arc::new(certified))
        }
        Err(e) => Err(TlsError::Mismatch {
            cert: files.cert.clone(),
            key: files.key.clone(),
            reason: e.to_string(),
        }),
    }
}

/// A PEM error in words (the parser's own message shows markers as byte lists).
fn pem_reason(e: &rustls::pki_types::pem::Error) -> String {
    use rustls::pki_types::pem::Error;
    match e {
        Error::MissingSectionEnd { end_marker } => format!(
            "a block has no \"{}\" line (the file is cut short or still being written)",
            String::from_utf8_lossy(end_marker)
        ),
        Error::IllegalSectionStart { line } => format!(
            "a malformed BEGIN line: {:?}",
            String::from_utf8_lossy(line)
        ),
        other => other.to_string(),
    }
}

/// A certificate loaded from its files, with what the files looked like just before they were
/// read (so a change made while they were read is seen by the next look).
pub struct Loaded {
    files: TlsFiles,
    stamps: [Option<Stamp>; 2],
    key: Arc<CertifiedKey>,
}

impl std::fmt::Debug for Loaded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Loaded")
            .field("files", &self.files)
            .finish_non_exhaustive()
    }
}

/// Looks at the files `files` names, then loads them (blocking file reads).
///
/// # Errors
/// As [`load`].
pub fn prepare(files: &TlsFiles) -> Result<Loaded, TlsError> {
    let stamps = [stamp(&files.cert), stamp(&files.key)];
    Ok(Loaded {
        files: files.clone(),
        stamps,
        key: load(files)?,
    })
}

/// What a file looked like when last loaded: a change in any part means "load again".
#[derive(Debug, Clone, PartialEq, Eq)]
struct Stamp {
    resolved: Option<PathBuf>,
    len: u64,
    modified: Option<SystemTime>,
    inode: u64,
}

fn stamp(path: &Path) -> Option<Stamp> {
    let meta = std::fs::metadata(path).ok()?;
    #[cfg(unix)]
    let inode = std::os::unix::fs::MetadataExt::ino(&meta);
    #[cfg(not(unix))]
    let inode = 0;
    Some(Stamp {
        resolved: std::fs::canonicalize(path).ok(),
        len: meta.len(),
        modified: meta.modified().ok(),
        inode,
    })
}

/// The proxy listener's certificate, replaceable while serving.
pub struct Certificates {
    current: RwLock<Arc<CertifiedKey>>,
    /// The files, and their stamps when last looked at.
    files: Mutex<(TlsFiles, [Option<Stamp>; 2])>,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for Certificates {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Certificates").finish_non_exhaustive()
    }
}

impl Certificates {
    /// Loads the certificate `files` name, counting reloads into `metrics`.
    ///
    /// # Errors
    /// As [`load`].
    pub fn new(files: &TlsFiles, metrics: Arc<Metrics>) -> Result<Arc<Self>, TlsError> {
        let Loaded { files, stamps, key } = prepare(files)?;
        Ok(Arc::new(Certificates {
            current: RwLock::new(key),
            files: Mutex::new((files, stamps)),
            metrics,
        }))
    }

    /// The acceptor for the proxy listener: TLS 1.2 and 1.3, ALPN h2 and http/1.1, this
    /// certificate (as it is at each handshake).
    pub fn acceptor(self: &Arc<Self>) -> Acceptor {
        let mut config = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(Resolver(self.clone())));
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Acceptor(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
    }

    /// Puts a certificate [`prepare`]d from a reloaded configuration in service (its files may
    /// be other ones). Taken under the same lock as [`Certificates::reload_if_changed`], so a
    /// look at the files in progress cannot put an older certificate back afterwards.
    pub fn install(&self, loaded: Loaded) {
        let mut files = self.files.lock().unwrap_or_else(PoisonError::into_inner);
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = loaded.key;
        *files = (loaded.files, loaded.stamps);
        self.metrics.tls_certificate_reload(ReloadResult::Success);
    }

    /// Loads the files again when they changed since last looked at; `None` when they did
    /// not. A file that does not load is logged and counted, and the certificate in service
    /// stays; it is tried again once the files change again. The files are looked at before
    /// they are read, and the lock is held until the certificate is in service, so a change
    /// made meanwhile is seen by the next look and a reload cannot be undone by this one.
    pub fn reload_if_changed(&self) -> Option<Result<(), TlsError>> {
        let mut guard = self.files.lock().unwrap_or_else(PoisonError::into_inner);
        let (files, stamps) = &mut *guard;
        let now = [stamp(&files.cert), stamp(&files.key)];
        if now == *stamps {
            return None;
        }
        *stamps = now;
        Some(match load(files) {
            Ok(key) => {
                *self.current.write().unwrap_or_else(PoisonError::into_inner) = key;
                self.metrics.tls_certificate_reload(ReloadResult::Success);
                tracing::info!(cert = %files.cert.display(), "TLS certificate files changed; new certificate in service");
                Ok(())
            }
            Err(e) => {
                self.metrics.tls_certificate_reload(ReloadResult::Error);
                tracing::error!(error = %e, "TLS certificate files changed but do not load; the certificate in service stays");
                Err(e)
            }
        })
    }

    /// Looks at the files every [`POLL_INTERVAL`] until the task is dropped or aborted.
    pub async fn watch(self: Arc<Self>) {
        let mut tick = tokio::time::interval(POLL_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let this = self.clone();
            // Metadata and file reads are off the serving thread.
            let _ = tokio::task::spawn_blocking(move || this.reload_if_changed()).await;
        }
    }
}

/// Hands every handshake the certificate in service.
struct Resolver(Arc<Certificates>);

impl std::fmt::Debug for Resolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Resolver").finish_non_exhaustive()
    }
}

impl ResolvesServerCert for Resolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(
            self.0
                .current
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .clone(),
        )
    }
}

/// Performs the server side of TLS handshakes on accepted connections.
#[derive(Clone)]
pub struct Acceptor(tokio_rustls::TlsAcceptor);

impl std::fmt::Debug for Acceptor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Acceptor").finish_non_exhaustive()
    }
}

impl Acceptor {
    /// The handshake on `stream`.
    ///
    /// # Errors
    /// The I/O or TLS error that ended the handshake.
    pub async fn accept(&self, stream: TcpStream) -> std::io::Result<TlsStream> {
        self.0.accept(stream).await
    }
}
