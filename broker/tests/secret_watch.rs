//! The broker watches its own bundle Secret through the API server (DESIGN.md
//! "Live updates"): the real binary against the in-memory API server served
//! over HTTP, the way a pod reaches the real one. Rewriting the Secret
//! revokes a token within 2 s while the mounted file is left unchanged; with
//! no API server the broker says so once and keeps serving from the file.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use common::{Broker, Client, Opts, V5, V311, Version};
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use starling_fake_apiserver::FakeApi;
use starling_model::bundle::{AuthBundle, TokenEntry};
use starling_model::token::HashKey;

const NS: &str = "iot";
const SECRET: &str = "home-auth";
const KEY: &str = "c3RhcmxpbmctcnVzdC1zZWNyZXQtd2F0Y2gta2V5MDE=";
const REVOKE_WITHIN: Duration = Duration::from_secs(2);

fn bundle(tokens: &[(&str, &str)]) -> Vec<u8> {
    let key = HashKey::from_base64(KEY).expect("test key");
    let mut b = AuthBundle::new("home");
    b.hash_key = KEY.into();
    b.default_policy = Some(starling_model::bundle::Effect::Allow);
    for (name, secret) in tokens {
        b.tokens.push(TokenEntry::new(*name, &key, secret));
    }
    b.to_json_pretty().into_bytes()
}

fn secret(bytes: &[u8]) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some(SECRET.into()),
            namespace: Some(NS.into()),
            ..ObjectMeta::default()
        },
        data: Some(BTreeMap::from([(
            "bundle.json".to_string(),
            ByteString(bytes.to_vec()),
        )])),
        ..Secret::default()
    }
}

/// A kubeconfig for `server`, as `kubectl proxy` users write one.
fn kubeconfig(dir: &Path, server: &str) -> std::path::PathBuf {
    let path = dir.join("kubeconfig");
    let text = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: {server}\n\
         users:\n- name: test\n  user: {{}}\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    user: test\n    namespace: {NS}\n\
         current-context: fake\n"
    );
    std::fs::write(&path, text).expect("writing the kubeconfig");
    path
}

fn start(dir: &Path, file: &Path, server: &str) -> Broker {
    let kc = kubeconfig(dir, server);
    Broker::builder()
        .env("STARLING_AUTH_BUNDLE", &file.display().to_string())
        .env("STARLING_AUTH_BUNDLE_SECRET", SECRET)
        .env("STARLING_BROKER_NAME", "home")
        .env("POD_NAMESPACE", NS)
        .env("KUBECONFIG", &kc.display().to_string())
        // kube reads these before the kubeconfig: none may leak in.
        .env("KUBERNETES_SERVICE_HOST", "")
        .start()
}

fn opts(v: Version, b: &Broker, id: &str, user: &str, pass: &str) -> Opts {
    let mut o = Opts::new(v, id, b.mqtt());
    o.credentials = Some((user.into(), pass.into()));
    o
}

#[tokio::test]
async fn rewriting_the_bundle_secret_revokes_within_two_seconds() {
    for v in [V311, V5] {
        let dir = tempfile::tempdir().expect("tempdir");
        let api = FakeApi::new();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let server = format!("http://{}", listener.local_addr().expect("addr"));
        let _served = api.serve(listener);
        let both = bundle(&[
            ("alice", "alice-secret-0123456789"),
            ("bob", "bob-secret-0123456789a"),
        ]);
        api.put(&secret(&both));
        // The mounted file keeps both tokens for the whole test.
        let file = dir.path().join("bundle.json");
        std::fs::write(&file, &both).expect("bundle file");
        let b = start(dir.path(), &file, &server);

        let mut alice =
            Client::connect(opts(v, &b, "alice-1", "alice", "alice-secret-0123456789")).await;
        let mut bob = Client::connect(opts(v, &b, "bob-1", "bob", "bob-secret-0123456789a")).await;
        bob.sub("news", 1).await;
        // The watch is up once the broker logged its first reload from the
        // Secret, or (same bytes as the file) its initial list; wait for a
        // change to be applied instead of guessing: revoke, then measure.
        let t0 = Instant::now();
        api.put(&secret(&bundle(&[("bob", "bob-secret-0123456789a")])));
        let (reason, _) = tokio::time::timeout(REVOKE_WITHIN * 2, alice.closed())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "{v:?}: alice still connected after {:?}\n{}",
                    REVOKE_WITHIN * 2,
                    b.log()
                )
            });
        let took = t0.elapsed();
        assert!(took <= REVOKE_WITHIN, "{v:?}: revoked after {took:?}");
        if v == V5 {
            assert_eq!(reason, Some(0x87), "v5 DISCONNECT reason");
        }
        assert_eq!(
            std::fs::read(&file).expect("file"),
            both,
            "the mounted file was not touched"
        );
        // The mounted file (unchanged, still with alice) does not bring her back.
        assert!(
            Client::try_connect(opts(v, &b, "alice-2", "alice", "alice-secret-0123456789"))
                .await
                .is_err(),
            "{v:?}: a token removed from the Secret connected again"
        );
        // Bob was not affected.
        let mut pubr = Client::connect(opts(v, &b, "bob-2", "bob", "bob-secret-0123456789a")).await;
        pubr.publish("news", 1, false, b"still here").await;
        assert_eq!(bob.recv().await.text(), "still here");
        let log = b.log();
        assert!(
            log.contains(&format!("Secret {NS}/{SECRET}")),
            "reload origin logged:\n{log}"
        );
    }
}

#[tokio::test]
async fn without_an_api_server_the_file_still_works_and_it_says_so_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    // A port nothing listens on.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let server = format!("http://{}", closed.local_addr().expect("addr"));
    drop(closed);
    let both = bundle(&[
        ("alice", "alice-secret-0123456789"),
        ("bob", "bob-secret-0123456789a"),
    ]);
    let file = dir.path().join("bundle.json");
    std::fs::write(&file, &both).expect("bundle file");
    let b = start(dir.path(), &file, &server);
    let mut alice =
        Client::connect(opts(V5, &b, "alice-1", "alice", "alice-secret-0123456789")).await;
    // The file is the source now: removing alice there closes her connection.
    let tmp = dir.path().join("bundle.json.tmp");
    std::fs::write(&tmp, bundle(&[("bob", "bob-secret-0123456789a")])).expect("write");
    std::fs::rename(&tmp, &file).expect("rename");
    let (reason, _) = tokio::time::timeout(REVOKE_WITHIN * 2, alice.closed())
        .await
        .unwrap_or_else(|_| panic!("alice still connected\n{}", b.log()));
    assert_eq!(reason, Some(0x87));
    // Let the watcher retry a few times; it must not log each failure.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let log = b.log();
    let warnings = log
        .lines()
        .filter(|l| l.contains("cannot watch the Secret through the API server"))
        .count();
    assert_eq!(warnings, 1, "said once:\n{log}");
}

/// One admin API call with the default credentials: (status, JSON body).
async fn admin(b: &Broker, method: &str, path: &str, body: &str) -> (u16, serde_json::Value) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = b.addr("admin");
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect to the admin listener");
    // admin:public, the loopback default.
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Basic YWRtaW46cHVibGlj\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.expect("send");
    let mut all = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut all))
        .await
        .expect("admin answer within 5 s")
        .expect("read");
    let text = String::from_utf8_lossy(&all);
    let (head, body) = text.split_once("\r\n\r\n").expect("end of headers");
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("status code");
    (status, serde_json::from_str(body).expect("a JSON body"))
}

#[tokio::test]
async fn with_the_secret_watched_the_admin_api_lists_it_and_refuses_writes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let api = FakeApi::new();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let server = format!("http://{}", listener.local_addr().expect("addr"));
    let _served = api.serve(listener);
    // The Secret has a token the (lagging) mounted file does not.
    api.put(&secret(&bundle(&[
        ("alice", "alice-secret-0123456789"),
        ("bob", "bob-secret-0123456789a"),
    ])));
    let only_alice = bundle(&[("alice", "alice-secret-0123456789")]);
    let file = dir.path().join("bundle.json");
    std::fs::write(&file, &only_alice).expect("bundle file");
    let b = start(dir.path(), &file, &server);

    let deadline = Instant::now() + Duration::from_secs(5);
    let names = loop {
        let (status, r) = admin(&b, "GET", "/api/v4/auth_username", "").await;
        assert_eq!(status, 200, "{r}");
        let names: Vec<String> = r["data"]
            .as_array()
            .expect("a list")
            .iter()
            .filter_map(|t| t["username"].as_str().map(str::to_owned))
            .collect();
        if names.len() == 2 || Instant::now() > deadline {
            break names;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(
        names,
        ["alice", "bob"],
        "the Secret's bundle is listed\n{}",
        b.log()
    );

    for (method, path, body) in [
        ("POST", "/api/v4/auth_username", r#"{"username": "carol"}"#),
        ("PUT", "/api/v4/auth_username/bob", r#"{"disabled": true}"#),
        ("DELETE", "/api/v4/auth_username/bob", ""),
        ("POST", "/api/v4/acl", r#"{"name": "a"}"#),
    ] {
        let (status, r) = admin(&b, method, path, body).await;
        assert_eq!(
            (status, r["code"].as_u64()),
            (409, Some(111)),
            "{method} {path}: {r}"
        );
        let msg = r["message"].as_str().unwrap_or_default();
        assert!(
            msg.contains("Token and ACL resources") && msg.contains(SECRET),
            "{msg}"
        );
    }
    assert_eq!(
        std::fs::read(&file).expect("file"),
        only_alice,
        "file untouched"
    );
    // Bob, whom the refused DELETE named, still gets in.
    Client::connect(opts(V5, &b, "bob-1", "bob", "bob-secret-0123456789a"))
        .await
        .disconnect()
        .await;
}
