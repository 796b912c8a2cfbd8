//! The exporters' HTTP client: hyper with rustls (ring), requests run on the
//! application's tokio runtime.

use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt as _, Full, Limited};
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use opentelemetry_http::{Bytes, HttpClient, HttpError, Request, Response};
use tokio::runtime::Handle;

use crate::Error;

/// Largest collector answer read (they are a few bytes).
const MAX_RESPONSE: usize = 1 << 20;

/// Runs each request on the runtime it was made for: the SDK exports from
/// its own threads, where hyper would find no reactor.
#[derive(Debug)]
pub(crate) struct HyperOnRuntime {
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    timeout: Duration,
    runtime: Handle,
}

impl HyperOnRuntime {
    pub(crate) fn new(url: &str, timeout: Duration, runtime: Handle) -> Result<Self, Error> {
        Ok(HyperOnRuntime {
            client: Client::builder(TokioExecutor::new())
                .build(connector(url.starts_with("https://"))?),
            timeout,
            runtime,
        })
    }
}

/// HTTP, and HTTPS with the system's CA certificates (loaded only for an
/// `https://` endpoint, so a plain-HTTP collector works in a distroless
/// image without any).
fn connector(https: bool) -> Result<HttpsConnector<HttpConnector>, Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = HttpsConnectorBuilder::new();
    let builder = if https {
        builder
            .with_provider_and_native_roots(provider)
            .map_err(Error::CaCertificates)?
    } else {
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        builder.with_tls_config(tls)
    };
    Ok(builder.https_or_http().enable_http1().build())
}

#[async_trait::async_trait]
impl HttpClient for HyperOnRuntime {
    async fn send_bytes(&self, request: Request<Bytes>) -> Result<Response<Bytes>, HttpError> {
        let client = self.client.clone();
        let timeout = self.timeout;
        let (parts, body) = request.into_parts();
        let request = Request::from_parts(parts, Full::new(body));
        let exchange = async move {
            let response = client.request(request).await?;
            let (parts, body) = response.into_parts();
            // The exporter judges the status code.
            let body = Limited::new(body, MAX_RESPONSE).collect().await?.to_bytes();
            Ok::<_, HttpError>(Response::from_parts(parts, body))
        };
        self.runtime
            .spawn(async move {
                tokio::time::timeout(timeout, exchange)
                    .await
                    .map_err(|_| format!("OTLP export: no answer within {timeout:?}"))?
            })
            .await?
    }
}
