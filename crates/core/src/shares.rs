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

/// Splits each rank's rows of a step (`totals`, summing to `batch × micro_batches`) over the
/// step's micro-batches: `[micro-batch][rank]` counts with every micro-batch holding exactly
/// `batch` rows, each rank's counts summing to its total and spread as evenly as they can be
/// (its running sum tracks `total × (m + 1) / micro_batches`), and every rank getting at least
/// `min_each` rows of each (expert parallelism needs every rank in every exchange; its totals
/// must allow it). A split of the whole step, not of each micro-batch, is as fine as a row of
/// the step: 21 : 11 of 4 micro-batches of 8 where each alone could only be 5 : 3 or 6 : 2.
pub fn micro_batch_shares(
    totals: &[usize],
    batch: usize,
    micro_batches: usize,
    min_each: usize,
) -> Vec<Vec<usize>> {
    let m_count = micro_batches.max(1);
    let floor = min_each * m_count;
    let extra: Vec<usize> = totals.iter().map(|&t| t.saturating_sub(floor)).collect();
    let free = batch.saturating_sub(min_each * totals.len());
    let mut given = vec![0usize; totals.len()];
    let mut out = Vec::with_capacity(m_count);
    for m in 0..m_count {
        // What each rank still owes by the end of this micro-batch.
        let owed: Vec<f64> = extra
            .iter()
            .zip(&given)
            .map(|(&e, &g)| (e as f64 * (m + 1) as f64 / m_count as f64 - g as f64).max(0.0))
            .collect();
        let counts = if owed.iter().all(|&o| o == 0.0) {
            proportional_shares(free, &vec![1.0; totals.len()], &[])
        } else {
            proportional_shares(free, &owed, &[])
        };
        for (g, c) in given.iter_mut().zip(&counts) {
            *g += c;
        }
        out.push(counts.iter().map(|c| c + min_each).collect());
    }
    out
}

/// Lays each rank's rows of a step (`totals`, summing to `batch × micro_batches`) end to end
/// over the step's rows in micro-batch order, rank 0 first: `[micro-batch][rank]` counts in
/// which a rank holds whole micro-batches but for at most one at each end of its range,
/// shared with its neighbour. Fewer, fuller micro-batches per rank than
/// [`micro_batch_shares`] (a rank with a quarter of the rows runs one micro-batch, not a
/// quarter of each), where each costs a fixed overhead (the gradient accumulation, a pass
/// over every parameter); only ranks sharing a micro-batch need to meet over it.
pub fn packed_micro_batch_shares(
    totals: &[usize],
    batch: usize,
    micro_batches: usize,
) -> Vec<Vec<usize>> {
    let mut ends = Vec::with_capacity(totals.len());
    let mut end = 0;
    for &t in totals {
        ends.push((end, end + t));
        end += t;
    }
    (0..micro_batches.max(1))
        .map(|m| {
            let (lo, hi) = (m * batch, (m + 1) * batch);
            ends.iter()
                .map(|&(a, b)| b.min(hi).saturating_sub(a.max(lo)))
                .collect()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packed_ranks_hold_whole_micro_batches_but_at_their_ends() {
        // 43 : 21 of 4 micro-batches of 16: rank 0 holds 0 and 1, rank 1 holds 3; 2 is shared.
        let split = packed_micro_batch_shares(&[43, 21], 16, 4);
        assert_eq!(split, [[16, 0], [16, 0], [11, 5], [0, 16]]);
        // A rank inside one micro-batch shares it with both neighbours.
        let split = packed_micro_batch_shares(&[10, 3, 19], 8, 4);
        assert_eq!(split, [[8, 0, 0], [2, 3, 3], [0, 0, 8], [0, 0, 8]]);
        for m in &split {
            assert_eq!(m.iter().sum::<usize>(), 8);
        }
    }

    #[test]
    fn a_step_is_split_finer_than_its_micro_batches() {
        // 21 : 11 of 4 micro-batches of 8 rows.
        let split = micro_batch_shares(&[21, 11], 8, 4, 0);
        assert!(
            split.iter().all(|m| m.iter().sum::<usize>() == 8),
            "{split:?}"
        );
        let per_rank: Vec<usize> = (0..2).map(|r| split.iter().map(|m| m[r]).sum()).collect();
        assert_eq!(per_rank, [21, 11]);
        assert!(split.iter().all(|m| (5..=6).contains(&m[0])), "{split:?}");
        // At least one row of each micro-batch each, when asked.
        let split = micro_batch_shares(&[29, 3], 8, 3, 1);
        assert!(
            split.iter().all(|m| m[1] == 1 && m[0] + m[1] == 8),
            "{split:?}"
        );
        let split = micro_batch_shares(&[4, 4, 4], 3, 4, 1);
        assert!(split.iter().all(|m| m == &[1, 1, 1]), "{split:?}");
        // Uneven totals of many ranks still close exactly.
        let totals = [7, 0, 13, 12];
        let split = micro_batch_shares(&totals, 8, 4, 0);
        for (r, &t) in totals.iter().enumerate() {
            assert_eq!(split.iter().map(|m| m[r]).sum::<usize>(), t, "{split:?}");
        }
        assert!(
            split.iter().all(|m| m.iter().sum::<usize>() == 8),
            "{split:?}"
        );
    }

    #[test]
    fn shares_follow_speed_and_sum_to_the_batch() {
        assert_eq!(proportional_shares(12, &[1.0, 0.5], &[]), [8, 4]);
        assert_eq!(proportional_shares(10, &[1.0, 1.0, 1.0], &[]), [4, 3, 3]);
        let s = proportional_shares(16, &[3.0, 1.0, 1.0], &[Some(6), None, None]);
        assert_eq!(s, [6, 5, 5]);
        assert_eq!(s.iter().sum::<usize>(), 16);
    }
}
