//! Order statistics of the benchmark's samples.

/// The `p`-th percentile of `v` by nearest rank: the smallest value with
/// at least `p`% of the samples at or below it (of 100 samples, p99 is the
/// second largest). NaN when `v` is empty.
pub fn percentile(v: &[f64], p: f64) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * s.len() as f64).ceil() as usize;
    s.get(rank.clamp(1, s.len().max(1)) - 1)
        .copied()
        .unwrap_or(f64::NAN)
}

/// p50, p99 and the largest of `v`.
pub fn spread(v: &[f64]) -> [f64; 3] {
    [
        percentile(v, 50.0),
        percentile(v, 99.0),
        percentile(v, 100.0),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank() {
        let v: Vec<f64> = (1..=100).rev().map(f64::from).collect();
        assert_eq!(spread(&v), [50.0, 99.0, 100.0]);
        assert_eq!(spread(&[7.0]), [7.0, 7.0, 7.0]);
        assert_eq!(percentile(&[1.0, 2.0, 3.0], 50.0), 2.0);
        assert!(percentile(&[], 50.0).is_nan());
        assert_eq!(
            percentile(&[4.0, 1.0, 3.0, 2.0], 50.0),
            2.0,
            "the lower middle"
        );
    }
}
