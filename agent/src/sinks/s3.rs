//! The `s3` sink: AWS S3 or any S3-compatible store.

use std::sync::Arc;
use std::time::Duration;

use object_store::aws::{AmazonS3, AmazonS3Builder, AmazonS3ConfigKey};
use object_store::{BackoffConfig, Certificate, ClientOptions, RetryConfig};

use crate::config::SinkConfig;

pub(super) fn build(config: &SinkConfig) -> Result<Arc<AmazonS3>, String> {
    // object_store's reqwest client takes TLS from the process default.
    crate::tls::provider();
    let bucket = config.bucket.as_deref().unwrap_or_default();
    // Credentials and region from the environment (AWS_*) first, so keys in
    // the config override them.
    let mut builder = AmazonS3Builder::from_env().with_bucket_name(bucket);
    if config.region.is_some() || std::env::var_os("AWS_REGION").is_none() {
        builder = builder.with_region(config.region.as_deref().unwrap_or("us-east-1"));
    }
    // Client options first: `with_client_options` replaces them whole,
    // including the allow-http flag set below. No fixed request timeout:
    // the batcher gives each upload a deadline that grows with its size, so
    // a large object on a slow link is not cut off on every try.
    let client = ClientOptions::new()
        .with_connect_timeout(Duration::from_secs(5))
        .with_timeout_disabled();
    builder = builder.with_client_options(trusting_ca_file(client, config)?);
    if let Some(endpoint) = &config.endpoint {
        // AWS_ENDPOINT_URL_S3 from the environment would win over
        // `with_endpoint` at build; the config's endpoint is the operator's.
        builder = builder
            .with_config(AmazonS3ConfigKey::S3Endpoint, endpoint)
            .with_endpoint(endpoint)
            .with_virtual_hosted_style_request(false)
            .with_allow_http(endpoint.starts_with("http://"));
    }
    if let (Some(id), Some(secret)) = (&config.access_key_id, &config.secret_access_key) {
        builder = builder
            .with_access_key_id(id)
            .with_secret_access_key(secret.expose());
    }
    // silt retries forever with its own capped backoff and logs each
    // failure; the client only smooths over single blips.
    let retry = RetryConfig {
        backoff: BackoffConfig::default(),
        max_retries: 1,
        retry_timeout: Duration::from_secs(10),
    };
    let store = builder
        .with_retry(retry)
        .build()
        .map_err(|e| e.to_string())?;
    Ok(Arc::new(store))
}

/// `client` trusting the sink's `ca_file` too: for its S3 endpoint and for
/// its table's REST catalog.
pub(crate) fn trusting_ca_file(
    mut client: ClientOptions,
    config: &SinkConfig,
) -> Result<ClientOptions, String> {
    let Some(path) = &config.ca_file else {
        return Ok(client);
    };
    let pem =
        std::fs::read(path).map_err(|e| format!("cannot read ca_file {}: {e}", path.display()))?;
    let certs = Certificate::from_pem_bundle(&pem)
        .map_err(|e| format!("ca_file {} is not a PEM bundle: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("ca_file {} holds no certificate", path.display()));
    }
    for cert in certs {
        client = client.with_root_certificate(cert);
    }
    Ok(client)
}
