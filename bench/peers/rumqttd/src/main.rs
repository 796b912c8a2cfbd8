//! Peer broker for the Starling benchmark harness: rumqttd 0.20.0 (pinned in
//! Cargo.toml) listening on one loopback port.
//!
//! Usage: `starling-bench-rumqttd PORT [CONFIG_OUT]`
//!
//! The config is written to CONFIG_OUT (default: `rumqttd-PORT.toml` in the
//! temp dir) and then loaded from that file, so the file on disk is exactly
//! what ran. The values are rumqttd's shipped `rumqttd.toml` defaults except:
//! loopback listener on PORT, no v5/websocket/console/prometheus listeners,
//! and `max_connections` raised so the idle-connection scenario fits.

use std::path::PathBuf;

fn config_text(port: u16) -> String {
    format!(
        r#"# Written by starling-bench-rumqttd (Starling benchmark peer).
id = 0

[router]
id = 0
max_connections = 65000
max_outgoing_packet_count = 200
max_segment_size = 104857600
max_segment_count = 10

[v4.1]
name = "v4-1"
listen = "127.0.0.1:{port}"
next_connection_delay_ms = 1
    [v4.1.connections]
    connection_timeout_ms = 60000
    max_payload_size = 20480
    max_inflight_count = 100
    dynamic_filters = true
"#
    )
}

fn main() {
    let mut args = std::env::args().skip(1);
    let port: u16 = match args.next().and_then(|p| p.parse().ok()) {
        Some(p) => p,
        None => {
            eprintln!("usage: starling-bench-rumqttd PORT [CONFIG_OUT]");
            std::process::exit(2);
        }
    };
    let path = args
        .next()
        .map(PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join(format!("rumqttd-{port}.toml")));
    if let Err(e) = std::fs::write(&path, config_text(port)) {
        eprintln!("cannot write {}: {e}", path.display());
        std::process::exit(1);
    }
    let loaded = config::Config::builder()
        .add_source(config::File::from(path.as_path()))
        .build()
        .and_then(|c| c.try_deserialize::<rumqttd::Config>());
    let cfg = match loaded {
        Ok(c) => c,
        Err(e) => {
            eprintln!("bad config {}: {e}", path.display());
            std::process::exit(1);
        }
    };
    println!(
        "rumqttd 0.20.0 listening on 127.0.0.1:{port} (config {})",
        path.display()
    );
    let mut broker = rumqttd::Broker::new(cfg);
    if let Err(e) = broker.start() {
        eprintln!("rumqttd stopped: {e}");
        std::process::exit(1);
    }
}
