//! The one TLS crypto provider of the process: ring.
//!
//! rustls, object_store's signing and reqwest all take their cryptography
//! from ring, so aws-lc (about 2 MiB of C in the binary) is not linked.
//! reqwest and rumqttc build their client configs from the process default,
//! which [`provider`] installs before anything builds one.

use std::sync::{Arc, OnceLock};

use rustls::crypto::CryptoProvider;

/// The process's crypto provider, installed as rustls' default on first use.
pub fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| {
            // Err means an embedder installed its own first; that one is kept.
            let _ = rustls::crypto::ring::default_provider().install_default();
            CryptoProvider::get_default()
                .cloned()
                .expect("a default crypto provider is installed")
        })
        .clone()
}

#[cfg(test)]
mod tests {
    #[test]
    fn provider_is_the_process_default() {
        let provider = super::provider();
        let default = rustls::crypto::CryptoProvider::get_default().expect("installed");
        assert!(std::sync::Arc::ptr_eq(&provider, default));
        assert!(!provider.cipher_suites.is_empty());
    }
}
