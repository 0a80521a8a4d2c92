//! Which branch each connection uses: uniform over `--branches`, or Zipf-skewed in list order.

use std::fmt;
use std::str::FromStr;

use rand::Rng;

/// The largest Zipf exponent accepted (beyond it nearly every pick is the first branch anyway).
const MAX_ZIPF_EXPONENT: f64 = 100.0;

/// How branches are chosen (`--branch-dist`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum BranchDist {
    /// Every branch equally often.
    Uniform,
    /// The i-th branch (from 1) with weight `1 / i^s`.
    Zipf(f64),
}

impl FromStr for BranchDist {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        if text == "uniform" {
            return Ok(Self::Uniform);
        }
        let exponent = text
            .strip_prefix("zipf:")
            .ok_or_else(|| format!("'{text}' is neither 'uniform' nor 'zipf:S'"))?;
        match exponent.parse::<f64>() {
            Ok(s) if s > 0.0 && s <= MAX_ZIPF_EXPONENT => Ok(Self::Zipf(s)),
            _ => Err(format!(
                "Zipf exponent '{exponent}' is not a number in (0, {MAX_ZIPF_EXPONENT}]"
            )),
        }
    }
}

impl fmt::Display for BranchDist {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Uniform => f.write_str("uniform"),
            Self::Zipf(s) => write!(f, "zipf:{s}"),
        }
    }
}

/// Picks branches from a list by a [`BranchDist`].
#[derive(Clone, Debug)]
pub struct BranchPicker {
    branches: Vec<String>,
    /// Cumulative probabilities, ending at 1.0; empty for uniform.
    cdf: Vec<f64>,
}

impl BranchPicker {
    /// A picker over `branches` (may be empty: then [`BranchPicker::pick`] gives `None`).
    pub fn new(branches: Vec<String>, dist: BranchDist) -> BranchPicker {
        let cdf = match dist {
            BranchDist::Uniform => Vec::new(),
            BranchDist::Zipf(s) => {
                let weights: Vec<f64> = (1..=branches.len())
                    .map(|rank| 1.0 / (rank as f64).powf(s))
                    .collect();
                let total: f64 = weights.iter().sum();
                let mut sum = 0.0;
                weights
                    .iter()
                    .map(|w| {
                        sum += w / total;
                        sum
                    })
                    .collect()
            }
        };
        BranchPicker { branches, cdf }
    }

    /// The branch for a uniform random number `u` in [0, 1).
    pub fn pick_with(&self, u: f64) -> Option<&str> {
        let last = self.branches.len().checked_sub(1)?;
        let index = if self.cdf.is_empty() {
            (u * self.branches.len() as f64) as usize
        } else {
            self.cdf.partition_point(|&c| c <= u)
        };
        Some(&self.branches[index.min(last)])
    }

    /// A random branch, or `None` when no branches were given.
    pub fn pick(&self, rng: &mut impl Rng) -> Option<&str> {
        self.pick_with(rng.gen::<f64>())
    }

    /// The branches, in `--branches` order.
    pub fn branches(&self) -> &[String] {
        &self.branches
    }

    /// Whether no branches were given.
    pub fn is_empty(&self) -> bool {
        self.branches.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("b{i}")).collect()
    }

    #[test]
    fn parses_distributions() {
        assert_eq!("uniform".parse(), Ok(BranchDist::Uniform));
        assert_eq!("zipf:1.1".parse(), Ok(BranchDist::Zipf(1.1)));
        for bad in [
            "", "zipf", "zipf:", "zipf:0", "zipf:-1", "zipf:x", "zipf:1e9", "normal",
        ] {
            assert!(bad.parse::<BranchDist>().is_err(), "{bad}");
        }
        assert_eq!(BranchDist::Zipf(1.5).to_string(), "zipf:1.5");
    }

    #[test]
    fn uniform_splits_the_unit_interval_evenly() {
        let picker = BranchPicker::new(names(4), BranchDist::Uniform);
        let picks: Vec<_> = [0.0, 0.24, 0.25, 0.5, 0.99]
            .iter()
            .map(|&u| picker.pick_with(u))
            .collect();
        assert_eq!(
            picks,
            [Some("b0"), Some("b0"), Some("b1"), Some("b2"), Some("b3")]
        );
    }

    #[test]
    fn zipf_weights_follow_rank() {
        // s = 1 over 3 branches: weights 1, 1/2, 1/3 of 11/6 = 6/11, 3/11, 2/11.
        let picker = BranchPicker::new(names(3), BranchDist::Zipf(1.0));
        assert_eq!(picker.pick_with(0.0), Some("b0"));
        assert_eq!(picker.pick_with(6.0 / 11.0 - 1e-9), Some("b0"));
        assert_eq!(picker.pick_with(6.0 / 11.0 + 1e-9), Some("b1"));
        assert_eq!(picker.pick_with(9.0 / 11.0 + 1e-9), Some("b2"));
        assert_eq!(picker.pick_with(0.999_999_999), Some("b2"));

        let mut rng = rand::thread_rng();
        let skewed = BranchPicker::new(names(10), BranchDist::Zipf(2.0));
        let first = (0..10_000)
            .filter(|_| skewed.pick(&mut rng) == Some("b0"))
            .count();
        // 1 / zeta_10(2) = 0.645.
        assert!((6000..6900).contains(&first), "{first}");
    }

    #[test]
    fn no_branches_no_pick() {
        let picker = BranchPicker::new(Vec::new(), BranchDist::Zipf(1.0));
        assert!(picker.is_empty());
        assert_eq!(picker.pick_with(0.5), None);
    }
}
