//! Helpers shared by the benchmark programs, each of which includes this file as `mod common`.

/// The median of `values` (the upper one of an even count); `values` must not be empty.
pub(crate) fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted[sorted.len() / 2]
}
