//! starling-bench: the load generator and harness that compares Starling with
//! mosquitto and rumqttd on the same machine, in one run, as ratios.
//!
//! `bench/run.sh` is the one command; this binary does the work:
//! - `compare`: start each broker per run (pinned to its own CPU), run the
//!   scenarios interleaved (A B C A B C …), write JSON lines and the
//!   Markdown table;
//! - `smoke`: a few seconds per scenario against Starling only (CI);
//! - `run`: scenarios against a broker that is already running;
//! - `report`: rebuild the Markdown from JSON lines;
//! - `soak`: minutes of mixed load against Starling while its auth bundle
//!   changes: QoS 1/2 loss and duplicates, RSS and fd leaks (see soak.rs);
//! - `http-anchor`: the reference HTTP server of `f-http` (see anchor.rs),
//!   which `compare` and `smoke` start themselves.

mod anchor;
mod broker;
mod mqtt;
mod report;
mod scenario;
mod soak;
mod sys;

use anyhow::{Context, Result, bail};
use broker::{Broker, Kind, StartOpts};
use clap::{Args, Parser, Subcommand};
use scenario::{Ctx, Durations, Part, Record, Scenario};
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

#[derive(Parser)]
#[command(
    name = "starling-bench",
    about = "MQTT broker benchmark harness for Starling"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Full side-by-side comparison (brokers started by the harness).
    Compare(CompareArgs),
    /// Short functional run against Starling only; fails on no delivery or QoS 1 loss.
    Smoke(SmokeArgs),
    /// Run scenarios against an already running broker.
    Run(RunArgs),
    /// Rebuild the Markdown table from JSON lines.
    Report(ReportArgs),
    /// Long mixed load against Starling with live bundle reloads; fails on
    /// QoS 1/2 loss, QoS 2 duplicates, RSS growth or leaked fds.
    Soak(SoakArgs),
    /// A minimal hyper HTTP/1.1 server answering 200 to every request: the
    /// reference of `f-http` (started by the harness; prints its port).
    HttpAnchor(AnchorArgs),
}

#[derive(Args)]
struct AnchorArgs {
    /// Port on 127.0.0.1 (0: any free port; the banner says which).
    #[arg(long, default_value_t = 0)]
    port: u16,
}

#[derive(Args, Clone)]
struct LoadArgs {
    /// MQTT protocol version of the generator: 3.1.1 or 5.
    #[arg(long, default_value = "3.1.1")]
    mqtt: String,
    /// Measured seconds of throughput / fan-out scenarios.
    #[arg(long, default_value_t = 4.0)]
    secs: f64,
    /// Measured seconds of latency scenarios.
    #[arg(long, default_value_t = 6.0)]
    latency_secs: f64,
    /// Measured seconds of the connection-setup scenario.
    #[arg(long, default_value_t = 4.0)]
    connect_secs: f64,
    /// Idle connection counts (each run only if `ulimit -n` allows).
    #[arg(long, value_delimiter = ',', default_value = "10000,50000")]
    idle: Vec<usize>,
    /// Publishers of i-many-q0/q1 (each 20 msg/s, staggered).
    #[arg(long, default_value_t = scenario::MANY_PUBS)]
    many_pubs: usize,
    /// Connection counts of i-sparse (each run only if `ulimit -n` allows).
    #[arg(long, value_delimiter = ',', default_value = scenario::SPARSE_CONNS)]
    sparse: Vec<usize>,
    /// Seconds between two messages of one i-sparse connection.
    #[arg(long, default_value_t = scenario::SPARSE_PERIOD)]
    sparse_period: f64,
    /// Only scenarios whose id starts with one of these (e.g. `a-,c-latency-q1`).
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// QoS 1 messages a publisher may have unacknowledged.
    #[arg(long, default_value_t = 64)]
    window: usize,
    /// Most messages per write when publishing at an unlimited rate.
    #[arg(long, default_value_t = 32)]
    batch: usize,
    /// Keep-alive HTTP connections in f-http (one request outstanding each).
    #[arg(long, default_value_t = scenario::HTTP_CLIENTS)]
    http_clients: usize,
    /// QoS 1 messages queued before the kill -9 of p-restart-1m.
    #[arg(long, default_value_t = 1_000_000)]
    restart_messages: u64,
    /// Messages of p-fanout-1000-bytes (each queued for 1,000 sessions).
    #[arg(long, default_value_t = 1000)]
    store_bytes_messages: u64,
    /// Do not pin generator and broker to separate CPUs.
    #[arg(long)]
    no_pin: bool,
    /// Do not run fixed-rate (latency) scenarios as SCHED_FIFO.
    #[arg(long)]
    no_fifo: bool,
    /// Scheduling priority (nice) of the generator and the brokers it starts,
    /// so that other work on a shared machine disturbs the runs less.
    #[arg(long, default_value_t = -10, allow_hyphen_values = true)]
    nice: i32,
}

#[derive(Args)]
struct CompareArgs {
    #[command(flatten)]
    load: LoadArgs,
    /// Brokers, in the order they take turns.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "starling,starling-mem,mosquitto,rumqttd"
    )]
    brokers: Vec<String>,
    #[arg(long, default_value = "target/release/starling-broker")]
    starling_bin: PathBuf,
    #[arg(long, default_value = "mosquitto")]
    mosquitto_bin: PathBuf,
    #[arg(
        long,
        default_value = "bench/peers/rumqttd/target/release/starling-bench-rumqttd"
    )]
    rumqttd_bin: PathBuf,
    /// Repetitions of every (scenario, broker) pair.
    #[arg(long, default_value_t = 3)]
    repeat: u32,
    /// JSON lines output (one line per run).
    #[arg(long, required_unless_present = "list_brokers")]
    out: Option<PathBuf>,
    /// Print the brokers that will run with these arguments (one a line:
    /// those listed in --brokers that some selected scenario supports) and
    /// exit; bench/run.sh installs and builds only those.
    #[arg(long)]
    list_brokers: bool,
    /// Markdown file to put the table into (between its result markers).
    #[arg(long)]
    markdown: Option<PathBuf>,
    /// The command line to record in the report.
    #[arg(long, default_value = "bench/run.sh")]
    command: String,
}

#[derive(Args)]
struct SmokeArgs {
    #[arg(
        long,
        env = "BENCH_STARLING_BIN",
        default_value = "target/debug/starling-broker"
    )]
    starling_bin: PathBuf,
    /// Measured seconds per scenario.
    #[arg(long, default_value_t = 2.0)]
    secs: f64,
    /// Idle connections in the smoke.
    #[arg(long, default_value_t = 1000)]
    idle: usize,
    /// Publishers of i-many-q0/q1 in the smoke.
    #[arg(long, default_value_t = 100)]
    many_pubs: usize,
    /// Connections of i-sparse in the smoke (one message a second each).
    #[arg(long, default_value_t = 1000)]
    sparse: usize,
    /// Messages queued before the kill -9 of p-restart (smoke: a short one).
    #[arg(long, default_value_t = 20_000)]
    restart_messages: u64,
    /// Messages of p-fanout-1000-bytes in the smoke.
    #[arg(long, default_value_t = 20)]
    store_bytes_messages: u64,
    /// JSON lines output.
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(Args)]
struct SoakArgs {
    #[arg(
        long,
        env = "BENCH_STARLING_BIN",
        default_value = "target/debug/starling-broker"
    )]
    starling_bin: PathBuf,
    /// Length of the load: `600`, `600s`, `10m`.
    #[arg(long, default_value = "600s", value_parser = parse_secs)]
    duration: f64,
    /// Seconds between rows of the progress table.
    #[arg(long, default_value_t = 5.0)]
    report_every: f64,
    /// Seconds between rewrites of the auth bundle.
    #[arg(long, default_value_t = 3.0)]
    reload_every: f64,
    /// Multiplier of the publish rates (1 = ~970 msg/s published, ~3,800
    /// deliveries/s).
    #[arg(long, default_value_t = 1.0)]
    rate: f64,
    /// Short-lived connections per second.
    #[arg(long, default_value_t = 10.0)]
    short_rate: f64,
    /// JSON line output (appended); default bench/results/soak-<UTC time>.jsonl.
    #[arg(long)]
    out: Option<PathBuf>,
    /// RSS growth over the run (slope after warm-up × duration) that fails
    /// the soak, MiB; the larger of this and --rss-limit-pct applies.
    #[arg(long, default_value_t = 2.0)]
    rss_limit_mib: f64,
    /// … in percent of the broker's RSS after warm-up.
    #[arg(long, default_value_t = 10.0)]
    rss_limit_pct: f64,
    /// Open fds allowed above the start value once every client has left.
    #[arg(long, default_value_t = 4)]
    fd_slack: u64,
    /// The command line to record.
    #[arg(long, default_value = "starling-bench soak")]
    command: String,
    /// Keep the work directory (bundle, broker stdout/stderr) after a pass.
    #[arg(long)]
    keep: bool,
}

/// `600`, `600s`, `10m`, `1h` → seconds.
fn parse_secs(s: &str) -> Result<f64, String> {
    let s = s.trim();
    let (num, mult) = if let Some(n) = s.strip_suffix('h') {
        (n, 3600.0)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60.0)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1.0)
    } else {
        (s, 1.0)
    };
    match num.trim().parse::<f64>() {
        Ok(v) if v > 0.0 => Ok(v * mult),
        _ => Err(format!("{s:?} is not a duration like 60, 60s or 10m")),
    }
}

#[derive(Args)]
struct RunArgs {
    #[command(flatten)]
    load: LoadArgs,
    /// Broker address.
    #[arg(long)]
    addr: SocketAddr,
    /// Broker process id, to measure its CPU and memory.
    #[arg(long)]
    pid: Option<u32>,
    /// Name to put in the records.
    #[arg(long, default_value = "external")]
    name: String,
    /// The broker's plain HTTP listener (Starling), for f-http and
    /// g-ws-fanout (only their main part runs here, no reference).
    #[arg(long)]
    http: Option<SocketAddr>,
    /// The broker's admin listener (Starling), for h-admin-latency-q1
    /// (only its main part, with the admin load, runs here) and
    /// p-fanout-1000-bytes (`/metrics`).
    #[arg(long)]
    admin: Option<SocketAddr>,
}

#[derive(Args)]
struct ReportArgs {
    /// JSON lines written by `compare`.
    input: PathBuf,
    #[arg(long)]
    markdown: Option<PathBuf>,
}

fn main() {
    if let Err(e) = real_main() {
        eprintln!("starling-bench: {e:#}");
        std::process::exit(1);
    }
}

fn real_main() -> Result<()> {
    let cli = Cli::parse();
    if let Cmd::HttpAnchor(a) = &cli.cmd {
        // Its own process, pinned by the harness: none of the set-up below.
        return anchor::run(a.port);
    }
    let nofile = sys::raise_nofile();
    let no_pin = match &cli.cmd {
        Cmd::Compare(a) => a.load.no_pin,
        Cmd::Run(a) => a.load.no_pin,
        Cmd::Smoke(_) => false,
        // The soak measures correctness and leaks, not speed: unpinned.
        Cmd::Report(_) | Cmd::Soak(_) | Cmd::HttpAnchor(_) => true,
    };
    let nice = match &cli.cmd {
        Cmd::Compare(a) => Some(a.load.nice),
        Cmd::Run(a) => Some(a.load.nice),
        Cmd::Smoke(_) | Cmd::Report(_) | Cmd::Soak(_) | Cmd::HttpAnchor(_) => None,
    };
    let mut pin = plan_pinning(no_pin)?;
    let fifo = match &cli.cmd {
        Cmd::Compare(a) => !a.load.no_fifo,
        _ => false,
    };
    // Only if this process may use SCHED_FIFO at all (root / CAP_SYS_NICE).
    if fifo && sys::set_fifo(Some(FIFO_PRIO)) && sys::set_fifo(None) {
        pin.chrt = sys::find_in_path("chrt");
    }
    if let Some(n) = nice.filter(|n| *n != 0) {
        if sys::renice(n) {
            pin.desc
                .push_str(&format!("; generator and broker at nice {n}"));
        } else {
            pin.desc
                .push_str(&format!("; nice {n} not permitted, default priority"));
        }
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("tokio runtime")?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async move {
        let work = async {
            match cli.cmd {
                Cmd::Compare(a) => compare(a, &pin, nofile).await,
                Cmd::Smoke(a) => smoke(a, &pin, nofile).await,
                Cmd::Run(a) => run_external(a, &pin, nofile).await,
                Cmd::Report(a) => report_cmd(a),
                Cmd::Soak(a) => soak_cmd(a).await,
                Cmd::HttpAnchor(_) => unreachable!("handled before the runtime starts"),
            }
        };
        // On SIGINT/SIGTERM the work is dropped: the running broker's Drop
        // stops it, so no broker outlives the harness.
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .context("SIGTERM handler")?;
        tokio::select! {
            r = work => r,
            _ = tokio::signal::ctrl_c() => bail!("interrupted (SIGINT); broker stopped"),
            _ = term.recv() => bail!("terminated (SIGTERM); broker stopped"),
        }
    })
}

struct Pinning {
    /// `chrt`, when fixed-rate runs may use SCHED_FIFO.
    chrt: Option<PathBuf>,
    gen_cpu: Option<usize>,
    broker_cpu: Option<usize>,
    taskset: Option<PathBuf>,
    desc: String,
    gen_cores: f64,
    broker_cores: f64,
}

/// SCHED_FIFO priority of broker and generator in fixed-rate scenarios.
const FIFO_PRIO: i32 = 10;

/// Generator on the first allowed CPU, broker on the second, when there are
/// two and `taskset` exists.
fn plan_pinning(no_pin: bool) -> Result<Pinning> {
    let cpus = sys::allowed_cpus();
    let taskset = sys::find_in_path("taskset");
    let nproc = cpus.len().max(1) as f64;
    if !no_pin && cpus.len() >= 2 && taskset.is_some() {
        let (g, b) = (cpus[0], cpus[1]);
        sys::pin_self(g)?;
        return Ok(Pinning {
            chrt: None,
            gen_cpu: Some(g),
            broker_cpu: Some(b),
            taskset,
            desc: format!(
                "broker pinned to CPU {b} (taskset), generator to CPU {g} (sched_setaffinity)"
            ),
            gen_cores: 1.0,
            broker_cores: 1.0,
        });
    }
    let why = if no_pin {
        "--no-pin"
    } else if cpus.len() < 2 {
        "fewer than 2 CPUs"
    } else {
        "taskset not found"
    };
    Ok(Pinning {
        chrt: None,
        gen_cpu: None,
        broker_cpu: None,
        taskset: None,
        desc: format!("not pinned ({why})"),
        gen_cores: 1.0,
        broker_cores: nproc,
    })
}

fn version(s: &str) -> Result<mqtt::Version> {
    match s {
        "3.1.1" | "3" | "4" => Ok(mqtt::Version::V311),
        "5" | "5.0" => Ok(mqtt::Version::V5),
        _ => bail!("--mqtt must be 3.1.1 or 5"),
    }
}

fn select(load: &LoadArgs, nofile: u64) -> (Vec<Scenario>, Vec<String>) {
    let d = Durations {
        throughput: load.secs,
        latency: load.latency_secs,
        connect: load.connect_secs,
        http_clients: load.http_clients,
        restart_messages: load.restart_messages,
        store_bytes_messages: load.store_bytes_messages,
        many_pubs: load.many_pubs,
        sparse: load.sparse.clone(),
        sparse_period: load.sparse_period,
    };
    let (all, mut notes) = scenario::all(&d, nofile, &load.idle);
    let keep =
        |id: &str| load.only.is_empty() || load.only.iter().any(|p| id.starts_with(p.as_str()));
    notes.retain(|n| load.only.is_empty() || keep(n));
    (all.into_iter().filter(|s| keep(&s.id)).collect(), notes)
}

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn shell(cmd: &str, args: &[&str]) -> Option<String> {
    let o = std::process::Command::new(cmd).args(args).output().ok()?;
    o.status
        .success()
        .then(|| String::from_utf8_lossy(&o.stdout).trim().to_string())
}

fn summary_line(r: &Record) -> String {
    let mut s = format!(
        "{:<22} {:<9} rep {}: {}",
        r.scenario,
        r.broker,
        r.rep,
        summary_body(r)
    );
    if let Some(x) = &r.reference {
        s.push_str(&format!(
            "\n    reference ({}): {}",
            x.part.as_deref().unwrap_or("?"),
            summary_body(x)
        ));
        if let Some(v) = r.vs_reference {
            s.push_str(&format!("\n    ÷ reference: {v:.2}×"));
        }
    }
    s
}

fn summary_body(r: &Record) -> String {
    let f = report::fmt_num;
    let mut s = String::new();
    if !r.ok {
        s.push_str(&format!("FAILED {}", r.errors.join("; ")));
        return s;
    }
    match r.kind.as_str() {
        "idle" => s.push_str(&format!(
            "{} conns ({} alive), {} B/conn",
            r.conns.unwrap_or(0),
            r.conns_alive.unwrap_or(0),
            f(r.rss_per_conn.unwrap_or(0.0))
        )),
        "connect" => s.push_str(&format!(
            "{} conn/s, p99 {} µs, {} failed",
            f(r.conn_per_s.unwrap_or(0.0)),
            f(r.lat_us.as_ref().map(|l| l.p99).unwrap_or(0.0)),
            r.conns_failed.unwrap_or(0)
        )),
        "queue" | "restart" => {
            s.push_str(&format!(
                "{} msg/s PUBACKed into the offline session ({} in all), {} µs CPU/msg",
                f(r.pub_per_s.unwrap_or(0.0)),
                r.published.unwrap_or(0),
                f(r.broker_cpu_us_per_msg.unwrap_or(0.0)),
            ));
            if let Some(ms) = r.restart_ready_ms {
                s.push_str(&format!("; restart → ready {} ms", f(ms)));
            }
            s.push_str(&format!(
                "; {} delivered after {} (drain {}), {} msg/s, loss {:.3}%, {} out of order",
                r.delivered.unwrap_or(0),
                r.restart_drained_ms
                    .map(|ms| format!("{} ms", f(ms)))
                    .unwrap_or_else(|| "?".into()),
                r.drain.as_deref().unwrap_or("?"),
                f(r.msg_per_s.unwrap_or(0.0)),
                r.lost_pct.unwrap_or(0.0),
                r.out_of_order.unwrap_or(0)
            ));
        }
        "storebytes" => s.push_str(&format!(
            "{} msgs PUBACKed ({} msg/s), store {} B/msg = {}× payload ({} B per session), disk {} B/msg",
            r.published.unwrap_or(0),
            f(r.pub_per_s.unwrap_or(0.0)),
            f(r.store_bytes_per_msg.unwrap_or(0.0)),
            f(r.store_bytes_vs_payload.unwrap_or(0.0)),
            f(r.store_bytes_per_session.unwrap_or(0.0)),
            f(r.disk_bytes_per_msg.unwrap_or(0.0)),
        )),
        "http" => {
            let l = r.lat_us.clone().unwrap_or_default();
            s.push_str(&format!(
                "{} req/s, request p50/p99/p99.9 {}/{}/{} µs, {} failed",
                f(r.req_per_s.unwrap_or(0.0)),
                f(l.p50),
                f(l.p99),
                f(l.p999),
                r.requests_failed.unwrap_or(0)
            ));
            if let Some(d) = r.msg_per_s {
                s.push_str(&format!(
                    ", {} msg/s delivered, loss {:.3}%",
                    f(d),
                    r.lost_pct.unwrap_or(0.0)
                ));
            }
            if let Some(c) = r.broker_cpu_us_per_msg {
                s.push_str(&format!(", {} µs CPU/req", f(c)));
            }
        }
        _ => {
            let l = r.lat_us.clone().unwrap_or_default();
            s.push_str(&format!(
                "{} msg/s delivered (pub {}/s), loss {:.3}%, p50/p99/p99.9 {}/{}/{} µs",
                f(r.msg_per_s.unwrap_or(0.0)),
                f(r.pub_per_s.unwrap_or(0.0)),
                r.lost_pct.unwrap_or(0.0),
                f(l.p50),
                f(l.p99),
                f(l.p999)
            ));
            if let Some(c) = r.broker_cpu_us_per_msg {
                s.push_str(&format!(", {} µs CPU/msg", f(c)));
            }
            if let (Some(b), Some(n)) = (r.rss_per_conn, r.conns) {
                s.push_str(&format!(", {} B RSS/conn ({n} conns)", f(b)));
            }
            if let Some(l) = &r.send_lag_us {
                s.push_str(&format!(
                    ", send lag p99/max {}/{} µs",
                    f(l.p99),
                    f(l.max)
                ));
            }
            if let Some(m) = r.msgs_per_write.filter(|_| r.send_lag_us.is_some()) {
                s.push_str(&format!(", {m:.2} msg/write"));
            }
            if let (Some(q), Some(l)) = (r.req_per_s.filter(|_| r.kind == "admin"), &r.admin_lat_us)
            {
                s.push_str(&format!(
                    ", admin {} req/s (p50/p99 {}/{} µs, {} failed) with {} idle clients",
                    f(q),
                    f(l.p50),
                    f(l.p99),
                    r.requests_failed.unwrap_or(0),
                    r.conns.unwrap_or(0)
                ));
            }
            if let Some(u) = r.undelivered.filter(|u| *u > 0) {
                s.push_str(&format!(
                    ", {u} undelivered (drain {})",
                    r.drain.as_deref().unwrap_or("?")
                ));
            }
        }
    }
    s.push_str(&format!(
        " | gen {:.0}% broker {:.0}% others {:.2} rss {} MiB → {}",
        r.gen_cpu_util * 100.0,
        r.broker_cpu_util.unwrap_or(0.0) * 100.0,
        r.others_cpu_util.unwrap_or(0.0),
        f(r.broker_peak_rss_mib.unwrap_or(0.0)),
        r.limit
    ));
    if r.ok && !r.errors.is_empty() {
        s.push_str(&format!(" [errors: {}]", r.errors.join("; ")));
    }
    s
}

/// What every run of one invocation shares.
struct RunEnv<'a> {
    pin: &'a Pinning,
    v: mqtt::Version,
    load: &'a LoadArgs,
    work: &'a Path,
}

/// Start `kind`, run one scenario, stop it: one record. A scenario with a
/// reference measurement ([`Scenario::reference`]) takes it in the same run,
/// against a fresh process with the same pinning and priority, and the
/// record carries it (`reference`, `vs_reference`). The two alternate in
/// order from one repetition to the next, so that drift hits both alike.
async fn one_run(
    env: &RunEnv<'_>,
    kind: Kind,
    bin: &Path,
    sc: &Scenario,
    rep: u32,
    broker_version: &str,
) -> Record {
    let Some(what) = sc.reference() else {
        return measure(env, kind, bin, sc, Part::Main, rep, broker_version).await;
    };
    let (mut main, mut reference) = if rep.is_multiple_of(2) {
        let r = measure(env, kind, bin, sc, Part::Reference, rep, broker_version).await;
        (
            measure(env, kind, bin, sc, Part::Main, rep, broker_version).await,
            r,
        )
    } else {
        let m = measure(env, kind, bin, sc, Part::Main, rep, broker_version).await;
        (
            m,
            measure(env, kind, bin, sc, Part::Reference, rep, broker_version).await,
        )
    };
    reference.part = Some(what.into());
    main.vs_reference = scenario::vs_reference(&main, &reference);
    main.reference = Some(Box::new(reference));
    main
}

/// One process, one part of a scenario: one record.
async fn measure(
    env: &RunEnv<'_>,
    kind: Kind,
    bin: &Path,
    sc: &Scenario,
    part: Part,
    rep: u32,
    broker_version: &str,
) -> Record {
    let RunEnv { pin, v, load, work } = *env;
    // The f-http reference is the anchor server, not the broker.
    let anchor = part == Part::Reference && sc.kind() == "http";
    let mut rec = Record {
        scenario: sc.id.clone(),
        title: sc.title.clone(),
        kind: sc.kind().into(),
        broker: kind.name().into(),
        broker_version: broker_version.into(),
        rep,
        unix_time: now_unix(),
        pinning: pin.desc.clone(),
        ..Default::default()
    };
    let dir = work.join(format!(
        "{rep}-{}-{}{}",
        sc.id,
        kind.name(),
        if part == Part::Reference { "-ref" } else { "" }
    ));
    // Fixed-rate runs measure latency: broker and generator preempt other
    // work on the machine at once (they use well under a core here).
    let fifo = pin
        .chrt
        .as_deref()
        .filter(|_| sc.latency_sensitive())
        .map(|c| (FIFO_PRIO as u32, c));
    if fifo.is_some() {
        rec.pinning
            .push_str(&format!("; SCHED_FIFO {FIFO_PRIO} for this fixed-rate run"));
    }
    let opts = StartOpts {
        bin,
        pin_cpu: pin.broker_cpu,
        taskset: pin.taskset.as_deref(),
        fifo,
        max_connections: sc.connections() + 1000,
        dir: dir.clone(),
        env: Vec::new(),
        queue: sc.queue_caps(),
    };
    let started = if anchor {
        Broker::start_anchor(&opts).await
    } else {
        Broker::start(kind, &opts).await
    };
    if anchor {
        rec.broker_version = "hyper (http-anchor)".into();
    }
    let mut b = match started {
        Ok(b) => b,
        Err(e) => {
            rec.errors.push(format!("{e:#}"));
            return rec;
        }
    };
    // It inherits this process's limit (sys::raise_nofile); say so if that
    // is too low for the scenario's connections.
    let need = sc.connections() as u64 + 100;
    if let Some(lim) = sys::proc_nofile(b.pid).filter(|l| *l < need) {
        rec.errors.push(format!(
            "the broker's open-file limit is {lim}, below the {need} this scenario needs"
        ));
    }
    let ctx = Ctx {
        addr: b.addr,
        http: b.http,
        admin: b.admin,
        broker_pid: Some(b.pid),
        v,
        gen_cores: pin.gen_cores,
        broker_cores: pin.broker_cores,
        pinning: rec.pinning.clone(),
        gen_cpu: pin.gen_cpu,
        broker_cpu: pin.broker_cpu,
        window: load.window,
        batch: load.batch,
    };
    let limit = Duration::from_secs_f64(sc.secs + 120.0);
    let rt = fifo.is_some() && sys::set_fifo(Some(FIFO_PRIO));
    let res = if matches!(sc.spec, scenario::Spec::Restart { .. }) {
        // It kills and restarts the broker itself.
        tokio::time::timeout(
            limit,
            scenario::run_restart(&ctx, sc, &mut rec, &mut b, &opts),
        )
        .await
    } else {
        tokio::time::timeout(limit, scenario::run_scenario(&ctx, sc, part, &mut rec)).await
    };
    if rt {
        sys::set_fifo(None);
    }
    if let Ok(m) = sys::proc_mem(b.pid) {
        rec.broker_rss_mib = Some(m.rss as f64 / 1048576.0);
        rec.broker_peak_rss_mib = Some(m.hwm as f64 / 1048576.0);
        rec.broker_threads = Some(m.threads);
    }
    let alive = b.alive();
    match res {
        Ok(Ok(())) if alive => rec.ok = true,
        Ok(Ok(())) => rec
            .errors
            .push(format!("broker exited during the run\n{}", b.log_tail())),
        Ok(Err(e)) => rec.errors.push(format!("{e:#}")),
        Err(_) => rec
            .errors
            .push(format!("run exceeded {} s", limit.as_secs())),
    }
    b.stop();
    drop(b);
    if rec.ok {
        let _ = std::fs::remove_dir_all(&dir);
    }
    rec
}

fn bin_for(a: &CompareArgs, k: Kind) -> Result<PathBuf> {
    let p = match k {
        Kind::Starling | Kind::StarlingMem => &a.starling_bin,
        Kind::Mosquitto => &a.mosquitto_bin,
        Kind::Rumqttd => &a.rumqttd_bin,
    };
    sys::find_in_path(&p.to_string_lossy())
        .and_then(|p| std::fs::canonicalize(p).ok())
        .with_context(|| {
            format!(
                "{} binary not found at {} (bench/run.sh builds and installs everything)",
                k.name(),
                p.display()
            )
        })
}

fn append_line(f: &mut std::fs::File, v: &impl serde::Serialize) -> Result<()> {
    let line = serde_json::to_string(v)?;
    writeln!(f, "{line}")?;
    f.flush()?;
    Ok(())
}

#[derive(serde::Serialize, serde::Deserialize, Default, Clone)]
struct Meta {
    date: String,
    command: String,
    machine: String,
    pinning: String,
    nofile: u64,
    versions: Vec<String>,
    mqtt: String,
    repeat: u32,
    secs: String,
    load_before: String,
    notes: Vec<String>,
    brokers: Vec<String>,
}

#[derive(serde::Serialize)]
struct MetaLine<'a> {
    meta: &'a Meta,
}

async fn compare(a: CompareArgs, pin: &Pinning, nofile: u64) -> Result<()> {
    let v = version(&a.load.mqtt)?;
    let kinds: Vec<Kind> = a
        .brokers
        .iter()
        .map(|b| Kind::parse(b))
        .collect::<Result<_>>()?;
    let (scenarios, mut notes) = select(&a.load, nofile);
    if scenarios.is_empty() {
        bail!("no scenario selected");
    }
    // A broker no selected scenario supports is not run (its column says
    // n/a), so it needs no binary.
    let runs = |k: Kind| scenarios.iter().any(|sc| sc.supports(k));
    if a.list_brokers {
        for k in kinds.iter().filter(|k| runs(**k)) {
            println!("{}", k.name());
        }
        return Ok(());
    }
    let out_path = a.out.clone().context("--out is required")?;
    let mut bins = Vec::new();
    for k in &kinds {
        bins.push(if runs(*k) {
            Some(bin_for(&a, *k)?)
        } else {
            None
        });
    }
    // Starling's alone for what only it has (the memory-only Starling runs
    // only the persistence comparisons by design, so it does not count).
    let peers = |sc: &&Scenario| {
        kinds
            .iter()
            .any(|k| matches!(k, Kind::Mosquitto | Kind::Rumqttd) && !sc.supports(*k))
    };
    let only_starling: Vec<&str> = scenarios
        .iter()
        .filter(peers)
        .filter(|sc| matches!(sc.kind(), "http" | "wsfanout"))
        .map(|sc| sc.id.as_str())
        .collect();
    let only_store: Vec<&str> = scenarios
        .iter()
        .filter(|sc| matches!(sc.kind(), "restart" | "storebytes"))
        .map(|sc| sc.id.as_str())
        .collect();
    if !only_store.is_empty() {
        notes.push(format!(
            "{}: Starling with its store only (a restart after kill -9 keeps nothing in mosquitto's memory-only default, and only Starling has the store's byte counter)",
            only_store.join(", ")
        ));
    }
    let persistent: Vec<&str> = scenarios
        .iter()
        .filter(|sc| sc.supports(Kind::StarlingMem))
        .map(|sc| sc.id.as_str())
        .collect();
    if !persistent.is_empty() && kinds.contains(&Kind::Rumqttd) {
        notes.push(format!(
            "{}: Starling (data directory, durability fsync), Starling memory-only (no data directory) and mosquitto (persistence false, its default); not rumqttd",
            persistent.join(", ")
        ));
    }
    if !only_starling.is_empty() {
        notes.push(format!(
            "{}: Starling only (n/a for mosquitto and rumqttd, which have no HTTP publish interface and no WebSocket topic streams); each Starling run also measures its reference in the same run (f-http: the `http-anchor` hyper server; g-ws-fanout: 100 MQTT subscribers), alternating which goes first",
            only_starling.join(", ")
        ));
    }
    let m = sys::machine();
    let mut versions = Vec::new();
    for (k, bin) in kinds.iter().zip(&bins) {
        let Some(bin) = bin else {
            versions.push(format!(
                "{}: not run (the selected scenarios need what only Starling has)",
                k.title()
            ));
            continue;
        };
        versions.push(match k {
            Kind::Starling => format!(
                "Starling {} (commit {})",
                bin.display(),
                shell("git", &["rev-parse", "--short", "HEAD"]).unwrap_or_else(|| "?".into())
            ),
            Kind::StarlingMem => {
                "Starling memory-only: the same binary without a data directory".into()
            }
            Kind::Mosquitto => format!(
                "mosquitto {} (Debian package)",
                broker::mosquitto_version(bin)
            ),
            Kind::Rumqttd => "rumqttd 0.20.0 (crates.io, bench/peers/rumqttd)".into(),
        });
    }
    let meta = Meta {
        date: shell("date", &["-u", "+%Y-%m-%d %H:%M UTC"]).unwrap_or_default(),
        command: a.command.clone(),
        machine: format!(
            "{} × {}, {}, Linux {}",
            m.nproc, m.cpu_model, m.mem_total, m.kernel
        ),
        pinning: pin.desc.clone(),
        nofile,
        versions,
        mqtt: a.load.mqtt.clone(),
        repeat: a.repeat,
        secs: format!(
            "throughput/fan-out {} s, latency {} s, connect {} s (+ warm-up and drain)",
            a.load.secs, a.load.latency_secs, a.load.connect_secs
        ),
        load_before: std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
            .to_string(),
        notes: notes.clone(),
        brokers: kinds.iter().map(|k| k.name().to_string()).collect(),
    };
    if let Some(dir) = out_path.parent() {
        std::fs::create_dir_all(dir).ok();
    }
    let mut out = std::fs::File::create(&out_path)
        .with_context(|| format!("create {}", out_path.display()))?;
    append_line(&mut out, &MetaLine { meta: &meta })?;
    let work = std::env::temp_dir().join(format!("starling-bench-{}", std::process::id()));
    let pairs = scenarios
        .iter()
        .map(|sc| kinds.iter().filter(|k| sc.supports(**k)).count())
        .sum::<usize>();
    let total = pairs * a.repeat as usize;
    eprintln!(
        "starling-bench: {} scenarios × {} brokers × {} reps = {total} runs; {}",
        scenarios.len(),
        kinds.len(),
        a.repeat,
        pin.desc
    );
    let started = Instant::now();
    let env = RunEnv {
        pin,
        v,
        load: &a.load,
        work: &work,
    };
    let mut recs = Vec::new();
    let mut i = 0;
    // Repetition outermost, brokers innermost: A B C A B C … so slow drift
    // (other work on the machine) hits every broker alike.
    for rep in 1..=a.repeat {
        for sc in &scenarios {
            for (k, bin) in kinds.iter().zip(&bins) {
                let Some(bin) = bin.as_deref().filter(|_| sc.supports(*k)) else {
                    continue;
                };
                i += 1;
                let ver = match k {
                    Kind::Mosquitto => broker::mosquitto_version(bin),
                    Kind::Rumqttd => "0.20.0".into(),
                    Kind::Starling | Kind::StarlingMem => {
                        shell("git", &["rev-parse", "--short", "HEAD"])
                            .unwrap_or_else(|| "?".into())
                    }
                };
                let mut rec = one_run(&env, *k, bin, sc, rep, &ver).await;
                rec.mqtt = a.load.mqtt.clone();
                append_line(&mut out, &rec)?;
                eprintln!("[{i}/{total}] {}", summary_line(&rec));
                recs.push(rec);
            }
        }
    }
    let _ = std::fs::remove_dir_all(&work);
    append_line(
        &mut out,
        &serde_json::json!({ "end": { "took_s": started.elapsed().as_secs_f64() } }),
    )?;
    eprintln!(
        "starling-bench: {total} runs in {:.1} min → {}",
        started.elapsed().as_secs_f64() / 60.0,
        out_path.display()
    );
    if let Some(md) = &a.markdown {
        write_markdown(md, &meta, &recs, Some(started.elapsed()), &out_path)?;
    }
    Ok(())
}

fn header(meta: &Meta, recs: &[Record], took: Option<Duration>, jsonl: &Path) -> String {
    // Reference measurements are windows of the run too.
    let others: Vec<f64> = recs
        .iter()
        .flat_map(|r| std::iter::once(r).chain(r.reference.as_deref()))
        .filter_map(|r| r.others_cpu_util)
        .collect();
    let avg = others.iter().sum::<f64>() / others.len().max(1) as f64;
    let max = others.iter().cloned().fold(0.0, f64::max);
    let mut s = String::new();
    s.push_str("### Latest full comparison\n\n");
    s.push_str(&format!(
        "- Date: {}{}\n",
        meta.date,
        took.map(|t| format!(", took {:.1} min", t.as_secs_f64() / 60.0))
            .unwrap_or_default()
    ));
    s.push_str(&format!("- Command: `{}`\n", meta.command));
    s.push_str(&format!("- Machine: {}\n", meta.machine));
    s.push_str(&format!("- Pinning: {}\n", meta.pinning));
    s.push_str(&format!("- Brokers: {}\n", meta.versions.join("; ")));
    s.push_str(&format!(
        "- Load: MQTT {}, {} repetitions interleaved ({}, {}, …), {}\n",
        meta.mqtt,
        meta.repeat,
        meta.brokers.join(", "),
        meta.brokers.first().cloned().unwrap_or_default(),
        meta.secs
    ));
    s.push_str(&format!(
        "- Other processes on the machine used {avg:.2} cores on average during the measured windows (max {max:.2}); load average before the run: {}{}\n",
        meta.load_before,
        if avg >= 0.15 {
            ". **Shared machine: other work competed for the CPUs, so absolute numbers are noisy; compare the ratios.**"
        } else if max > 0.3 {
            ". A shared machine, mostly quiet during this run: the few windows that overlapped other work show it in the `others` column"
        } else {
            ""
        }
    ));
    s.push_str(&format!(
        "- Raw results (one JSON line per run): `{}`\n",
        jsonl.display()
    ));
    s
}

fn write_markdown(
    md: &Path,
    meta: &Meta,
    recs: &[Record],
    took: Option<Duration>,
    jsonl: &Path,
) -> Result<()> {
    let kinds: Vec<Kind> = meta
        .brokers
        .iter()
        .filter_map(|b| Kind::parse(b).ok())
        .collect();
    let section = report::markdown(recs, &kinds, &header(meta, recs, took, jsonl), &meta.notes);
    let existing = std::fs::read_to_string(md).ok();
    std::fs::write(md, report::splice(existing.as_deref(), &section))
        .with_context(|| format!("write {}", md.display()))?;
    eprintln!("starling-bench: table written to {}", md.display());
    Ok(())
}

fn report_cmd(a: ReportArgs) -> Result<()> {
    let text =
        std::fs::read_to_string(&a.input).with_context(|| format!("read {}", a.input.display()))?;
    let mut meta = Meta::default();
    let mut took = None;
    let mut recs = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value =
            serde_json::from_str(line).with_context(|| format!("line {}", n + 1))?;
        if let Some(m) = v.get("meta") {
            meta = serde_json::from_value(m.clone()).context("meta line")?;
        } else if let Some(e) = v.get("end") {
            took = e
                .get("took_s")
                .and_then(|t| t.as_f64())
                .map(Duration::from_secs_f64);
        } else {
            recs.push(
                serde_json::from_value::<Record>(v).with_context(|| format!("line {}", n + 1))?,
            );
        }
    }
    if meta.brokers.is_empty() {
        let mut b: Vec<String> = recs.iter().map(|r| r.broker.clone()).collect();
        b.dedup();
        meta.brokers = b;
    }
    match &a.markdown {
        Some(md) => write_markdown(md, &meta, &recs, took, &a.input),
        None => {
            let kinds: Vec<Kind> = meta
                .brokers
                .iter()
                .filter_map(|b| Kind::parse(b).ok())
                .collect();
            println!(
                "{}",
                report::markdown(
                    &recs,
                    &kinds,
                    &header(&meta, &recs, took, &a.input),
                    &meta.notes
                )
            );
            Ok(())
        }
    }
}

async fn smoke(a: SmokeArgs, pin: &Pinning, nofile: u64) -> Result<()> {
    let bin = sys::find_in_path(&a.starling_bin.to_string_lossy())
        .and_then(|p| std::fs::canonicalize(p).ok())
        .with_context(|| {
            format!(
                "Starling binary not found at {} (set BENCH_STARLING_BIN)",
                a.starling_bin.display()
            )
        })?;
    let load = LoadArgs {
        mqtt: "3.1.1".into(),
        secs: a.secs,
        latency_secs: a.secs,
        connect_secs: a.secs,
        idle: vec![a.idle],
        many_pubs: a.many_pubs,
        sparse: vec![a.sparse],
        sparse_period: 1.0,
        only: [
            "a-fanin-q0-64B",
            "a-fanin-q1-64B",
            "b-fanout-100-fixed",
            "c-latency-q0",
            "c-latency-q1",
            "d-idle",
            "e-connect",
            "f-http",
            "g-ws-fanout",
            "h-admin-latency-q1",
            "i-",
            "p-",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect(),
        window: 64,
        batch: 32,
        http_clients: scenario::HTTP_CLIENTS,
        restart_messages: a.restart_messages,
        store_bytes_messages: a.store_bytes_messages,
        no_pin: false,
        no_fifo: true,
        nice: 0,
    };
    let (mut scenarios, _) = select(&load, nofile);
    // The admin listing too lists --idle clients, not 10,000.
    for sc in scenarios.iter_mut() {
        if let scenario::Spec::AdminLatency { idle, .. } = &mut sc.spec {
            sc.title = sc
                .title
                .replacen(&format!(" {idle} idle"), &format!(" {} idle", a.idle), 1);
            *idle = a.idle;
        }
    }
    // Those with a reference measure twice (two processes): half the window
    // each keeps them at a few seconds.
    for sc in scenarios.iter_mut().filter(|sc| sc.reference().is_some()) {
        sc.secs = (a.secs / 2.0).max(0.5);
    }
    let work = std::env::temp_dir().join(format!("starling-bench-smoke-{}", std::process::id()));
    let mut out = match &a.out {
        Some(p) => {
            if let Some(d) = p.parent() {
                std::fs::create_dir_all(d).ok();
            }
            Some(std::fs::File::create(p).with_context(|| format!("create {}", p.display()))?)
        }
        None => None,
    };
    let mut failed = Vec::new();
    println!("starling-bench smoke: {} ({})", bin.display(), pin.desc);
    for sc in &scenarios {
        let env = RunEnv {
            pin,
            v: mqtt::Version::V311,
            load: &load,
            work: &work,
        };
        let t = Instant::now();
        let mut rec = one_run(&env, Kind::Starling, &bin, sc, 1, "smoke").await;
        rec.mqtt = "3.1.1".into();
        if let Some(f) = out.as_mut() {
            append_line(f, &rec)?;
        }
        let verdict = scenario::smoke_check(&rec);
        println!(
            "{} {} ({:.1} s)",
            if verdict.is_ok() { "ok  " } else { "FAIL" },
            summary_line(&rec),
            t.elapsed().as_secs_f64()
        );
        if let Err(e) = verdict {
            failed.push(format!("{}: {e:#}", sc.id));
        }
    }
    let _ = std::fs::remove_dir_all(&work);
    let passed = scenarios.len() - failed.len();
    println!("smoke: {} passed, {} failed", passed, failed.len());
    if !failed.is_empty() {
        for f in &failed {
            eprintln!("  {f}");
        }
        bail!("smoke failed: {} scenario(s)", failed.len());
    }
    Ok(())
}

async fn soak_cmd(a: SoakArgs) -> Result<()> {
    let bin = sys::find_in_path(&a.starling_bin.to_string_lossy())
        .and_then(|p| std::fs::canonicalize(p).ok())
        .with_context(|| {
            format!(
                "Starling binary not found at {} (set BENCH_STARLING_BIN)",
                a.starling_bin.display()
            )
        })?;
    let out = a.out.unwrap_or_else(|| {
        let stamp =
            shell("date", &["-u", "+%Y%m%dT%H%M%SZ"]).unwrap_or_else(|| now_unix().to_string());
        PathBuf::from(format!("bench/results/soak-{stamp}.jsonl"))
    });
    soak::run(soak::Opts {
        bin,
        secs: a.duration,
        report_every: a.report_every,
        reload_every: a.reload_every,
        rate: a.rate,
        short_rate: a.short_rate,
        out,
        rss_limit_mib: a.rss_limit_mib,
        rss_limit_pct: a.rss_limit_pct,
        fd_slack: a.fd_slack,
        command: a.command,
        keep: a.keep,
    })
    .await
}

async fn run_external(a: RunArgs, pin: &Pinning, nofile: u64) -> Result<()> {
    let v = version(&a.load.mqtt)?;
    let (scenarios, notes) = select(&a.load, nofile);
    for n in notes {
        eprintln!("note: {n}");
    }
    broker::probe(a.addr, Duration::from_secs(5))
        .await
        .with_context(|| format!("no MQTT broker answering at {}", a.addr))?;
    let ctx = Ctx {
        addr: a.addr,
        http: a.http,
        admin: a.admin,
        broker_pid: a.pid,
        v,
        gen_cores: pin.gen_cores,
        broker_cores: if a.pid.is_some() {
            1.0
        } else {
            pin.broker_cores
        },
        pinning: format!("{} (broker started by the user)", pin.desc),
        gen_cpu: pin.gen_cpu,
        broker_cpu: None,
        window: a.load.window,
        batch: a.load.batch,
    };
    for sc in &scenarios {
        let mut rec = Record {
            broker: a.name.clone(),
            rep: 1,
            unix_time: now_unix(),
            ..Default::default()
        };
        match scenario::run_scenario(&ctx, sc, Part::Main, &mut rec).await {
            Ok(()) => rec.ok = true,
            Err(e) => rec.errors.push(format!("{e:#}")),
        }
        if let Some(pid) = a.pid
            && let Ok(m) = sys::proc_mem(pid)
        {
            rec.broker_rss_mib = Some(m.rss as f64 / 1048576.0);
            rec.broker_peak_rss_mib = Some(m.hwm as f64 / 1048576.0);
        }
        eprintln!("{}", summary_line(&rec));
        println!("{}", serde_json::to_string(&rec)?);
    }
    Ok(())
}
