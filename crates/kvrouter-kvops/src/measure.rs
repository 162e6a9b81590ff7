//! Process resource readings from `/proc` (Linux); zero elsewhere.
//!
//! Peak RSS over a replay is measured by resetting the kernel's high-water
//! mark (`/proc/self/clear_refs` ← `5`) just before it and reading `VmHWM`
//! after, so memory spent loading the workload does not count as the index's.

use std::fs;

fn status_kb(field: &str) -> Option<u64> {
    let status = fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Resident set size now, in MiB.
pub fn rss_mb() -> f64 {
    status_kb("VmRSS:").unwrap_or(0) as f64 / 1024.0
}

/// Peak resident set size since start or the last [`reset_peak_rss`], in MiB.
pub fn peak_rss_mb() -> f64 {
    status_kb("VmHWM:").unwrap_or(0) as f64 / 1024.0
}

/// Resets the peak-RSS mark to the current RSS; false if the kernel refused.
pub fn reset_peak_rss() -> bool {
    fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// User + system CPU time of the whole process, in seconds.
///
/// `/proc/self/stat` counts in clock ticks; Linux exposes them at 100 Hz to
/// user space on every mainstream architecture.
pub fn cpu_seconds() -> f64 {
    let Ok(stat) = fs::read_to_string("/proc/self/stat") else {
        return 0.0;
    };
    // The command name may contain spaces; fields resume after its ')'.
    let Some(rest) = stat.rfind(')').map(|i| &stat[i + 2..]) else {
        return 0.0;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the full line: 11 and 12 here.
    let ticks = |i: usize| f.get(i).and_then(|s| s.parse::<u64>().ok()).unwrap_or(0);
    (ticks(11) + ticks(12)) as f64 / 100.0
}

#[cfg(test)]
mod tests {
    #[test]
    fn readings_are_sane_on_linux() {
        if cfg!(target_os = "linux") {
            assert!(super::rss_mb() > 0.0);
            assert!(super::peak_rss_mb() >= super::rss_mb() * 0.5);
            let mut x = 0u64;
            for i in 0..50_000_000u64 {
                x = x.wrapping_mul(31).wrapping_add(i);
            }
            std::hint::black_box(x);
            assert!(super::cpu_seconds() > 0.0);
        }
    }
}
