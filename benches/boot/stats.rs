//! Statistics over the runs of one runner: median, min, max, ratios. Pure functions, no I/O
//! (also compiled into tests/guest, which runs the unit tests below).

use serde::Serialize;

/// Median, minimum and maximum of a set of samples.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Spread {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

/// The median: the middle sample of an odd count, the mean of the two middle ones of an even
/// count; `None` for no samples. NaNs are ignored.
pub fn median(samples: &[f64]) -> Option<f64> {
    let mut v: Vec<f64> = samples.iter().copied().filter(|x| !x.is_nan()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.partial_cmp(b).expect("no NaN left"));
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

/// Median, min and max; `None` for no samples.
pub fn spread(samples: &[f64]) -> Option<Spread> {
    let median = median(samples)?;
    let finite = samples.iter().copied().filter(|x| !x.is_nan());
    let min = finite.clone().fold(f64::INFINITY, f64::min);
    let max = finite.fold(f64::NEG_INFINITY, f64::max);
    Some(Spread { median, min, max })
}

/// `value / base`, or `None` when either is absent, or the base is zero, negative or not finite
/// (a ratio to nothing is no ratio).
pub fn ratio(value: Option<f64>, base: Option<f64>) -> Option<f64> {
    match (value, base) {
        (Some(v), Some(b)) if b.is_finite() && b > 0.0 && v.is_finite() => Some(v / b),
        _ => None,
    }
}

/// A number for a Markdown table: no decimals from 100 up, one below 100, two below 10.
pub fn fmt_num(x: f64) -> String {
    let a = x.abs();
    if a >= 100.0 {
        format!("{x:.0}")
    } else if a >= 10.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.2}")
    }
}

/// A ratio for a Markdown table: like [`fmt_num`], but two significant digits below 0.01
/// (a container is thousands of times faster than a guest boot here).
pub fn fmt_ratio(x: f64) -> String {
    if x > 0.0 && x < 0.01 {
        let decimals = (-x.log10()).ceil() as usize + 1;
        format!("{x:.decimals$}×")
    } else {
        format!("{}×", fmt_num(x))
    }
}

/// `median (min–max)`, or `–` when there is nothing.
pub fn fmt_spread(s: Option<Spread>) -> String {
    match s {
        Some(s) => format!(
            "{} ({}–{})",
            fmt_num(s.median),
            fmt_num(s.min),
            fmt_num(s.max)
        ),
        None => "–".to_string(),
    }
}

/// In how many pairs `base` was ahead of `other`: the samples are `(round, value)` (lower is
/// better), a pair is one round both have; returns (pairs where base < other, pairs). The counts
/// of a sign test: with 10 pairs, "ahead" means in at least 8.
pub fn ahead_in_pairs(base: &[(usize, f64)], other: &[(usize, f64)]) -> (usize, usize) {
    let mut ahead = 0;
    let mut pairs = 0;
    for (round, b) in base {
        if let Some((_, o)) = other.iter().find(|(r, _)| r == round) {
            pairs += 1;
            if b < o {
                ahead += 1;
            }
        }
    }
    (ahead, pairs)
}

// cargo builds this harness=false bench with cfg(test) but without #[test] functions
#[cfg(test)]
#[allow(unused_imports, dead_code)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[7.0]), Some(7.0));
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), Some(2.5));
        assert_eq!(median(&[10.0, 20.0]), Some(15.0));
        assert_eq!(median(&[5.0, f64::NAN, 1.0]), Some(3.0));
    }

    #[test]
    fn spread_gives_min_and_max() {
        assert_eq!(spread(&[]), None);
        assert_eq!(
            spread(&[5.0, 1.0, 9.0, 3.0]),
            Some(Spread {
                median: 4.0,
                min: 1.0,
                max: 9.0
            })
        );
        assert_eq!(
            spread(&[2.5]),
            Some(Spread {
                median: 2.5,
                min: 2.5,
                max: 2.5
            })
        );
    }

    #[test]
    fn pairs_are_matched_by_round() {
        let loft = [(1, 10.0), (2, 12.0), (3, 9.0), (5, 8.0)];
        let other = [(1, 11.0), (2, 11.0), (3, 9.5), (4, 1.0)];
        assert_eq!(ahead_in_pairs(&loft, &other), (2, 3));
        assert_eq!(ahead_in_pairs(&loft, &[]), (0, 0));
        // A tie is not ahead.
        assert_eq!(ahead_in_pairs(&[(1, 5.0)], &[(1, 5.0)]), (0, 1));
    }

    #[test]
    fn ratios_with_a_zero_or_absent_base() {
        assert_eq!(ratio(Some(30.0), Some(10.0)), Some(3.0));
        assert_eq!(ratio(Some(5.0), Some(10.0)), Some(0.5));
        assert_eq!(ratio(Some(5.0), Some(0.0)), None);
        assert_eq!(ratio(Some(5.0), None), None);
        assert_eq!(ratio(None, Some(10.0)), None);
        assert_eq!(ratio(Some(5.0), Some(f64::NAN)), None);
        assert_eq!(ratio(Some(5.0), Some(-1.0)), None);
    }

    #[test]
    fn formats_numbers_for_the_table() {
        assert_eq!(fmt_num(23456.78), "23457");
        assert_eq!(fmt_num(21.24), "21.2");
        assert_eq!(fmt_num(3.0), "3.00");
        assert_eq!(fmt_spread(None), "–");
        assert_eq!(fmt_ratio(1.0), "1.00×");
        assert_eq!(fmt_ratio(2.441), "2.44×");
        assert_eq!(fmt_ratio(64.6 / 116135.0), "0.00056×");
        assert_eq!(fmt_ratio(0.05), "0.05×");
        assert_eq!(fmt_ratio(0.0), "0.00×");
        assert_eq!(
            fmt_spread(Some(Spread {
                median: 3.0,
                min: 2.5,
                max: 150.0
            })),
            "3.00 (2.50–150)"
        );
    }
}
