//! Statistics of the samples, and the interleaved order of the runs.

/// Median, minimum and maximum of a set of samples.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Summary {
    /// The median (mean of the two middle values for an even count).
    pub median: f64,
    /// The smallest sample.
    pub min: f64,
    /// The largest sample.
    pub max: f64,
    /// How many samples.
    pub n: usize,
}

/// The summary of `samples`, or `None` when there is none (NaNs are ignored).
pub fn summarize(samples: &[f64]) -> Option<Summary> {
    let mut v: Vec<f64> = samples.iter().copied().filter(|x| !x.is_nan()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let median = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    Some(Summary {
        median,
        min: v[0],
        max: v[n - 1],
        n,
    })
}

/// The `p`-th percentile (0–100) of `samples` by the nearest-rank method: the smallest sample
/// that at least `p` % of the samples do not exceed. `None` without samples (NaNs ignored).
pub fn percentile(samples: &[f64], p: f64) -> Option<f64> {
    let mut v: Vec<f64> = samples.iter().copied().filter(|x| !x.is_nan()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let rank = (p.clamp(0.0, 100.0) / 100.0 * v.len() as f64).ceil() as usize;
    Some(v[rank.clamp(1, v.len()) - 1])
}

/// `value / baseline`, or `None` when the baseline is zero or not finite.
pub fn ratio(value: f64, baseline: f64) -> Option<f64> {
    (baseline != 0.0 && baseline.is_finite() && value.is_finite()).then(|| value / baseline)
}

/// The order of the runs: repetition by repetition, every runtime once each, in reverse order
/// every other repetition (A B, B A, A B …), so that drift of the machine over time hits every
/// runtime alike and no runtime always runs right after the same one. (Seen: a batch of
/// Nutshell VMs started right after another runtime's batch was torn down ran slower than the
/// next batch; with a fixed order, that fell on the same runtime every round.)
pub fn interleave<'a>(runtimes: &[&'a str], reps: usize) -> Vec<(usize, &'a str)> {
    (0..reps)
        .flat_map(|rep| {
            let round: Vec<&str> = if rep % 2 == 0 {
                runtimes.to_vec()
            } else {
                runtimes.iter().rev().copied().collect()
            };
            round.into_iter().map(move |rt| (rep, rt))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_min_max() {
        let s = summarize(&[3.0, 1.0, 2.0]).unwrap();
        assert_eq!((s.median, s.min, s.max, s.n), (2.0, 1.0, 3.0, 3));
        let s = summarize(&[4.0, 1.0, 3.0, 2.0]).unwrap();
        assert_eq!(s.median, 2.5);
        let s = summarize(&[f64::NAN, 5.0]).unwrap();
        assert_eq!((s.median, s.n), (5.0, 1));
        assert!(summarize(&[]).is_none());
    }

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<f64> = (1..=100).rev().map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), Some(50.0));
        assert_eq!(percentile(&v, 99.0), Some(99.0));
        assert_eq!(percentile(&v, 100.0), Some(100.0));
        assert_eq!(percentile(&v, 0.0), Some(1.0));
        // Few samples: p99 is the largest, p50 the lower middle one.
        assert_eq!(percentile(&[3.0, 1.0, 2.0, 4.0], 99.0), Some(4.0));
        assert_eq!(percentile(&[3.0, 1.0, 2.0, 4.0], 50.0), Some(2.0));
        assert_eq!(percentile(&[f64::NAN, 7.0], 50.0), Some(7.0));
        assert_eq!(percentile(&[], 50.0), None);
    }

    #[test]
    fn ratios() {
        assert_eq!(ratio(3.0, 2.0), Some(1.5));
        assert_eq!(ratio(1.0, 0.0), None);
        assert_eq!(ratio(f64::NAN, 1.0), None);
    }

    #[test]
    fn runs_alternate_between_runtimes() {
        let order = interleave(&["runc", "nutshell"], 3);
        let names: Vec<&str> = order.iter().map(|(_, r)| *r).collect();
        assert_eq!(
            names,
            ["runc", "nutshell", "nutshell", "runc", "runc", "nutshell"]
        );
        assert_eq!(order[2], (1, "nutshell"));
        let three: Vec<&str> = interleave(&["a", "b", "c"], 2)
            .into_iter()
            .map(|(_, r)| r)
            .collect();
        assert_eq!(three, ["a", "b", "c", "c", "b", "a"]);
        assert!(interleave(&["runc"], 0).is_empty());
    }
}
