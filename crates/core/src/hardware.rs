//! What a device can do at best, for model-FLOPs utilisation (MFU): the CPU's peak from its
//! features, an accelerator's from a table of known parts.

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

/// Dense BF16 peak TFLOP/s of accelerators nuwa is used on (vendor data sheets, without
/// sparsity), for MFU on a GPU: the CPU's peak says nothing about one.
pub const ACCELERATOR_PEAK_TFLOPS: &[(&str, f64)] = &[
    ("H100", 989.0),
    ("H200", 989.0),
    ("H800", 989.0),
    ("H20", 148.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("910B", 376.0),
    ("910C", 752.0),
    ("P800", 345.0),
    ("MI300X", 1307.0),
    ("MI250X", 383.0),
];

/// The peak FLOP/s MFU divides by on `device` (`cpu`, `cuda:0`, …): the CPU's own estimate
/// for `cpu`; for an accelerator, `accelerator` (a name from [`ACCELERATOR_PEAK_TFLOPS`] or a
/// number of TFLOP/s). `None` when nothing is known: MFU is then not reported rather than
/// divided by the wrong peak.
pub fn peak_flops(device: &str, accelerator: Option<&str>) -> anyhow::Result<Option<f64>> {
    if let Some(name) = accelerator {
        if let Ok(tflops) = name.parse::<f64>() {
            anyhow::ensure!(
                tflops > 0.0 && tflops.is_finite(),
                "--accelerator {name}: must be positive"
            );
            return Ok(Some(tflops * 1e12));
        }
        let known = ACCELERATOR_PEAK_TFLOPS
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, t)| t * 1e12);
        return match known {
            Some(flops) => Ok(Some(flops)),
            None => {
                let names: Vec<&str> = ACCELERATOR_PEAK_TFLOPS.iter().map(|(n, _)| *n).collect();
                anyhow::bail!(
                    "--accelerator {name}: unknown; give its peak TFLOP/s as a number or one of {}",
                    names.join(", ")
                )
            }
        };
    }
    let kind = device.split(':').next().unwrap_or(device);
    Ok((kind == "cpu").then(cpu_peak_flops))
}

/// Memory the OS says a new allocation can use (`MemAvailable`), when it says.
pub fn available_memory() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// This process's peak resident memory so far (Linux `VmHWM`), in bytes.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// This process's peak resident memory before it built its model, once
/// [`mark_rss_before_model`] has recorded it.
static RSS_BEFORE_MODEL: std::sync::OnceLock<u64> = std::sync::OnceLock::new();

/// Records this process's peak resident memory so far as what it held before its model:
/// the program, its runtime (MPI), the data, a checkpoint being resumed. What the model,
/// its gradients, optimiser state and activations then add is what a memory plan predicts.
pub fn mark_rss_before_model() {
    if let Some(bytes) = peak_rss_bytes() {
        let _ = RSS_BEFORE_MODEL.set(bytes);
    }
}

/// See [`mark_rss_before_model`]; `None` before it is called or where `VmHWM` is unknown.
pub fn rss_before_model() -> Option<u64> {
    RSS_BEFORE_MODEL.get().copied()
}

#[cfg(test)]
mod tests {
    use super::peak_flops;

    #[test]
    fn gpus_never_use_the_cpu_peak() {
        assert_eq!(peak_flops("cuda:0", None).unwrap(), None);
        assert_eq!(peak_flops("cuda:0", Some("h100")).unwrap(), Some(989e12));
        assert_eq!(peak_flops("wgpu", Some("100")).unwrap(), Some(100e12));
        assert!(peak_flops("cpu", None).unwrap().is_some_and(|p| p > 0.0));
        let err = peak_flops("cuda", Some("Z9")).unwrap_err().to_string();
        assert!(err.contains("Z9") && err.contains("H100"), "{err}");
    }
}
