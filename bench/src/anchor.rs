//! `starling-bench http-anchor`: the smallest useful HTTP/1.1 server, the
//! reference ("anchor") of the `f-http` scenario.
//!
//! It answers every request with `200 {"matched":1}` after reading the whole
//! body — what Starling's `POST /broker/<topic>` answers, minus everything
//! Starling does in between (routing, topic and auth checks, queueing for
//! subscribers). It is built the way Starling's plain HTTP listener is:
//! hyper's HTTP/1.1 connection with the same timer and header-read timeout,
//! one tokio task per connection on a default multi-thread runtime,
//! TCP_NODELAY. Run as its own process, pinned and prioritised exactly like
//! the broker it stands in for, so that its requests/s are the ceiling of
//! HTTP/1.1 keep-alive on this machine for the same client load, and
//! Starling's figure can be given as a share of it.
//!
//! Prints a banner shaped like Starling's (`listener http http://ADDR`, then
//! `ready`) so the harness starts it like a broker.

use anyhow::{Context, Result};
use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use std::convert::Infallible;
use std::io::Write as _;
use std::time::Duration;
use tokio::net::TcpListener;

/// Starling's `[limits] connect_timeout` default, which it uses as hyper's
/// header-read timeout.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

const BODY: &[u8] = b"{\"matched\":1}";

async fn answer(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    // Read the body, as a server that publishes it has to.
    let ok = req.into_body().collect().await.is_ok();
    let mut resp = Response::new(Full::new(Bytes::from_static(BODY)));
    if ok {
        resp.headers_mut().insert(
            hyper::header::CONTENT_TYPE,
            hyper::header::HeaderValue::from_static("application/json"),
        );
    } else {
        *resp.status_mut() = StatusCode::BAD_REQUEST;
    }
    Ok(resp)
}

pub fn run(port: u16) -> Result<()> {
    // Like the broker: a default multi-thread runtime (under `taskset` it
    // has one worker per allowed CPU).
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("tokio runtime")?;
    rt.block_on(async move {
        let listener = TcpListener::bind(("127.0.0.1", port))
            .await
            .with_context(|| format!("bind 127.0.0.1:{port}"))?;
        let addr = listener.local_addr()?;
        {
            let mut out = std::io::stdout().lock();
            writeln!(out, "starling-bench http-anchor (hyper HTTP/1.1)")?;
            writeln!(out, "  listener http   http://{addr}  reference server")?;
            writeln!(out, "ready")?;
            out.flush()?;
        }
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .context("SIGTERM handler")?;
        loop {
            let (stream, _) = tokio::select! {
                r = listener.accept() => match r {
                    Ok(s) => s,
                    Err(_) => {
                        // e.g. EMFILE: back off instead of spinning.
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                },
                _ = term.recv() => return Ok(()),
            };
            let _ = stream.set_nodelay(true);
            tokio::spawn(async move {
                let mut builder = hyper::server::conn::http1::Builder::new();
                builder
                    .timer(TokioTimer::new())
                    .header_read_timeout(HEADER_READ_TIMEOUT);
                let _ = builder
                    .serve_connection(TokioIo::new(stream), hyper::service::service_fn(answer))
                    .await;
            });
        }
    })
}
