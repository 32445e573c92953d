//! Dividing a batch among unequal workers.

/// Splits `total` sequences in proportion to `speeds`, respecting per-rank caps, with the
/// largest-remainder rule so the parts sum to `total` exactly. Deterministic, so every rank
/// computes the same split from the same gathered speeds.
pub fn proportional_shares(total: usize, speeds: &[f64], caps: &[Option<usize>]) -> Vec<usize> {
    let n = speeds.len();
    let cap = |r: usize| caps.get(r).copied().flatten().unwrap_or(usize::MAX);
    let mut shares = vec![0usize; n];
    let mut open: Vec<usize> = (0..n).collect();
    let mut left = total;
    // Water-filling: ranks that hit their cap keep it; the rest share what remains.
    while left > 0 && !open.is_empty() {
        let sum: f64 = open.iter().map(|&r| speeds[r].max(1e-12)).sum();
        let ideal: Vec<f64> = open
            .iter()
            .map(|&r| left as f64 * speeds[r].max(1e-12) / sum)
            .collect();
        let capped: Vec<usize> = open
            .iter()
            .zip(&ideal)
            .filter(|(&r, &x)| x >= (cap(r) - shares[r]) as f64)
            .map(|(&r, _)| r)
            .collect();
        if !capped.is_empty() {
            for r in capped {
                left -= cap(r) - shares[r];
                shares[r] = cap(r);
                open.retain(|&o| o != r);
            }
            continue;
        }
        let mut floors: Vec<(usize, f64)> = open
            .iter()
            .zip(&ideal)
            .map(|(&r, &x)| (r, x - x.floor()))
            .collect();
        let mut given = 0;
        for (&r, &x) in open.iter().zip(&ideal) {
            shares[r] += x.floor() as usize;
            given += x.floor() as usize;
        }
        floors.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        for (r, _) in floors.into_iter().take(left - given) {
            shares[r] += 1;
        }
        left = 0;
    }
    shares
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_follow_speed_and_sum_to_the_batch() {
        assert_eq!(proportional_shares(12, &[1.0, 0.5], &[]), [8, 4]);
        assert_eq!(proportional_shares(10, &[1.0, 1.0, 1.0], &[]), [4, 3, 3]);
        let s = proportional_shares(16, &[3.0, 1.0, 1.0], &[Some(6), None, None]);
        assert_eq!(s, [6, 5, 5]);
        assert_eq!(s.iter().sum::<usize>(), 16);
    }
}
