//! Statistics shared by the benchmarks in `benches/`.

/// Median and 90th percentile of a sample, in the sample's unit.
pub struct Stats {
    pub median: f64,
    pub p90: f64,
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

/// The median and p90 of `v` (not empty).
pub fn stats(mut v: Vec<f64>) -> Stats {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    Stats {
        median: percentile(&v, 0.5),
        p90: percentile(&v, 0.9),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn median_and_p90() {
        let s = super::stats((1..=10).map(f64::from).collect());
        assert_eq!(s.median, 6.0);
        assert_eq!(s.p90, 9.0);
    }
}
