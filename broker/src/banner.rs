//! The startup banner: every listener, the auth mode and the admin address.
//! Tests and scripts read the `listener` lines and the final `ready` line
//! (the readiness signal), so their shape is a stable interface.

use std::fmt::Write;

use starling_model::config::{Anonymous, BrokerConfig};

use crate::server::Bound;

pub fn render(cfg: &BrokerConfig, listeners: &[Bound]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "Starling {} — MQTT broker \"{}\"",
        env!("CARGO_PKG_VERSION"),
        cfg.broker.name
    );
    for l in listeners {
        let _ = writeln!(
            s,
            "  listener {:<6} {}://{}  {}",
            l.name, l.scheme, l.addr, l.note
        );
    }
    let auth = match (&cfg.auth.bundle, cfg.auth.anonymous) {
        (None, Anonymous::Loopback) => {
            "anonymous access allowed from loopback only (no auth bundle configured)".to_string()
        }
        (None, Anonymous::Allow) => {
            "anonymous access allowed from ANY address (no auth bundle)".to_string()
        }
        (None, Anonymous::Deny) => {
            "anonymous access denied and no auth bundle: nobody can connect".to_string()
        }
        (Some(b), mode) => format!("tokens from {} (anonymous: {mode:?})", b.display()),
    };
    let _ = writeln!(s, "  auth: {auth}");
    s.push_str("ready\n");
    s
}
