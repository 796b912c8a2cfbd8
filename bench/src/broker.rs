//! Starting and stopping the brokers under test, each in its own working
//! directory with an explicit configuration, pinned to its own CPU.

use crate::mqtt::{Conn, Version};
use anyhow::{Context, Result, bail};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tokio::net::TcpStream;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    /// Starling with a data directory (durability `fsync`, its default).
    Starling,
    /// The same binary without a data directory: memory-only. Only the
    /// persistence scenarios (`p-`) run it, as the reference for what the
    /// store costs.
    StarlingMem,
    Mosquitto,
    Rumqttd,
}

impl Kind {
    pub const ALL: [Kind; 4] = [
        Kind::Starling,
        Kind::StarlingMem,
        Kind::Mosquitto,
        Kind::Rumqttd,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Starling => "starling",
            Kind::StarlingMem => "starling-mem",
            Kind::Mosquitto => "mosquitto",
            Kind::Rumqttd => "rumqttd",
        }
    }

    pub fn title(self) -> &'static str {
        match self {
            Kind::Starling => "Starling",
            Kind::StarlingMem => "Starling memory-only",
            Kind::Mosquitto => "mosquitto",
            Kind::Rumqttd => "rumqttd",
        }
    }

    /// Starling, with or without a data directory (same binary, banner,
    /// admin listener).
    pub fn is_starling(self) -> bool {
        matches!(self, Kind::Starling | Kind::StarlingMem)
    }

    pub fn parse(s: &str) -> Result<Kind> {
        Kind::ALL
            .into_iter()
            .find(|k| k.name() == s.trim().to_ascii_lowercase())
            .with_context(|| {
                format!("unknown broker {s:?} (starling, starling-mem, mosquitto, rumqttd)")
            })
    }
}

/// Values mirrored into the peers' configs so that queues are sized alike
/// (Starling's defaults, see model/src/config.rs `Limits`).
pub const MAX_QUEUED_MESSAGES: usize = 1000;
pub const MAX_QUEUED_BYTES: usize = 16 * 1024 * 1024;
pub const MAX_INFLIGHT: usize = 64;

pub struct StartOpts<'a> {
    pub bin: &'a Path,
    /// CPU to pin the broker to with `taskset` (None: not pinned).
    pub pin_cpu: Option<usize>,
    pub taskset: Option<&'a Path>,
    /// Run the broker as SCHED_FIFO at this priority (via `chrt`).
    pub fifo: Option<(u32, &'a Path)>,
    pub max_connections: usize,
    /// Working directory for config, data and logs (created).
    pub dir: PathBuf,
    /// Extra environment for the broker (Starling: further `STARLING_*`
    /// settings, e.g. the auth bundle of the soak test).
    pub env: Vec<(String, String)>,
    /// Queue caps (messages, bytes) for every broker, when a scenario
    /// queues more than the defaults ([`MAX_QUEUED_MESSAGES`],
    /// [`MAX_QUEUED_BYTES`]) allow.
    pub queue: Option<(usize, usize)>,
}

pub struct Broker {
    pub kind: Kind,
    pub pid: u32,
    pub addr: SocketAddr,
    /// Starling's admin listener (`/metrics`), from its banner.
    pub admin: Option<SocketAddr>,
    /// Starling's plain HTTP listener (`/broker/`, topic streams, `/mqtt`),
    /// or the HTTP anchor's, from the banner.
    pub http: Option<SocketAddr>,
    /// The `http-anchor` reference server, not an MQTT broker.
    anchor: bool,
    /// From spawn to the `ready` banner line (Starling, the anchor).
    pub ready_after: Option<Duration>,
    child: Child,
    pub dir: PathBuf,
}

fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("pick a free port")?;
    Ok(l.local_addr()?.port())
}

fn mosquitto_conf(port: u16, queue: (usize, usize)) -> String {
    let (max_queued_messages, max_queued_bytes) = queue;
    format!(
        "# Written by starling-bench for one benchmark run.\n\
         per_listener_settings false\n\
         listener {port} 127.0.0.1\n\
         allow_anonymous true\n\
         persistence false\n\
         # Queues sized like Starling's defaults.\n\
         max_queued_messages {max_queued_messages}\n\
         max_queued_bytes {max_queued_bytes}\n\
         max_inflight_messages {MAX_INFLIGHT}\n\
         max_connections -1\n\
         set_tcp_nodelay true\n\
         connection_messages false\n\
         log_dest stderr\n\
         log_type error\n\
         log_type warning\n"
    )
}

impl StartOpts<'_> {
    /// How long a broker may take to say `ready`: longer when a scenario
    /// queues enough for the restart to replay.
    fn ready_timeout(&self) -> Duration {
        match self.queue {
            Some(_) => Duration::from_secs(120),
            None => Duration::from_secs(30),
        }
    }
}

/// One MQTT connect + CONNACK round trip, bounded in time.
pub async fn probe(addr: SocketAddr, timeout: Duration) -> Result<()> {
    let fut = async {
        let s = TcpStream::connect(addr).await.context("connect")?;
        Conn::open(s, Version::V311, "starling-bench-probe", 60, 4096).await?;
        anyhow::Ok(())
    };
    tokio::time::timeout(timeout, fut)
        .await
        .context("probe timed out")?
}

impl Broker {
    pub async fn start(kind: Kind, o: &StartOpts<'_>) -> Result<Broker> {
        Self::launch(kind, false, o).await
    }

    /// The `f-http` reference server: this binary's `http-anchor`
    /// subcommand, started, pinned and prioritised like a broker (`o.bin`
    /// is ignored). `kind` is Starling's, as it stands in for Starling.
    pub async fn start_anchor(o: &StartOpts<'_>) -> Result<Broker> {
        Self::launch(Kind::Starling, true, o).await
    }

    fn name(&self) -> &'static str {
        if self.anchor {
            "http-anchor"
        } else {
            self.kind.name()
        }
    }

    async fn launch(kind: Kind, anchor: bool, o: &StartOpts<'_>) -> Result<Broker> {
        std::fs::create_dir_all(&o.dir).with_context(|| format!("create {}", o.dir.display()))?;
        let port = free_port()?;
        let self_exe;
        let bin: &Path = if anchor {
            self_exe = std::env::current_exe().context("path of starling-bench")?;
            &self_exe
        } else {
            o.bin
        };
        // chrt -f PRIO taskset -c CPU BIN …: each execs the next, so the
        // child's pid is the broker's.
        let mut argv: Vec<std::ffi::OsString> = Vec::new();
        if let Some((prio, chrt)) = o.fifo {
            argv.extend([chrt.into(), "-f".into(), prio.to_string().into()]);
        }
        if let (Some(cpu), Some(ts)) = (o.pin_cpu, o.taskset) {
            argv.extend([ts.into(), "-c".into(), cpu.to_string().into()]);
        }
        argv.push(bin.into());
        let mut cmd = Command::new(&argv[0]);
        cmd.args(&argv[1..]);
        cmd.current_dir(&o.dir).stdin(Stdio::null());
        // Starling reads every STARLING_* variable as configuration: pass
        // only the ones set here, never the caller's.
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("STARLING_") {
                cmd.env_remove(&k);
            }
        }
        match kind {
            _ if anchor => {
                cmd.args(["http-anchor", "--port", "0"]);
            }
            Kind::Starling | Kind::StarlingMem => {
                if kind == Kind::Starling {
                    // Kept across a restart on the same `o.dir` (p-restart).
                    let data = o.dir.join("data");
                    std::fs::create_dir_all(&data)
                        .with_context(|| format!("create {}", data.display()))?;
                    cmd.env("STARLING_DATA_DIR", &data)
                        .env("STARLING_STORAGE_DURABILITY", "fsync");
                }
                if let Some((msgs, bytes)) = o.queue {
                    cmd.env("STARLING_LIMITS_MAX_QUEUED_MESSAGES", msgs.to_string())
                        .env("STARLING_LIMITS_MAX_QUEUED_BYTES", bytes.to_string());
                }
                cmd.env("STARLING_MQTT_BIND", format!("127.0.0.1:{port}"))
                    .env("STARLING_HTTP_BIND", "127.0.0.1:0")
                    .env("STARLING_ADMIN_BIND", "127.0.0.1:0")
                    .env(
                        "STARLING_LIMITS_MAX_CONNECTIONS",
                        o.max_connections.to_string(),
                    )
                    // Every generator connection comes from 127.0.0.1.
                    .env("STARLING_LIMITS_MAX_CONNECTIONS_PER_ADDRESS", "0");
                for (k, v) in &o.env {
                    cmd.env(k, v);
                }
            }
            Kind::Mosquitto => {
                let conf = o.dir.join("mosquitto.conf");
                let queue = o.queue.unwrap_or((MAX_QUEUED_MESSAGES, MAX_QUEUED_BYTES));
                std::fs::write(&conf, mosquitto_conf(port, queue))
                    .with_context(|| format!("write {}", conf.display()))?;
                cmd.arg("-c").arg(&conf);
            }
            Kind::Rumqttd => {
                cmd.arg(port.to_string()).arg(o.dir.join("rumqttd.toml"));
            }
        }
        let stdout = std::fs::File::create(o.dir.join("stdout.log"))?;
        let stderr = std::fs::File::create(o.dir.join("stderr.log"))?;
        cmd.stdout(stdout).stderr(stderr);
        let spawned = Instant::now();
        let child = cmd
            .spawn()
            .with_context(|| format!("start {} ({})", kind.name(), bin.display()))?;
        let mut b = Broker {
            kind,
            pid: child.id(),
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            admin: None,
            http: None,
            anchor,
            ready_after: None,
            child,
            dir: o.dir.clone(),
        };
        // A restart with a large store replays it before `ready`.
        let deadline = Instant::now() + o.ready_timeout();
        if let Err(e) = b.wait_ready(spawned, deadline).await {
            let tail = b.log_tail();
            b.stop();
            bail!("{} did not become ready: {e:#}\n{tail}", b.name());
        }
        Ok(b)
    }

    async fn wait_ready(&mut self, spawned: Instant, deadline: Instant) -> Result<()> {
        if self.kind.is_starling() || self.anchor {
            // Starling says when it serves: listener lines, then `ready`.
            loop {
                self.check_alive()?;
                let out = std::fs::read_to_string(self.dir.join("stdout.log")).unwrap_or_default();
                let mut ready = false;
                for line in out.lines() {
                    if let Some(addr) = parse_listener(line, "mqtt") {
                        self.addr = addr;
                    }
                    if let Some(addr) = parse_listener(line, "admin") {
                        self.admin = Some(addr);
                    }
                    if let Some(addr) = parse_listener(line, "http") {
                        self.http = Some(addr);
                    }
                    ready |= line.trim() == "ready";
                }
                if ready {
                    self.ready_after = Some(spawned.elapsed());
                }
                if ready && self.anchor {
                    // No MQTT: its own listener is the address.
                    self.addr = self.http.context("no `listener http` line in the banner")?;
                    return Ok(());
                }
                if ready {
                    break;
                }
                if Instant::now() > deadline {
                    bail!("no `ready` line on stdout in time");
                }
                // Fine enough for the restart time of p-restart-1m.
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        // Everyone: a real CONNECT/CONNACK round trip, retried (bounded).
        loop {
            self.check_alive()?;
            match probe(self.addr, Duration::from_secs(2)).await {
                Ok(()) => return Ok(()),
                Err(e) if Instant::now() > deadline => {
                    return Err(e.context(format!("no CONNACK from {}", self.addr)));
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    }

    fn check_alive(&mut self) -> Result<()> {
        match self.child.try_wait() {
            Ok(Some(st)) => bail!("{} exited: {st}", self.name()),
            Ok(None) => Ok(()),
            Err(e) => Err(e).context("wait for broker"),
        }
    }

    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    pub fn log_tail(&self) -> String {
        let mut s = String::new();
        for f in ["stdout.log", "stderr.log"] {
            let text = std::fs::read_to_string(self.dir.join(f)).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let from = lines.len().saturating_sub(15);
            if !lines.is_empty() {
                s.push_str(&format!("--- {} {f} (last lines)\n", self.name()));
                for l in &lines[from..] {
                    s.push_str(l);
                    s.push('\n');
                }
            }
        }
        s
    }

    /// SIGKILL at once, as a crash (p-restart): nothing is flushed.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then SIGKILL after 3 s.
    pub fn stop(&mut self) {
        if !self.alive() {
            return;
        }
        crate::sys::send_signal(self.pid, libc::SIGTERM);
        let until = Instant::now() + Duration::from_secs(3);
        while Instant::now() < until {
            if !self.alive() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `listener NAME SCHEME://ADDR` → ADDR when NAME matches.
pub fn parse_listener(line: &str, want: &str) -> Option<SocketAddr> {
    let rest = line.trim_start().strip_prefix("listener ")?;
    let mut it = rest.split_whitespace();
    let name = it.next()?;
    let url = it.next()?;
    if name != want {
        return None;
    }
    let (_, addr) = url.split_once("://")?;
    addr.trim_end_matches('/').parse().ok()
}

/// `mosquitto 2.0.11`, from its help text.
pub fn mosquitto_version(bin: &Path) -> String {
    let out = Command::new(bin).arg("-h").output();
    let text = match out {
        Ok(o) => String::from_utf8_lossy(&o.stdout).to_string(),
        Err(_) => String::new(),
    };
    text.lines()
        .find_map(|l| l.trim().strip_prefix("mosquitto version "))
        .map(|v| v.trim().to_string())
        .unwrap_or_else(|| "unknown".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listener_lines() {
        assert_eq!(
            parse_listener("  listener mqtt   tcp://127.0.0.1:1883", "mqtt"),
            Some("127.0.0.1:1883".parse().unwrap())
        );
        assert_eq!(
            parse_listener("listener http http://127.0.0.1:1884", "mqtt"),
            None
        );
        assert_eq!(parse_listener("ready", "mqtt"), None);
    }
}
