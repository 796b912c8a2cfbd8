//! Process accounting: the generator's own CPU time (getrusage), the broker's
//! CPU time and memory (/proc/<pid>/stat, /proc/<pid>/status), whole-machine
//! CPU use (/proc/stat, to see other people's work on a shared machine), file
//! descriptor limits and CPU pinning.

use anyhow::{Context, Result, bail};
use std::path::Path;
use std::time::Duration;

/// CPU time (user + system) this process has used.
pub fn self_cpu() -> Duration {
    // SAFETY: getrusage only writes into the struct we pass.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    if rc != 0 {
        return Duration::ZERO;
    }
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, (t.tv_usec as u32) * 1000);
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

fn clock_ticks() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as u64 } else { 100 }
}

/// CPU time (user + system, all threads) of another process.
pub fn proc_cpu(pid: u32) -> Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("read /proc/{pid}/stat"))?;
    // The command name is in parentheses and may contain spaces.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .context("malformed /proc/pid/stat")?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest[0] is field 3 (state); utime is field 14, stime field 15.
    let num = |i: usize| -> Result<u64> {
        f.get(i)
            .context("short /proc/pid/stat")?
            .parse::<u64>()
            .context("bad number in /proc/pid/stat")
    };
    let ticks = num(11)? + num(12)?;
    Ok(Duration::from_nanos(ticks * 1_000_000_000 / clock_ticks()))
}

#[derive(Clone, Copy, Debug, Default)]
pub struct Mem {
    /// Resident set size now, bytes.
    pub rss: u64,
    /// Peak resident set size, bytes.
    pub hwm: u64,
    pub threads: u64,
}

pub fn proc_mem(pid: u32) -> Result<Mem> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("read /proc/{pid}/status"))?;
    let mut m = Mem::default();
    for line in status.lines() {
        let mut it = line.split_whitespace();
        let (Some(key), Some(val)) = (it.next(), it.next()) else {
            continue;
        };
        let v: u64 = val.parse().unwrap_or(0);
        match key {
            "VmRSS:" => m.rss = v * 1024,
            "VmHWM:" => m.hwm = v * 1024,
            "Threads:" => m.threads = v,
            _ => {}
        }
    }
    Ok(m)
}

/// Bytes the process caused to be written to storage (`write_bytes` of
/// `/proc/<pid>/io`, all threads; needs the right to read it).
pub fn proc_write_bytes(pid: u32) -> Option<u64> {
    let io = std::fs::read_to_string(format!("/proc/{pid}/io")).ok()?;
    io.lines()
        .find_map(|l| l.strip_prefix("write_bytes:"))
        .and_then(|v| v.trim().parse().ok())
}

/// (busy, total) jiffies: index 0 the whole machine, index i + 1 CPU i.
pub fn machine_cpu() -> Option<Vec<(u64, u64)>> {
    let s = std::fs::read_to_string("/proc/stat").ok()?;
    let mut out = Vec::new();
    for line in s.lines().take_while(|l| l.starts_with("cpu")) {
        let v: Vec<u64> = line
            .split_whitespace()
            .skip(1)
            .filter_map(|x| x.parse().ok())
            .collect();
        if v.len() < 5 {
            return None;
        }
        let total: u64 = v.iter().take(8).sum();
        let idle = v[3] + v[4];
        out.push((total - idle, total));
    }
    (!out.is_empty()).then_some(out)
}

pub fn jiffies_to_secs(j: u64) -> f64 {
    j as f64 / clock_ticks() as f64
}

/// Most open files [`raise_nofile`] asks for: enough for `d-idle-50k` and
/// `i-sparse-50k` (both ends on one machine) with room to spare.
pub const NOFILE_CAP: u64 = 262_144;

/// Raise the open-file limit as far as this process may; returns the new
/// soft limit. Children (the brokers) inherit it.
///
/// Where permitted (root with CAP_SYS_RESOURCE) the hard limit is raised
/// too, to `/proc/sys/fs/nr_open` capped at [`NOFILE_CAP`]; where setrlimit
/// refuses that, the soft limit goes up to the hard limit as before.
pub fn raise_nofile() -> u64 {
    let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(1 << 20);
    let cap = nr_open.min(NOFILE_CAP);
    // SAFETY: get/setrlimit only read/write the struct we pass.
    unsafe {
        let mut rl: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) != 0 {
            return 1024;
        }
        if rl.rlim_max < cap {
            let want = libc::rlimit {
                rlim_cur: cap,
                rlim_max: cap,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &want) == 0 {
                return cap;
            }
        }
        // The soft limit may not exceed nr_open even if the hard limit is
        // unlimited.
        let soft = rl.rlim_max.min(nr_open);
        if rl.rlim_cur < soft {
            let want = libc::rlimit {
                rlim_cur: soft,
                rlim_max: rl.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &want) == 0 {
                return soft;
            }
        }
        rl.rlim_cur
    }
}

/// Soft open-file limit of another process (`Max open files` of
/// `/proc/<pid>/limits`).
pub fn proc_nofile(pid: u32) -> Option<u64> {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).ok()?;
    let rest = limits
        .lines()
        .find_map(|l| l.strip_prefix("Max open files"))?;
    let soft = rest.split_whitespace().next()?;
    if soft == "unlimited" {
        return Some(u64::MAX);
    }
    soft.parse().ok()
}

/// CPUs this process may run on.
pub fn allowed_cpus() -> Vec<usize> {
    // SAFETY: the set is plain data, sched_getaffinity writes into it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return vec![0];
        }
        (0..libc::CPU_SETSIZE as usize)
            .filter(|&c| libc::CPU_ISSET(c, &set))
            .collect()
    }
}

/// Pin the calling thread (and the threads it starts later) to one CPU.
pub fn pin_self(cpu: usize) -> Result<()> {
    // SAFETY: as above.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            bail!(
                "sched_setaffinity(cpu {cpu}): {}",
                std::io::Error::last_os_error()
            );
        }
    }
    Ok(())
}

/// Raise this process's scheduling priority (a negative nice value); the
/// brokers it starts inherit it. Returns false where not permitted.
pub fn renice(nice: i32) -> bool {
    // SAFETY: setpriority has no memory-safety preconditions. On Linux it
    // applies to the calling thread, which is the one that starts the
    // runtime and the brokers (they inherit it).
    unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, nice) == 0 }
}

/// Switch the calling thread to SCHED_FIFO at `prio`, or back to
/// SCHED_OTHER with `prio` None. Returns false where not permitted.
pub fn set_fifo(prio: Option<i32>) -> bool {
    let (policy, p) = match prio {
        Some(p) => (libc::SCHED_FIFO, p),
        None => (libc::SCHED_OTHER, 0),
    };
    let param = libc::sched_param { sched_priority: p };
    // SAFETY: the parameter struct is plain data read by the call.
    unsafe { libc::sched_setscheduler(0, policy, &param) == 0 }
}

pub fn find_in_path(name: &str) -> Option<std::path::PathBuf> {
    if name.contains('/') {
        let p = Path::new(name);
        return p.is_file().then(|| p.to_path_buf());
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

pub fn send_signal(pid: u32, sig: i32) {
    // SAFETY: kill has no memory-safety preconditions.
    unsafe {
        libc::kill(pid as libc::pid_t, sig);
    }
}

/// A one-line description of the machine.
pub struct Machine {
    pub nproc: usize,
    pub cpu_model: String,
    pub kernel: String,
    pub mem_total: String,
}

pub fn machine() -> Machine {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu_model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, m)| m.trim().to_string())
        .unwrap_or_else(|| "unknown".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into());
    let mem_total = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map(|kb| format!("{:.1} GiB", kb as f64 / 1024.0 / 1024.0))
        .unwrap_or_else(|| "unknown".into());
    // SAFETY: sysconf has no preconditions. (Not available_parallelism: it
    // honours this process's own pinning.)
    let online = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    let nproc = if online > 0 { online as usize } else { 1 };
    Machine {
        nproc,
        cpu_model,
        kernel,
        mem_total,
    }
}
