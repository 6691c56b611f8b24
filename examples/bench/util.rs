//! Measuring tools shared by the benchmark sections: figures and their report, statistics,
//! CPU time from `/proc`, and a counting global allocator.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::io;
use std::sync::atomic::{AtomicIsize, AtomicUsize, Ordering};
use std::time::Duration;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type Result<T, E = BoxError> = std::result::Result<T, E>;

// ---------------------------------------------------------------------------------------------
// Figures

/// What a figure must satisfy; `met` is computed from the measurement with it.
#[derive(Debug, Clone, Copy)]
pub enum Goal {
    /// No target: the figure is information, neither met nor missed.
    Info,
    /// ours / baseline ≤ x
    RatioAtMost(f64),
    /// ours ≤ x (in the figure's unit)
    AtMost(f64),
    /// ours == x
    Equals(f64),
}

impl Goal {
    /// The target in words; `None` for [`Goal::Info`].
    fn describe(self, unit: &str) -> Option<String> {
        match self {
            Goal::Info => None,
            Goal::RatioAtMost(x) => Some(format!("ratio <= {x}")),
            Goal::AtMost(x) => Some(format!("ours <= {x} {unit}")),
            Goal::Equals(x) => Some(format!("ours == {x}")),
        }
    }
}

/// One line of the report.
#[derive(Debug, Clone)]
pub struct Figure {
    pub metric: String,
    pub ours: Option<f64>,
    pub baseline: Option<f64>,
    pub unit: &'static str,
    pub ratio: Option<f64>,
    /// The target in words; `None` for an information figure.
    pub target: Option<String>,
    /// Whether the target was met; `None` for an information figure (whether or not it was
    /// measured).
    pub met: Option<bool>,
    /// Why the figure was not measured (skipped or failed), if so.
    pub missing: Option<String>,
}

impl Figure {
    /// A measured figure; the ratio is ours / baseline when there is a baseline.
    pub fn new(
        metric: impl Into<String>,
        ours: f64,
        baseline: Option<f64>,
        unit: &'static str,
        goal: Goal,
    ) -> Self {
        let ratio = baseline.filter(|b| *b != 0.0).map(|b| ours / b);
        let met = match goal {
            Goal::Info => None,
            Goal::RatioAtMost(x) => Some(ratio.is_some_and(|r| r <= x)),
            Goal::AtMost(x) => Some(ours <= x),
            Goal::Equals(x) => Some(ours == x),
        };
        Self {
            metric: metric.into(),
            ours: Some(ours),
            baseline,
            unit,
            ratio,
            target: goal.describe(unit),
            met,
            missing: None,
        }
    }

    /// A figure that could not be measured; it counts as not met (an information figure stays
    /// without a verdict).
    pub fn missing(
        metric: impl Into<String>,
        unit: &'static str,
        goal: Goal,
        why: impl Into<String>,
    ) -> Self {
        Self {
            metric: metric.into(),
            ours: None,
            baseline: None,
            unit,
            ratio: None,
            target: goal.describe(unit),
            met: (!matches!(goal, Goal::Info)).then_some(false),
            missing: Some(why.into()),
        }
    }

    pub fn json(&self) -> String {
        let mut v = serde_json::json!({
            "metric": self.metric,
            "ours": self.ours.map(round4),
            "baseline": self.baseline.map(round4),
            "unit": self.unit,
            "ratio": self.ratio.map(round4),
            "target": self.target,
            "met": self.met,
        });
        if let Some(why) = &self.missing {
            v["skipped"] = serde_json::Value::String(why.clone());
        }
        v.to_string()
    }
}

fn round4(x: f64) -> f64 {
    if x.is_finite() {
        let digits = 4 - (x.abs().max(1e-12).log10().floor() as i32) - 1;
        let scale = 10f64.powi(digits.clamp(0, 12));
        (x * scale).round() / scale
    } else {
        x
    }
}

fn show(x: Option<f64>) -> String {
    match x {
        None => "-".into(),
        Some(x) if x == x.trunc() && x.abs() < 1e15 => format!("{x:.0}"),
        Some(x) if x.abs() >= 100.0 => format!("{x:.1}"),
        Some(x) if x.abs() >= 1.0 => format!("{x:.3}"),
        Some(x) => format!("{x:.4}"),
    }
}

/// The readable table.
pub fn table(figures: &[Figure]) -> String {
    let header = [
        "metric", "ours", "baseline", "unit", "ratio", "target", "met",
    ];
    let rows: Vec<[String; 7]> = figures
        .iter()
        .map(|f| {
            [
                f.metric.clone(),
                f.missing
                    .as_ref()
                    .map_or_else(|| show(f.ours), |_| "skipped".into()),
                show(f.baseline),
                f.unit.to_owned(),
                show(f.ratio),
                f.target.clone().unwrap_or_else(|| "-".into()),
                match f.met {
                    None => "info",
                    Some(true) => "yes",
                    Some(false) => "NO",
                }
                .to_owned(),
            ]
        })
        .collect();
    let mut widths = header.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let line = |cells: &[String]| {
        let mut s = String::new();
        for (i, (cell, w)) in cells.iter().zip(widths).enumerate() {
            if i > 0 {
                s.push_str(" | ");
            }
            // Numbers right-aligned, text left-aligned.
            if (1..=2).contains(&i) || i == 4 {
                s.push_str(&format!("{cell:>w$}"));
            } else {
                s.push_str(&format!("{cell:<w$}"));
            }
        }
        s.trim_end().to_owned() + "\n"
    };
    let mut out = line(&header.map(String::from));
    out.push_str(
        &widths
            .iter()
            .map(|w| "-".repeat(*w))
            .collect::<Vec<_>>()
            .join("-|-"),
    );
    out.push('\n');
    for row in &rows {
        out.push_str(&line(row));
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Statistics

pub fn median(xs: &[f64]) -> f64 {
    percentile(xs, 50.0)
}

/// The p-th percentile (nearest rank) of `xs`; NaN for an empty slice.
pub fn percentile(xs: &[f64], p: f64) -> f64 {
    if xs.is_empty() {
        return f64::NAN;
    }
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

pub fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

// ---------------------------------------------------------------------------------------------
// CPU time of a process (Linux /proc)

/// The user+system CPU time of a process at one moment.
#[derive(Debug, Clone)]
pub struct CpuSample {
    /// utime+stime from /proc/PID/stat: every thread, dead or alive; 10 ms resolution.
    stat: Duration,
    /// The system part of `stat`.
    stat_sys: Duration,
    /// The sum of the live threads' /proc/PID/task/TID/schedstat run times: nanoseconds.
    sched: Duration,
    tids: Vec<u32>,
}

/// Linux's USER_HZ, the unit of /proc/PID/stat times; 100 on every mainstream architecture.
const CLOCK_TICKS_PER_SEC: u64 = 100;

pub fn cpu_sample(pid: u32) -> io::Result<CpuSample> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name may contain spaces and parentheses: fields restart after the last ')'.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or_else(|| io::Error::other("unexpected /proc/PID/stat format"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // fields[0] is field 3 (state); utime is field 14, stime field 15.
    let tick = |i: usize| -> io::Result<u64> {
        fields
            .get(i)
            .and_then(|f| f.parse().ok())
            .ok_or_else(|| io::Error::other("unexpected /proc/PID/stat format"))
    };
    let tick_ns = 1_000_000_000 / CLOCK_TICKS_PER_SEC;
    let stat = Duration::from_nanos((tick(11)? + tick(12)?) * tick_ns);
    let stat_sys = Duration::from_nanos(tick(12)? * tick_ns);
    let mut sched = Duration::ZERO;
    let mut tids = Vec::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let entry = entry?;
        let Some(tid) = entry.file_name().to_str().and_then(|s| s.parse().ok()) else {
            continue;
        };
        // A thread may exit between the listing and the read.
        if let Ok(s) = std::fs::read_to_string(entry.path().join("schedstat")) {
            if let Some(ns) = s.split_whitespace().next().and_then(|f| f.parse().ok()) {
                sched += Duration::from_nanos(ns);
                tids.push(tid);
            }
        }
    }
    Ok(CpuSample {
        stat,
        stat_sys,
        sched,
        tids,
    })
}

/// CPU time used between two samples: the nanosecond schedstat sum when the same threads were
/// alive throughout (checked against the 10 ms /proc/PID/stat figure, which also counts threads
/// that came and went), else the /proc/PID/stat difference.
pub fn cpu_between(a: &CpuSample, b: &CpuSample) -> Duration {
    let by_stat = b.stat.saturating_sub(a.stat);
    let same_threads = a.tids.iter().all(|t| b.tids.contains(t));
    let by_sched = b.sched.saturating_sub(a.sched);
    if same_threads && by_stat <= by_sched + Duration::from_millis(25) {
        by_sched
    } else {
        by_stat
    }
}

/// The total and the system (kernel) CPU time between two samples by /proc/PID/stat (10 ms
/// resolution).
pub fn stat_times(a: &CpuSample, b: &CpuSample) -> (Duration, Duration) {
    (
        b.stat.saturating_sub(a.stat),
        b.stat_sys.saturating_sub(a.stat_sys),
    )
}

/// The share of system (kernel) time in the CPU time between two samples (10 ms resolution).
pub fn sys_share(a: &CpuSample, b: &CpuSample) -> f64 {
    let (total, sys) = stat_times(a, b);
    if total.is_zero() {
        f64::NAN
    } else {
        sys.as_secs_f64() / total.as_secs_f64()
    }
}

pub fn self_cpu() -> io::Result<CpuSample> {
    cpu_sample(std::process::id())
}

/// How many file descriptors (sockets included) this process has open.
pub fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count())
}

/// This process's resident set size, from /proc/self/status.
pub fn rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

// ---------------------------------------------------------------------------------------------
// Memory: a global allocator that counts live heap bytes

/// One thread's counts, on a cache line of its own. A count shared by every thread would be
/// written from both cores on every allocation, and that cache-line traffic (plus a locked
/// instruction per update) would cost each variant in proportion to how often it allocates
/// (the layer allocates about twice as often as the bare app it is compared with): the bench
/// would measure its counter. A shard is written by its own thread only, so plain loads and
/// stores suffice; shard 0 is shared by the threads beyond the first `SHARDS - 1` (and by a
/// thread being torn down) and is updated atomically.
#[repr(align(128))]
struct Shard {
    live_bytes: AtomicIsize,
    allocations: AtomicUsize,
}

const SHARDS: usize = 256;

static COUNTS: [Shard; SHARDS] = [const {
    Shard {
        live_bytes: AtomicIsize::new(0),
        allocations: AtomicUsize::new(0),
    }
}; SHARDS];

static NEXT_SHARD: AtomicUsize = AtomicUsize::new(1);

thread_local! {
    // `const`, no destructor: usable from inside the allocator (it neither allocates nor
    // registers anything).
    static SHARD: Cell<usize> = const { Cell::new(usize::MAX) };
}

/// This thread's shard index (0: the shared one).
fn shard() -> usize {
    SHARD
        .try_with(|s| {
            if s.get() == usize::MAX {
                let next = NEXT_SHARD.fetch_add(1, Ordering::Relaxed);
                s.set(if next < SHARDS { next } else { 0 });
            }
            s.get()
        })
        .unwrap_or(0)
}

fn count(bytes: isize, allocations: usize) {
    let i = shard();
    let shard = &COUNTS[i];
    if i == 0 {
        shard.live_bytes.fetch_add(bytes, Ordering::Relaxed);
        shard.allocations.fetch_add(allocations, Ordering::Relaxed);
    } else {
        // This thread is the shard's only writer.
        let live = shard.live_bytes.load(Ordering::Relaxed);
        shard.live_bytes.store(live + bytes, Ordering::Relaxed);
        let n = shard.allocations.load(Ordering::Relaxed);
        shard.allocations.store(n + allocations, Ordering::Relaxed);
    }
}

/// The system allocator, counting allocations and the bytes currently allocated, per thread
/// (installed as the bench's `#[global_allocator]`). Memory freed on another thread than the
/// one that allocated it is subtracted there: only the sum over all threads means anything.
pub struct CountingAlloc;

// SAFETY: every method forwards to `System` with the caller's arguments unchanged; the counter
// is only bookkeeping.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded as is.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            count(layout.size() as isize, 1);
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded as is.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            count(layout.size() as isize, 1);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded as is.
        unsafe { System.dealloc(ptr, layout) };
        count(-(layout.size() as isize), 0);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: forwarded as is.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            count(new_size as isize - layout.size() as isize, 1);
        }
        p
    }
}

/// Heap bytes currently allocated by this process (through Rust's allocator).
pub fn live_bytes() -> isize {
    COUNTS
        .iter()
        .map(|s| s.live_bytes.load(Ordering::Relaxed))
        .sum()
}

/// How many allocations (and reallocations) this process has made so far.
pub fn allocations() -> usize {
    COUNTS
        .iter()
        .map(|s| s.allocations.load(Ordering::Relaxed))
        .sum()
}
