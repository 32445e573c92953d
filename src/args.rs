//! Parsers for flag values shared by several subcommands.

/// A clap parser for a size in bytes: a plain number or one with KB, MB or GB (powers of 1000,
/// as `save_pretrained`'s `max_shard_size` reads them) or KiB, MiB, GiB (powers of 1024).
pub fn byte_size(v: &str) -> Result<u64, String> {
    let units = [
        ("B", 1.0),
        ("KB", 1e3),
        ("MB", 1e6),
        ("GB", 1e9),
        ("KiB", 1024.0),
        ("MiB", 1048576.0),
        ("GiB", 1073741824.0),
    ];
    nuwa_core::parse_with_unit(v, &units, "5GB, 500MB, 2000000")
        .map(|bytes| bytes.ceil() as u64)
        .map_err(|e| e.to_string())
}

/// A clap parser for a duration in seconds: finite and above zero.
pub fn positive_seconds(v: &str) -> Result<f64, String> {
    match v.parse::<f64>() {
        Ok(s) if s > 0.0 && s.is_finite() && s < 1e9 => Ok(s),
        _ => Err(format!("`{v}` is not a positive number of seconds")),
    }
}
