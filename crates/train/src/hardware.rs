//! What the local device can do at best, for model-FLOPs utilisation (MFU).

/// Peak dense FP32 FLOP/s of this CPU, estimated from /proc/cpuinfo: cores × clock ×
/// FLOPs per cycle per core (two FMA units of 16 lanes with AVX-512, 8 with AVX2).
pub fn cpu_peak_flops() -> f64 {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let mhz = info
        .lines()
        .find(|l| l.starts_with("cpu MHz"))
        .and_then(|l| l.split(':').nth(1))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .unwrap_or(2000.0);
    let flags = info.lines().find(|l| l.starts_with("flags")).unwrap_or("");
    let has = |f: &str| flags.split_whitespace().any(|x| x == f);
    let flops_per_cycle = if has("avx512f") {
        64.0
    } else if has("avx2") && has("fma") {
        32.0
    } else {
        8.0
    };
    cores * mhz * 1e6 * flops_per_cycle
}
