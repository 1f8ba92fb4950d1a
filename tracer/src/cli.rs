//! The command line (clap derive): tracing, `record`, `replay`.

use std::{ffi::OsString, path::PathBuf, time::Duration};

use crate::output::profile::FoldedValue;
use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::output::FaultFilter;

const EXAMPLES: &str = "\
Examples:
  sudo vmatrace -p 1234                   trace a running process until Ctrl-C: a line per
                                          active region (heap, arena, file) and second
  sudo vmatrace -v -p 1234                every event on its own line
  sudo vmatrace -q --min-size 64M -p 1234
                                          the summary only (-q); calls of 64 MiB or more
  sudo vmatrace -f -p 1234 --duration 30s
                                          follow its children, stop after 30 s
  sudo vmatrace -- ./server --port 8080   launch a command and trace it from its first instruction
  sudo vmatrace --json -o trace.ndjson -p 1234
                                          export every event as NDJSON
  sudo vmatrace record -o trace.ndjson -- python3 script.py
                                          record everything (all faults) for replay
  vmatrace replay trace.ndjson            rebuild the model from a recording and summarise it
  vmatrace report trace.ndjson            diagnose allocator fragmentation in a recording
  vmatrace report trace.ndjson --html out.html --perfetto out.json
                                          and draw the address space over time
  sudo vmatrace --report -p 1234          the same diagnosis at the end of a live run
  sudo vmatrace --heap --report -- ./server
                                          with the allocator's live bytes: exact, not estimated
  kill -USR1 $(pidof vmatrace)            print a snapshot of every traced address space

vmatrace needs root, or CAP_BPF, CAP_PERFMON and CAP_DAC_READ_SEARCH (attaching to another
user's process: CAP_SYS_PTRACE; zero pages told apart: CAP_SYS_ADMIN).";

/// vmatrace: trace a process's memory syscalls, page faults and VMAs with eBPF.
#[derive(Debug, Parser)]
#[command(
    name = "vmatrace",
    version,
    after_help = EXAMPLES,
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub trace: TraceArgs,
    /// Every event on its own line instead of the per-second roll-up, and more diagnostics on
    /// stderr (-vv: debug).
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
}

const RECORD_EXAMPLES: &str = "\
Examples:
  sudo vmatrace record -o trace.ndjson -- python3 script.py
                                          launch a command, record it until it ends
  sudo vmatrace record -f -o trace.ndjson -p 1234
                                          a running process and its children, until Ctrl-C
  sudo vmatrace record --duration 10s -o trace.ndjson -- ./server
                                          end ./server after 10 s (SIGTERM, SIGKILL 2 s later)
  sudo vmatrace record --faults first -o trace.ndjson -p 1234
                                          only the faults that change the model (smaller)
  sudo vmatrace record -o trace.vmat -p 1234
                                          the binary format: the same records, about 4x
                                          smaller and cheaper to write (vmatrace convert
                                          trace.vmat gives the NDJSON)
  sudo vmatrace record --stacks --fault-stacks 64 -o trace.ndjson -- ./app
                                          with the call stack of every memory syscall and
                                          of one first touch in 64
  sudo vmatrace record --max-size 100M --max-files 10 -o trace.ndjson.zst -p 1234
                                          always on: zstd-compressed (.zst), a new file at
                                          100 MB, the 10 newest kept (trace.1.ndjson.zst is
                                          the one before trace.ndjson.zst)
  sudo vmatrace record --snapshot-every 10s -o trace.ndjson -p 1234
                                          and a snapshot of every process every 10 s
  vmatrace replay trace.ndjson            then, without sudo: the file is the sudo user's

record prints on stderr how many records it wrote and how many events were lost.";

const REPLAY_EXAMPLES: &str = "\
Examples:
  vmatrace replay trace.ndjson            the snapshots and summary of a recording
  vmatrace replay --events trace.ndjson   every replayed event on its own line
  vmatrace replay --json trace.ndjson     the same as NDJSON records";

const REPORT_EXAMPLES: &str = "\
Examples:
  vmatrace report trace.ndjson            findings: heap, arenas, churn, untouched memory
  vmatrace report --json trace.ndjson     the findings as NDJSON `finding` records
  vmatrace report --stacks trace.ndjson   with the call sites' stacks (recorded with --stacks)
  vmatrace report trace.ndjson --pprof mem.pb.gz --folded mem.txt
                                          memory by call stack for `go tool pprof` and flame
                                          graph tools
  vmatrace report trace.ndjson --html out.html --perfetto out.json
                                          the address space over time: a page for a browser,
                                          a trace for ui.perfetto.dev";

const CONVERT_EXAMPLES: &str = "\
Examples:
  vmatrace convert trace.vmat                     the recording as NDJSON on stdout
  vmatrace convert trace.vmat -o trace.ndjson     to an NDJSON file
  vmatrace convert trace.ndjson -o trace.vmat.zst to the binary format, zstd-compressed
  vmatrace convert trace.vmat | jq -c 'select(.type == \"mmap\")'";

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Trace and write every event (all faults included) to a recording for `replay`: NDJSON,
    /// or the binary format for FILE.vmat.
    #[command(after_help = RECORD_EXAMPLES)]
    Record(TraceArgs),
    /// Rebuild the model from a recording (NDJSON or binary); print its snapshots and summary.
    #[command(after_help = REPLAY_EXAMPLES)]
    Replay(ReplayArgs),
    /// Diagnose allocator fragmentation from a recording (NDJSON or binary).
    #[command(after_help = REPORT_EXAMPLES)]
    Report(ReportArgs),
    /// Convert a recording between NDJSON and the binary format (plain or zstd).
    #[command(after_help = CONVERT_EXAMPLES)]
    Convert(ConvertArgs),
}

/// Convert options.
#[derive(Debug, Args)]
pub struct ConvertArgs {
    /// The recording (NDJSON or binary, plain or zstd-compressed).
    pub file: PathBuf,
    /// Write to OUT instead of stdout (created with mode 0600; zstd-compressed when its name
    /// ends in .zst).
    #[arg(short, long, value_name = "OUT")]
    pub output: Option<PathBuf>,
    /// The format to write [default: binary for OUT.vmat and OUT.vmat.zst, else ndjson].
    #[arg(long, value_enum, value_name = "FORMAT")]
    pub format: Option<crate::output::records::Format>,
    /// Overwrite OUT if it exists.
    #[arg(long)]
    pub force: bool,
}

/// Report options.
#[derive(Debug, Args)]
pub struct ReportArgs {
    /// The recording (`vmatrace record -o FILE ...`: NDJSON or binary, plain or zstd).
    pub file: PathBuf,
    /// Write the findings as NDJSON `finding` records.
    #[arg(long)]
    pub json: bool,
    /// Also write the address space over time as one self-contained HTML page (recorded
    /// with --stacks: with the top call sites and a flame graph of touched bytes).
    #[arg(long, value_name = "OUT")]
    pub html: Option<PathBuf>,
    /// Also write the timeline in the Chrome trace event format (opens in ui.perfetto.dev).
    #[arg(long, value_name = "OUT")]
    pub perfetto: Option<PathBuf>,
    /// Also write memory by call stack as a gzipped pprof profile (`go tool pprof OUT`):
    /// calls, reserved, touched, still mapped and released bytes (recorded with --stacks).
    #[arg(long, value_name = "OUT")]
    pub pprof: Option<PathBuf>,
    /// Also write folded stacks, one line per unique stack (flame graph tools read them).
    #[arg(long, value_name = "OUT")]
    pub folded: Option<PathBuf>,
    /// The value of each folded stack.
    #[arg(long, value_enum, default_value_t = FoldedValue::Reserved)]
    pub folded_value: FoldedValue,
    /// Show the whole stack under each call site.
    #[arg(long)]
    pub stacks: bool,
    /// Overwrite OUT files that exist.
    #[arg(long)]
    pub force: bool,
}

/// Which program reports page faults.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum BackendArg {
    /// The page_fault_user tracepoint where the kernel has it, else the perf event.
    Auto,
    /// exceptions:page_fault_user.
    Tracepoint,
    /// exceptions:page_fault_user as a BTF tracepoint only (for tests).
    #[value(hide = true)]
    BtfTracepoint,
    /// exceptions:page_fault_user attached raw only (for tests: the fallback on kernels that
    /// refuse the BTF tracepoint).
    #[value(hide = true)]
    RawTracepoint,
    /// A BPF program on the software page-fault perf event (no error code).
    PerfEvent,
}

/// Which programs report the memory syscalls.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum SyscallBackendArg {
    /// fentry/fexit where the kernel allows them, else the tracepoints.
    Auto,
    /// The syscalls:sys_enter_*/sys_exit_* tracepoints (while enabled, every syscall of every
    /// process on the machine takes the kernel's slower path).
    Tracepoint,
    /// fentry/fexit programs on the syscall functions (no cost to other syscalls).
    Fentry,
}

/// Where a memory syscall's change is ordered among the events of its process.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ChangeOrderArg {
    /// lock on Linux 6.14 and later, else entry (before 6.14 the mmap_lock tracepoints cost
    /// every process of the machine a cgroup path per lock while attached).
    Auto,
    /// Where the call held the process's mmap lock: racing threads' changes come out in
    /// the kernel's order (Linux 5.11 or later).
    Lock,
    /// munmap, shmdt and brk at their entry, the others at their exit (the default before
    /// Linux 6.14): a range freed and reused by a racing thread comes out right.
    Entry,
    /// Every call at its exit (the cheapest; racing threads may come out of order).
    Exit,
}

/// How the end of a process is told (a test and diagnosis knob).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ExitRuleArg {
    /// The tracepoint's group_dead where the kernel has it, else the live-thread count.
    Auto,
    /// sched_process_exit's group_dead (recent kernels only).
    GroupDead,
    /// The process's count of live threads, found through BTF.
    LiveThreads,
}

/// What to trace and how to show it.
#[derive(Debug, Args, Clone)]
pub struct TraceArgs {
    /// Trace this running process (repeatable).
    #[arg(short = 'p', long = "pid", value_name = "PID", value_parser = parse_pid)]
    pub pids: Vec<u32>,
    /// Trace every process of this cgroup v2 group (and the groups below it), and those that
    /// join it later; children are followed. A path under the cgroup2 mount, or relative to
    /// it (e.g. system.slice/nginx.service).
    #[arg(long, value_name = "PATH")]
    pub cgroup: Option<PathBuf>,
    /// Also trace processes the traced ones create (joined in the kernel before they run).
    #[arg(short, long)]
    pub follow: bool,
    /// Write NDJSON (one JSON object per line) instead of human lines.
    #[arg(long)]
    pub json: bool,
    /// Write to FILE instead of stdout (created with mode 0600).
    #[arg(short, long, value_name = "FILE")]
    pub output: Option<PathBuf>,
    /// How records are written (implies --json): NDJSON, or the same records in vmatrace's
    /// binary format (about 4x smaller, cheaper to write; `vmatrace convert` gives the
    /// NDJSON) [default: binary for FILE.vmat and FILE.vmat.zst, which are written as records
    /// without --json, else ndjson].
    #[arg(long, value_enum, value_name = "FORMAT")]
    pub format: Option<crate::output::records::Format>,
    /// Overwrite the output file if it exists.
    #[arg(long)]
    pub force: bool,
    /// Stop after this long (e.g. 500ms, 30s, 5m). A launched command is then ended (SIGTERM,
    /// SIGKILL 2 s later) and its end traced, vmatrace exiting with its status (143 after
    /// SIGTERM); attached processes (-p) are left running, no longer traced.
    #[arg(long, value_name = "TIME", value_parser = parse_duration)]
    pub duration: Option<Duration>,
    /// Which page faults to capture and show: none (not captured), first touches, or all
    /// [default: first; for record: all].
    #[arg(long, value_enum, value_name = "WHICH")]
    pub faults: Option<FaultFilter>,
    /// No event lines: the banner, the status line and the summary only.
    #[arg(short, long)]
    pub quiet: bool,
    /// Calls that map, unmap, move, protect or release at least SIZE are shown on their own
    /// line; smaller ones are rolled up per region and second (e.g. 64K, 1M, 0 for all).
    #[arg(long, value_name = "SIZE", value_parser = parse_bytes, default_value = "1M")]
    pub min_size: u64,
    /// Which kernel program reports page faults.
    #[arg(long, value_enum, default_value_t = BackendArg::Auto)]
    pub fault_backend: BackendArg,
    /// Which kernel programs report the memory syscalls.
    #[arg(long, value_enum, default_value_t = SyscallBackendArg::Auto)]
    pub syscall_backend: SyscallBackendArg,
    /// Where a memory syscall's change is ordered among its process's events.
    #[arg(long, value_enum, value_name = "WHERE", default_value_t = ChangeOrderArg::Auto)]
    pub change_order: ChangeOrderArg,
    /// How the end of a process is told (kept for testing the rule of older kernels).
    #[arg(long, value_enum, default_value_t = ExitRuleArg::Auto, hide = true)]
    pub exit_rule: ExitRuleArg,
    /// Ring buffer size (a power of two: 4K, 256K, 8M, ...; 64M with --stacks or --heap
    /// unless given). Faults arrive in records of up to 2.6 KB (64 faults): rings under 256K
    /// lose some under heavy load (counted).
    #[arg(long, value_name = "BYTES", value_parser = parse_size, default_value = "8M")]
    pub ring_size: u32,
    /// Run the command as this user (default under sudo: the invoking user).
    #[arg(short, long, value_name = "USER")]
    pub user: Option<String>,
    /// Compare the model with /proc/PID/maps every SECS seconds and report drift (differences
    /// seen at two checks in a row: the process runs while its map is read).
    #[arg(long, value_name = "SECS", value_parser = parse_seconds)]
    pub reconcile: Option<Duration>,
    /// At the end, diagnose allocator fragmentation (heap, arenas, churn, untouched memory).
    #[arg(long)]
    pub report: bool,
    /// Also trace the allocator itself (malloc, free, ... of glibc, jemalloc, tcmalloc, by
    /// uprobes): live bytes per heap region and call site, and a fragmentation diagnosis
    /// from them. Each call then takes a trap (about 2 µs); with -f, so does every other
    /// process using the same allocator while vmatrace runs (children are covered from their
    /// first call).
    #[arg(long)]
    pub heap: bool,
    /// Record the user call stack of every memory syscall (unwound and symbolized while
    /// tracing; Linux 5.15 or later).
    #[arg(long)]
    pub stacks: bool,
    /// Record the user call stack of one first-touch fault in N (per CPU; 1: every one).
    #[arg(long, value_name = "N", value_parser = parse_fault_stacks)]
    pub fault_stacks: Option<u32>,
    /// Bytes of the top of the user stack copied with each stack, for unwinding (at most
    /// 16K; deeper frames come from frame pointers where the code has them).
    #[arg(long, value_name = "BYTES", value_parser = parse_stack_bytes, default_value = "8K")]
    pub stack_bytes: u32,
    /// Copy and unwind every stack, even one the kernel could recognise as unwound before
    /// (for measuring and testing that path).
    #[arg(long, hide = true)]
    pub no_known_stacks: bool,
    /// With -o FILE (NDJSON): start a new file once this one reaches SIZE (e.g. 512K, 100M);
    /// older files are renamed FILE.1, FILE.2, ... (trace.1.ndjson), each a recording of its
    /// own (it starts with meta and a snapshot of every process). A FILE ending in .zst is
    /// zstd-compressed, rotated or not.
    #[arg(long, value_name = "SIZE", value_parser = parse_max_size)]
    pub max_size: Option<u64>,
    /// With --max-size: the files kept, the newest included; the oldest is removed.
    #[arg(long, value_name = "N", default_value_t = 5, requires = "max_size",
          value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub max_files: u32,
    /// Snapshot every traced process this often (e.g. 200ms, 10s), as SIGUSR1 does.
    #[arg(long, value_name = "TIME", value_parser = parse_duration)]
    pub snapshot_every: Option<Duration>,
    /// Serve Prometheus metrics over HTTP at ADDR:PORT/metrics (e.g. 127.0.0.1:9464): per
    /// traced process (reserved, touched, anonymous bytes, faults, syscalls, findings) and
    /// vmatrace's own (lost events, RSS). See docs/metrics.md.
    #[arg(long, value_name = "ADDR:PORT", value_parser = parse_listen)]
    pub metrics: Option<std::net::SocketAddr>,
    /// The command to launch and trace, after `--`.
    #[arg(last = true, value_name = "CMD")]
    pub command: Vec<OsString>,
}

/// Replay options.
#[derive(Debug, Args)]
pub struct ReplayArgs {
    /// The recording (NDJSON or binary, plain or zstd).
    pub file: PathBuf,
    /// Write NDJSON instead of human lines.
    #[arg(long)]
    pub json: bool,
    /// Show every replayed event, not just snapshots and the summary.
    #[arg(long)]
    pub events: bool,
}

/// Parses `--metrics`: an IP address and a port (`127.0.0.1:9464`, `[::1]:9464`,
/// `0.0.0.0:9464` for every interface).
pub fn parse_listen(s: &str) -> Result<std::net::SocketAddr, String> {
    s.trim().parse().map_err(|_| {
        format!("'{s}' is not ADDR:PORT (an IP address and a port: 127.0.0.1:9464, [::1]:9464)")
    })
}

/// The largest pid Linux can hand out (`PID_MAX_LIMIT` on 64-bit kernels).
const PID_MAX_LIMIT: i64 = 1 << 22;

fn parse_pid(s: &str) -> Result<u32, String> {
    match s.parse::<i64>() {
        Ok(n) if n > 0 && n <= PID_MAX_LIMIT => Ok(n as u32),
        Ok(_) => Err(format!(
            "'{s}' is not a valid pid (pids are integers from 1 to {PID_MAX_LIMIT})"
        )),
        Err(_) => Err(format!("'{s}' is not a pid (expected a positive integer)")),
    }
}

/// The longest `--duration` and `--reconcile` interval: a year is already more than any trace
/// needs, and every larger value would only risk overflow in time arithmetic.
pub const MAX_INTERVAL: Duration = Duration::from_secs(365 * 24 * 3600);

/// Parses `500ms`, `30s`, `5m`, `1h` or plain seconds: more than 0, at most a year.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("'{s}' is not a duration (try 500ms, 30s, 5m)"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "" | "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(format!("'{s}': unknown unit '{unit}' (use ms, s, m or h)")),
    };
    if !(secs.is_finite() && secs > 0.0) {
        return Err(format!("'{s}': the duration must be positive"));
    }
    match Duration::try_from_secs_f64(secs) {
        Ok(d) if d > Duration::ZERO && d <= MAX_INTERVAL => Ok(d),
        Ok(d) if d == Duration::ZERO => Err(format!("'{s}': the duration must be positive")),
        _ => Err(format!("'{s}' is too long (at most 365 days)")),
    }
}

/// Parses `--max-size`: a size as [`parse_bytes`] reads it, at least 4K.
pub fn parse_max_size(s: &str) -> Result<u64, String> {
    Some(parse_bytes(s)?)
        .filter(|&b| b >= 4096)
        .ok_or(format!("'{s}': --max-size must be at least 4K"))
}

/// Parses the `--reconcile` interval: whole seconds, from 1 to a year.
pub fn parse_seconds(s: &str) -> Result<Duration, String> {
    match s.trim().parse::<u64>() {
        Ok(n) if n > 0 && n <= MAX_INTERVAL.as_secs() => Ok(Duration::from_secs(n)),
        Ok(_) => Err(format!(
            "'{s}': the interval must be from 1 to {} seconds",
            MAX_INTERVAL.as_secs()
        )),
        Err(_) => Err(format!("'{s}' is not a number of seconds")),
    }
}

/// Parses `0`, `4096`, `64K`, `1M`, `2G`: a number of bytes, at most 1 TiB.
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (num, mult) = match t.chars().last() {
        Some('K' | 'k') => (&t[..t.len() - 1], 1u64 << 10),
        Some('M' | 'm') => (&t[..t.len() - 1], 1 << 20),
        Some('G' | 'g') => (&t[..t.len() - 1], 1 << 30),
        _ => (t, 1),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .filter(|b| *b <= 1 << 40)
        .ok_or(format!(
            "'{s}' is not a size of at most 1T (try 64K, 1M or 0)"
        ))
}

/// Parses `4096`, `256K`, `8M`, `1G`; the result must be a power of two of at least 4 KiB.
pub fn parse_size(s: &str) -> Result<u32, String> {
    let t = s.trim();
    let (num, mult) = match t.chars().last() {
        Some('K' | 'k') => (&t[..t.len() - 1], 1u64 << 10),
        Some('M' | 'm') => (&t[..t.len() - 1], 1 << 20),
        Some('G' | 'g') => (&t[..t.len() - 1], 1 << 30),
        _ => (t, 1),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("'{s}' is not a size (try 256K or 8M)"))?;
    let bytes = n
        .checked_mul(mult)
        .filter(|b| *b <= 1 << 30)
        .ok_or(format!("'{s}' is too large (at most 1G)"))?;
    if bytes < 4096 || !bytes.is_power_of_two() {
        return Err(format!(
            "'{s}': the ring size must be a power of two of at least 4K"
        ));
    }
    Ok(bytes as u32)
}

/// Parses `--fault-stacks N`: 1 to 1,000,000.
pub fn parse_fault_stacks(s: &str) -> Result<u32, String> {
    match s.trim().parse::<u32>() {
        Ok(n @ 1..=1_000_000) => Ok(n),
        _ => Err(format!(
            "'{s}' is not a whole number from 1 (every fault) to 1000000"
        )),
    }
}

/// Parses `--stack-bytes`: 512 bytes to 16 KiB, a multiple of 8 (`4096`, `8K`, `16K`).
pub fn parse_stack_bytes(s: &str) -> Result<u32, String> {
    let t = s.trim();
    let (num, mult) = match t.chars().last() {
        Some('K' | 'k') => (&t[..t.len() - 1], 1024u64),
        _ => (t, 1),
    };
    let bytes = num
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .filter(|b| (512..=tracer_common::STACK_COPY_MAX as u64).contains(b) && b % 8 == 0)
        .ok_or(format!(
            "'{s}': the stack copy must be 512 bytes to 16K, a multiple of 8"
        ))?;
    Ok(bytes as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stack_options() {
        assert_eq!(parse_stack_bytes("8K"), Ok(8192));
        assert_eq!(parse_stack_bytes("4096"), Ok(4096));
        for bad in ["32K", "100", "0", "x", "513", "18446744073709551615K"] {
            assert!(parse_stack_bytes(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_fault_stacks("64"), Ok(64));
        for bad in ["0", "-1", "x", "1000001"] {
            assert!(parse_fault_stacks(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn parses_values() {
        assert_eq!(parse_pid("42"), Ok(42));
        assert!(parse_pid("0").is_err());
        assert!(parse_pid("-3").is_err());
        assert!(parse_pid("abc").is_err());
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("5x").is_err());
        assert!(parse_duration("18446744073709551615s").is_err());
        assert!(parse_duration("1e400").is_err());
        assert!(parse_duration("0.0000000001ms").is_err());
        assert!(parse_duration("366d").is_err());
        assert_eq!(parse_duration("8760h"), Ok(MAX_INTERVAL));
        assert!(parse_duration("8761h").is_err());
        assert_eq!(parse_seconds("5"), Ok(Duration::from_secs(5)));
        for bad in ["0", "-1", "18446744073709551616", "31536001", "x"] {
            assert!(parse_seconds(bad).is_err(), "{bad}");
        }
        assert!(parse_pid("4194304").is_ok());
        assert!(parse_pid("4194305").is_err());
        assert!(parse_pid("99999999999999999999999").is_err());
        assert!(parse_size("16G").is_err());
        assert!(parse_size("18446744073709551615K").is_err());
        assert_eq!(parse_size("8M"), Ok(8 << 20));
        assert_eq!(parse_bytes("0"), Ok(0));
        assert_eq!(parse_bytes("64K"), Ok(64 << 10));
        for bad in ["-1", "1X", "2T", "18446744073709551615K", ""] {
            assert!(parse_bytes(bad).is_err(), "{bad}");
        }
        assert!(parse_size("5000").is_err());
    }

    #[test]
    fn command_line_shapes() {
        let c = Cli::try_parse_from(["vmatrace", "-p", "1", "-p", "2", "--json"]).expect("parses");
        assert_eq!(c.trace.pids, [1, 2]);
        let c = Cli::try_parse_from(["vmatrace", "--", "ls", "-l"]).expect("parses");
        assert_eq!(c.trace.command, ["ls", "-l"]);
        let c = Cli::try_parse_from(["vmatrace", "record", "-o", "x", "--", "ls"]).expect("parses");
        assert!(matches!(c.command, Some(Command::Record(_))));
        assert!(Cli::try_parse_from(["vmatrace", "-p", "x"]).is_err());
    }

    /// The command lines of an examples text: each `vmatrace ...` line, up to the
    /// two-space gap before its explanation, with the lines that continue it.
    fn example_commands(text: &str) -> Vec<Vec<String>> {
        let mut out = Vec::new();
        for line in text.lines() {
            // Examples are indented; the sentences after them are not.
            let Some(line) = line.strip_prefix("  ") else {
                continue;
            };
            let line = line.trim_start();
            let line = line.strip_prefix("sudo ").unwrap_or(line);
            if !line.starts_with("vmatrace ") {
                continue;
            }
            let command = line.split("  ").next().unwrap_or(line);
            out.push(command.split_whitespace().map(str::to_string).collect());
        }
        out
    }

    #[test]
    fn every_example_in_the_help_parses() {
        let texts = [EXAMPLES, RECORD_EXAMPLES, REPLAY_EXAMPLES, REPORT_EXAMPLES];
        let mut n = 0;
        for text in texts {
            for args in example_commands(text) {
                Cli::try_parse_from(&args).unwrap_or_else(|e| panic!("{args:?}: {e}"));
                n += 1;
            }
        }
        assert!(n >= 20, "{n} examples");
        // And each subcommand's help shows its own.
        let mut cmd = <Cli as clap::CommandFactory>::command();
        for (sub, first) in [
            ("record", "vmatrace record -o trace.ndjson"),
            ("replay", "vmatrace replay --events"),
            ("report", "vmatrace report --json"),
        ] {
            let help = cmd
                .find_subcommand_mut(sub)
                .expect("subcommand")
                .render_long_help()
                .to_string();
            assert!(
                help.contains("Examples:") && help.contains(first),
                "{sub}: {help}"
            );
        }
    }
}
