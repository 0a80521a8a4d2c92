//! A throwaway CA and a server certificate for `localhost` / `127.0.0.1`, as PEM files.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, PKCS_ECDSA_P256_SHA256,
};
use rustls_pki_types::CertificateDer;
use tempfile::TempDir;

/// The names the server certificate is valid for. `<branch>.db.localhost` names a branch by
/// SNI (OpenSSL wants two labels after a wildcard, so not `*.localhost`).
pub const SERVER_NAMES: [&str; 3] = ["localhost", "127.0.0.1", "*.db.localhost"];
/// The ALPN protocol PostgreSQL 17 clients send with direct SSL.
pub const ALPN_POSTGRESQL: &[u8] = b"postgresql";

/// A CA and a server certificate signed by it (ECDSA P-256: cheap handshakes), in a temp dir.
pub struct Certs {
    dir: TempDir,
    ca_pem: String,
    ca_der: CertificateDer<'static>,
}

impl Drop for Certs {
    fn drop(&mut self) {
        crate::leftovers::forget(self.dir.path());
    }
}

impl Certs {
    /// Generates the CA and the server certificate and writes `ca.pem`, `server.pem` and
    /// `server.key` (PKCS#8).
    pub fn generate() -> Certs {
        let ca_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("CA key");
        let mut ca_params = CertificateParams::new(Vec::new()).expect("CA params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "branchgate test CA");
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca = ca_params.self_signed(&ca_key).expect("self-sign CA");

        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("server key");
        let names: Vec<String> = SERVER_NAMES.iter().map(|n| n.to_string()).collect();
        let mut params = CertificateParams::new(names).expect("server params");
        params
            .distinguished_name
            .push(DnType::CommonName, SERVER_NAMES[0]);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let cert = params
            .signed_by(&key, &ca, &ca_key)
            .expect("sign server cert");

        let dir = tempfile::Builder::new()
            .prefix("bg-certs-")
            .tempdir()
            .expect("create temp dir");
        crate::leftovers::remove_at_exit(dir.path());
        let certs = Certs {
            dir,
            ca_pem: ca.pem(),
            ca_der: ca.der().clone(),
        };
        fs::write(certs.ca_path(), &certs.ca_pem).expect("write ca.pem");
        fs::write(certs.cert_path(), cert.pem()).expect("write server.pem");
        fs::write(certs.key_path(), key.serialize_pem()).expect("write server.key");
        certs
    }

    /// The CA certificate (PEM file), for `sslrootcert`.
    pub fn ca_path(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// The server certificate (PEM file).
    pub fn cert_path(&self) -> PathBuf {
        self.dir.path().join("server.pem")
    }

    /// The server's private key (PKCS#8 PEM file).
    pub fn key_path(&self) -> PathBuf {
        self.dir.path().join("server.key")
    }

    /// The directory holding the three files.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The CA certificate as PEM text.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// A rustls client configuration that trusts only this CA and offers ALPN `postgresql`.
    pub fn client_config(&self) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(self.ca_der.clone())
            .expect("add CA to root store");
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("default TLS versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![ALPN_POSTGRESQL.to_vec()];
        Arc::new(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_are_pem() {
        let certs = Certs::generate();
        let ca = fs::read_to_string(certs.ca_path()).expect("read ca");
        assert_eq!(ca, certs.ca_pem());
        assert!(ca.starts_with("-----BEGIN CERTIFICATE-----"));
        let cert = fs::read_to_string(certs.cert_path()).expect("read cert");
        assert!(cert.starts_with("-----BEGIN CERTIFICATE-----"));
        let key = fs::read_to_string(certs.key_path()).expect("read key");
        assert!(key.starts_with("-----BEGIN PRIVATE KEY-----"));
        assert_eq!(
            certs.client_config().alpn_protocols,
            vec![b"postgresql".to_vec()]
        );
    }
}
