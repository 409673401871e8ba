//! Processes for benches that model separate hosts on one machine: CPU pinning with `taskset`
//! (util-linux), CPU seconds read from /proc, and child processes that are stopped on every
//! path, errors and panics included (a dropped guard kills its child).

use std::ffi::OsStr;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// Fails with what to install when `taskset` or `setpriv` is missing, and when the CPUs are not
/// all usable.
pub fn require_pinning_tools(cpus: &[u32]) -> Result<()> {
    for tool in ["taskset", "setpriv"] {
        let ok = Command::new(tool)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            bail!(
                "split mode runs its processes under `{tool}`, which is not installed \
                 (Debian: apt-get install -y util-linux)"
            );
        }
    }
    let allowed = allowed_cpus(None).unwrap_or_default();
    for cpu in cpus {
        if !cpu_list_contains(&allowed, *cpu) {
            bail!("split mode needs CPU {cpu}, but this process may only use CPUs {allowed:?}");
        }
    }
    Ok(())
}

/// Pins every thread of this process to `cpu`; threads started later inherit the mask, so call
/// it before building the async runtime.
pub fn pin_self(cpu: u32) -> Result<()> {
    let st = Command::new("taskset")
        .args([
            "-a",
            "-p",
            "-c",
            &cpu.to_string(),
            &std::process::id().to_string(),
        ])
        .stdout(Stdio::null())
        .status()
        .context("running taskset")?;
    let now = allowed_cpus(None).unwrap_or_default();
    if !st.success() || now != cpu.to_string() {
        bail!("taskset could not pin this process to CPU {cpu} (allowed now: {now:?})");
    }
    Ok(())
}

/// `Cpus_allowed_list` of a process (`None`: this one), as the kernel prints it ("0", "0-1").
pub fn allowed_cpus(pid: Option<u32>) -> Option<String> {
    std::fs::read_to_string(proc_path(pid, "status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .map(|v| v.trim().to_string())
}

fn cpu_list_contains(list: &str, cpu: u32) -> bool {
    list.split(',').any(|part| match part.split_once('-') {
        Some((lo, hi)) => matches!((lo.parse::<u32>(), hi.parse::<u32>()), (Ok(lo), Ok(hi)) if (lo..=hi).contains(&cpu)),
        None => part.parse() == Ok(cpu),
    })
}

fn proc_path(pid: Option<u32>, file: &str) -> String {
    match pid {
        Some(p) => format!("/proc/{p}/{file}"),
        None => format!("/proc/self/{file}"),
    }
}

/// Sum of the given `/proc/PID/stat` fields (numbered as in proc(5)) in seconds (USER_HZ =
/// 100); NaN where unavailable.
fn stat_secs(pid: Option<u32>, fields: [usize; 2]) -> f64 {
    let Ok(stat) = std::fs::read_to_string(proc_path(pid, "stat")) else {
        return f64::NAN;
    };
    // The command name (field 2) may hold spaces; count from the field after it (state, 3).
    let Some((_, rest)) = stat.rsplit_once(") ") else {
        return f64::NAN;
    };
    let values: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |field: usize| values.get(field - 3).and_then(|f| f.parse::<u64>().ok());
    match (ticks(fields[0]), ticks(fields[1])) {
        (Some(a), Some(b)) => (a + b) as f64 / 100.0,
        _ => f64::NAN,
    }
}

/// User + system CPU seconds of a process (`None`: this one), all its threads, exited ones
/// included (utime + stime, fields 14 and 15).
pub fn cpu_secs(pid: Option<u32>) -> f64 {
    stat_secs(pid, [14, 15])
}

/// CPU seconds of this process's children that have exited and been waited for (cutime +
/// cstime, fields 16 and 17): the difference around `Command::status` is that command's CPU.
pub fn children_cpu_secs() -> f64 {
    stat_secs(None, [16, 17])
}

/// Time one CPU has spent since boot, from its line in /proc/stat (USER_HZ = 100).
#[derive(Clone, Copy, Default)]
pub struct CoreSecs {
    /// user + nice + system: any process or kernel thread.
    pub tasks: f64,
    /// irq + softirq: interrupt handlers and softirqs run outside any task's accounting (for
    /// example loopback TCP receive processing), charged to no process.
    pub irq: f64,
    /// Taken by the hypervisor while this vCPU wanted to run.
    pub steal: f64,
}

impl std::ops::Sub for CoreSecs {
    type Output = CoreSecs;
    fn sub(self, o: CoreSecs) -> CoreSecs {
        CoreSecs {
            tasks: self.tasks - o.tasks,
            irq: self.irq - o.irq,
            steal: self.steal - o.steal,
        }
    }
}

/// `CoreSecs` of `cpu`; NaN where unavailable.
pub fn core_secs(cpu: u32) -> CoreSecs {
    let nan = CoreSecs {
        tasks: f64::NAN,
        irq: f64::NAN,
        steal: f64::NAN,
    };
    let Ok(stat) = std::fs::read_to_string("/proc/stat") else {
        return nan;
    };
    let label = format!("cpu{cpu}");
    let Some(line) = stat
        .lines()
        .find(|l| l.split_whitespace().next() == Some(label.as_str()))
    else {
        return nan;
    };
    // proc(5): user nice system idle iowait irq softirq steal guest guest_nice (guest time is
    // already counted in user).
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map_while(|f| f.parse().ok())
        .collect();
    if v.len() < 8 {
        return nan;
    }
    CoreSecs {
        tasks: (v[0] + v[1] + v[2]) as f64 / 100.0,
        irq: (v[5] + v[6]) as f64 / 100.0,
        steal: v[7] as f64 / 100.0,
    }
}

/// `taskset -c CPU PROGRAM`: taskset sets the mask and executes the program in its place, so
/// the child's pid is the program's.
pub fn pinned(cpu: u32, program: impl AsRef<OsStr>) -> Command {
    let mut cmd = Command::new("taskset");
    cmd.arg("-c").arg(cpu.to_string()).arg(program);
    cmd
}

/// `setpriv --pdeathsig TERM taskset -c CPU PROGRAM`: a server that also gets SIGTERM if the
/// bench is killed outright (no destructor runs then). The signal follows the *thread* that
/// spawned the child, so spawn it from the main thread (the `block_on` future runs there).
pub fn pinned_server(cpu: u32, program: impl AsRef<OsStr>) -> Command {
    let mut cmd = Command::new("setpriv");
    cmd.args(["--pdeathsig", "TERM", "taskset", "-c"])
        .arg(cpu.to_string())
        .arg(program);
    cmd
}

/// How a child is asked to stop.
#[derive(Clone, Copy)]
pub enum StopBy {
    /// SIGTERM (a server that shuts down cleanly on it).
    Term,
    /// Closing its stdin (a child that runs until its stdin ends, which also happens when the
    /// bench dies without cleaning up).
    CloseStdin,
}

/// A child process that is killed (SIGKILL) and reaped if it is dropped without `stop`.
pub struct ChildGuard {
    child: Option<Child>,
    name: &'static str,
    stop_by: StopBy,
}

impl ChildGuard {
    /// Spawns `cmd` with stdout piped and stdin piped (`StopBy::CloseStdin`) or null, then
    /// waits up to `timeout` for `ready` to return `Some` on a stdout line; the remaining
    /// stdout is drained in the background so the child never blocks on a full pipe.
    pub fn spawn<T: Send + 'static>(
        name: &'static str,
        cmd: &mut Command,
        stop_by: StopBy,
        timeout: Duration,
        mut ready: impl FnMut(&str) -> Option<T>,
    ) -> Result<(Self, T)> {
        cmd.stdout(Stdio::piped()).stdin(match stop_by {
            StopBy::Term => Stdio::null(),
            StopBy::CloseStdin => Stdio::piped(),
        });
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting the {name}"))?;
        let stdout = child.stdout.take().expect("stdout is piped");
        let mut guard = ChildGuard {
            child: Some(child),
            name,
            stop_by,
        };
        let (tx, rx) = mpsc::channel::<String>();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                // After readiness nobody listens: keep reading until the child exits.
                let _ = tx.send(line);
            }
        });
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    if let Some(v) = ready(&line) {
                        return Ok((guard, v));
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    bail!("the {name} was not ready within {} s", timeout.as_secs())
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    std::thread::sleep(Duration::from_millis(100));
                    let status = guard
                        .child
                        .as_mut()
                        .and_then(|c| c.try_wait().ok().flatten());
                    bail!("the {name} closed its output before it was ready (exit: {status:?})");
                }
            }
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// User + system CPU seconds the child has used so far.
    pub fn cpu_secs(&self) -> f64 {
        cpu_secs(Some(self.pid()))
    }

    /// Asks the child to stop, waits up to 30 s and returns its exit status; on any error the
    /// guard is dropped, which kills and reaps the child.
    pub fn stop(mut self) -> Result<ExitStatus> {
        let pid = self.pid().to_string();
        match self.stop_by {
            StopBy::Term => {
                let st = Command::new("kill").args(["-TERM", &pid]).status()?;
                if !st.success() {
                    bail!("kill -TERM {pid} ({}) failed: {st}", self.name);
                }
            }
            StopBy::CloseStdin => {
                drop(self.child.as_mut().and_then(|c| c.stdin.take()));
            }
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Some(status) = self
                .child
                .as_mut()
                .map(Child::try_wait)
                .transpose()?
                .flatten()
            {
                self.child = None;
                return Ok(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        bail!("the {} did not stop within 30 s; killing it", self.name)
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
