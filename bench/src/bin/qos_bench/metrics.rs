//! The figures the QoS benchmark reports: rate error, Jain's fairness index
//! and weighted ratios, over the whole measurement or per window.

/// Error of an achieved rate against the configured one, in percent.
pub fn error_pct(achieved: f64, configured: f64) -> f64 {
    100.0 * (achieved - configured) / configured
}

/// Rate error over windows of (seconds, amount): the error of the whole
/// measurement (amount over time) and the worst window's (largest
/// magnitude, sign kept).
pub fn rate_errors(windows: &[(f64, f64)], configured: f64) -> (f64, f64) {
    let (secs, amount) = windows
        .iter()
        .fold((0.0, 0.0), |(s, a), &(ws, wa)| (s + ws, a + wa));
    let mean = error_pct(amount / secs.max(1e-9), configured);
    let worst = windows
        .iter()
        .map(|&(s, a)| error_pct(a / s.max(1e-9), configured))
        .fold(0.0f64, |w, e| if e.abs() > w.abs() { e } else { w });
    (mean, worst)
}

/// Jain's fairness index of `x`: (Σx)² / (n·Σx²), 1 when all are equal,
/// 1/n when one takes everything.
pub fn jain(x: &[f64]) -> f64 {
    let sum: f64 = x.iter().sum();
    let sq: f64 = x.iter().map(|v| v * v).sum();
    if sq == 0.0 {
        return 0.0;
    }
    sum * sum / (x.len() as f64 * sq)
}

/// Rates relative to the first flow's, to compare with the weights
/// relative to the first weight: (achieved ratios, largest error in % of a
/// configured ratio).
pub fn ratio_errors(rates: &[f64], weights: &[u32]) -> (Vec<f64>, f64) {
    let base = rates.first().copied().unwrap_or(0.0).max(1e-9);
    let wbase = f64::from(weights.first().copied().unwrap_or(1).max(1));
    let ratios: Vec<f64> = rates.iter().map(|r| r / base).collect();
    let worst = ratios
        .iter()
        .zip(weights)
        .map(|(&r, &w)| error_pct(r, f64::from(w) / wbase))
        .fold(0.0f64, |m, e| if e.abs() > m.abs() { e } else { m });
    (ratios, worst)
}

/// The median of `v` (the lower middle of an even count), NaN when empty.
pub fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    s.get(s.len().saturating_sub(1) / 2)
        .copied()
        .unwrap_or(f64::NAN)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_errors_whole_and_worst() {
        let w = [(1.0, 101.0), (1.0, 97.0), (2.0, 200.0)];
        let (mean, worst) = rate_errors(&w, 100.0);
        assert!((mean - (-0.5)).abs() < 1e-9);
        assert!((worst - (-3.0)).abs() < 1e-9);
    }

    #[test]
    fn jain_bounds() {
        assert!((jain(&[5.0, 5.0, 5.0]) - 1.0).abs() < 1e-12);
        assert!((jain(&[1.0, 0.0, 0.0, 0.0]) - 0.25).abs() < 1e-12);
        assert_eq!(jain(&[0.0, 0.0]), 0.0);
    }

    #[test]
    fn ratios_against_weights() {
        let (r, worst) = ratio_errors(&[10.0, 20.0, 33.0], &[1, 2, 3]);
        assert_eq!(r, vec![1.0, 2.0, 3.3]);
        assert!((worst - 10.0).abs() < 1e-9);
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 2.0);
    }
}
