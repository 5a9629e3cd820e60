//! Summaries over seeds: every accuracy the harness reports is a mean and a sample standard
//! deviation over protocol seeds.

/// Mean and (sample) standard deviation; NaN for no values, a standard deviation of 0 for one.
pub fn mean_std(xs: &[f64]) -> (f64, f64) {
    let n = xs.len() as f64;
    if xs.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    let m = xs.iter().sum::<f64>() / n;
    let var = if xs.len() > 1 { xs.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (n - 1.0) } else { 0.0 };
    (m, var.sqrt())
}
