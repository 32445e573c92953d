//! Numbers with unit suffixes on the command line: `1T` tokens, `12h`, `5GB`.

use anyhow::{anyhow, bail, Result};

/// A positive number with an optional unit suffix (matched case-insensitively, longest
/// first), scaled by the unit's factor: `1T` tokens, `12h`, `5GB`. `example` shows the format
/// in the error.
pub fn parse_with_unit(s: &str, units: &[(&str, f64)], example: &str) -> Result<f64> {
    let t = s.trim();
    let upper = t.to_ascii_uppercase();
    let mut by_length: Vec<&(&str, f64)> = units.iter().collect();
    by_length.sort_by_key(|(u, _)| std::cmp::Reverse(u.len()));
    let (num, scale) = by_length
        .iter()
        .find(|(u, _)| upper.ends_with(&u.to_ascii_uppercase()))
        .map_or((t, 1.0), |(u, f)| (&t[..t.len() - u.len()], *f));
    let v: f64 = num
        .trim()
        .parse()
        .map_err(|_| anyhow!("`{s}` is not a number with a unit (e.g. {example})"))?;
    if !(v > 0.0 && (v * scale).is_finite()) {
        bail!("`{s}` must be a positive, finite number");
    }
    Ok(v * scale)
}

#[cfg(test)]
mod tests {
    use super::parse_with_unit;

    #[test]
    fn suffixes_scale_and_bad_ones_are_refused() {
        let bytes = [("B", 1.0), ("KB", 1e3), ("GB", 1e9)];
        assert_eq!(parse_with_unit("5GB", &bytes, "").unwrap(), 5e9);
        assert_eq!(parse_with_unit("20kb", &bytes, "").unwrap(), 2e4);
        assert_eq!(parse_with_unit("7", &bytes, "").unwrap(), 7.0);
        assert!(parse_with_unit("5XB", &bytes, "").is_err());
        assert!(parse_with_unit("-1GB", &bytes, "").is_err());
        let huge = parse_with_unit("1e400", &bytes, "")
            .unwrap_err()
            .to_string();
        assert!(huge.contains("positive, finite"), "{huge}");
    }
}
