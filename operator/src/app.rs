//! The operator process: health/metrics server, leader election, the
//! controllers, and an orderly stop (finish in-flight reconciles, release the
//! lease, stop the server).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use kube::Client;
use kube_lease_manager::LeaseManagerError;
use thiserror::Error;

use crate::controllers;
use crate::leader::Election;
use crate::metrics::Metrics;
use crate::reconcile::Context;
use crate::server::{self, AppState};
use crate::shutdown::Shutdown;

/// How to run.
#[derive(Debug, Clone)]
pub struct Options {
    /// Address of /metrics, /healthz and /readyz.
    pub metrics_addr: SocketAddr,
    /// Watch one namespace only.
    pub namespace: Option<String>,
    pub leader_election: bool,
    pub lease_namespace: String,
    pub lease_name: String,
    /// This replica's name in the Lease.
    pub identity: String,
}

#[derive(Debug, Error)]
pub enum AppError {
    #[error("leader election: {0}")]
    Lease(#[from] LeaseManagerError),
    #[error("metrics server: {0}")]
    Server(#[from] std::io::Error),
    /// The lease was lost while leading; exit non-zero to restart as a standby.
    #[error("lost the leader lease")]
    LostLease,
}

/// Runs until `shutdown` is triggered (or the lease is lost).
pub async fn run(client: Client, opts: Options, shutdown: Shutdown) -> Result<(), AppError> {
    let metrics = Arc::new(Metrics::default());
    let ready = Arc::new(AtomicBool::new(false));
    let listener = tokio::net::TcpListener::bind(opts.metrics_addr).await?;
    let server = tokio::spawn(server::serve_on(
        listener,
        AppState {
            metrics: metrics.clone(),
            ready: ready.clone(),
        },
        shutdown.wait(),
    ));

    let mut election = if opts.leader_election {
        Some(
            Election::start(
                client.clone(),
                &opts.lease_namespace,
                &opts.lease_name,
                &opts.identity,
            )
            .await?,
        )
    } else {
        None
    };
    // Standbys are ready too: they serve health and metrics, and a rollout
    // must not wait for them to win the lease.
    ready.store(true, Ordering::Relaxed);

    let leading = match election.as_mut() {
        None => true,
        Some(e) => {
            tracing::info!(lease = %opts.lease_name, identity = %opts.identity, "waiting for the leader lease");
            tokio::select! {
                got = e.acquired() => got,
                _ = shutdown.wait() => false,
            }
        }
    };
    let mut lost = false;
    if leading {
        tracing::info!(identity = %opts.identity, "leading: starting controllers");
        metrics.set_leader(true);
        let ctx = Arc::new(Context::new(client.clone(), metrics.clone()));
        let run = controllers::run(client, ctx, opts.namespace.clone(), shutdown.wait());
        tokio::pin!(run);
        match election.as_mut() {
            Some(e) => {
                tokio::select! {
                    _ = &mut run => {}
                    _ = e.lost() => {
                        tracing::error!("lost the leader lease; stopping");
                        lost = true;
                        shutdown.trigger();
                        run.await;
                    }
                }
            }
            None => run.await,
        }
        metrics.set_leader(false);
    }
    shutdown.trigger();
    if let Some(e) = election {
        e.release().await;
    }
    match server.await {
        Ok(r) => r?,
        Err(e) => tracing::warn!(error = %e, "metrics server task failed"),
    }
    if lost {
        return Err(AppError::LostLease);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
    use k8s_openapi::api::core::v1::Secret;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
    use kube::api::ObjectMeta;

    use super::*;
    use crate::crd::{Broker, BrokerSpec};
    use crate::reconcile::fake::FakeApi;

    fn opts() -> Options {
        Options {
            metrics_addr: "127.0.0.1:0".parse().unwrap(),
            namespace: None,
            leader_election: true,
            lease_namespace: "ops".into(),
            lease_name: "starling-operator".into(),
            identity: "pod-a".into(),
        }
    }

    fn broker(fake: &FakeApi) {
        fake.put(&Broker {
            metadata: ObjectMeta {
                name: Some("demo".into()),
                namespace: Some("ns".into()),
                ..ObjectMeta::default()
            },
            spec: BrokerSpec::default(),
            status: None,
        });
    }

    fn holder(fake: &FakeApi) -> Option<String> {
        fake.get::<Lease>("ops", "starling-operator")?
            .spec?
            .holder_identity
    }

    async fn until(what: &str, mut f: impl FnMut() -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while !f() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for {what}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn leads_reconciles_and_releases_the_lease_on_shutdown() {
        let fake = FakeApi::new();
        let shutdown = Shutdown::default();
        let app = tokio::spawn(run(fake.client(), opts(), shutdown.clone()));
        broker(&fake);
        until("the broker's objects", || {
            fake.get::<Secret>("ns", "demo-auth").is_some()
        })
        .await;
        assert_eq!(holder(&fake).as_deref(), Some("pod-a"));

        shutdown.trigger();
        tokio::time::timeout(Duration::from_secs(10), app)
            .await
            .expect("stops in time")
            .expect("task")
            .expect("clean exit");
        assert_eq!(holder(&fake), None, "lease released for the next leader");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn standby_does_nothing_while_another_replica_leads() {
        let fake = FakeApi::new();
        fake.put(&Lease {
            metadata: ObjectMeta {
                name: Some("starling-operator".into()),
                namespace: Some("ops".into()),
                ..ObjectMeta::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some("pod-b".into()),
                lease_duration_seconds: Some(3600),
                acquire_time: Some(MicroTime(k8s_openapi::jiff::Timestamp::now())),
                renew_time: Some(MicroTime(k8s_openapi::jiff::Timestamp::now())),
                ..LeaseSpec::default()
            }),
        });
        broker(&fake);
        let shutdown = Shutdown::default();
        let app = tokio::spawn(run(fake.client(), opts(), shutdown.clone()));
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert!(
            fake.get::<Secret>("ns", "demo-auth").is_none(),
            "a standby must not reconcile"
        );
        assert_eq!(holder(&fake).as_deref(), Some("pod-b"));
        shutdown.trigger();
        tokio::time::timeout(Duration::from_secs(10), app)
            .await
            .expect("stops in time")
            .expect("task")
            .expect("clean exit");
        assert_eq!(
            holder(&fake).as_deref(),
            Some("pod-b"),
            "a standby leaves the lease alone"
        );
    }
}
