//! Ranking the features that fire on a prompt by how strongly they fire for *them*: an
//! activation divided by the feature's maximum over the dataset (from a features folder).
//!
//! Raw activations favour features with a large scale, and dense features (those that fire on a
//! large share of all tokens) top every prompt whatever it says. So a feature's rank key is
//! (dense, relative activation): features denser than `max_density` come after every specific
//! one, and within each group the highest relative activation comes first. A feature whose
//! dataset maximum is 0 (it never fired over the dataset) has no relative activation and comes
//! last in its group.

use std::cmp::Ordering;

use serde::Serialize;

use crate::features::set::FeatureStats;

/// Default `--max-density`: features that fire on more than 2% of the dataset's tokens are
/// marked dense. The demo SAE's mean firing rate is k / d_sae = 32 / 4608 = 0.7% of tokens, so
/// 2% is about three times the mean: a feature above it fires on one token in fifty or more,
/// too often to say something specific about a prompt.
pub const DEFAULT_MAX_DENSITY: f64 = 0.02;

/// What a features folder says about one feature's scale.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Scale {
    /// The feature's maximum activation over the dataset.
    pub dataset_max: f32,
    /// Share of the dataset's tokens on which it fires.
    pub density: f64,
    /// `density > max_density`.
    pub dense: bool,
}

impl Scale {
    pub fn of(stats: &FeatureStats, max_density: f64) -> Scale {
        Scale {
            dataset_max: stats.max_activation,
            density: stats.frequency,
            dense: is_dense(stats.frequency, max_density),
        }
    }

    /// `activation / dataset_max`; `None` when the feature never fired over the dataset.
    pub fn relative(&self, activation: f32) -> Option<f64> {
        (self.dataset_max > 0.0).then(|| activation as f64 / self.dataset_max as f64)
    }
}

/// A feature is dense when it fires on more than `max_density` of the tokens; one exactly at
/// the threshold is not.
pub fn is_dense(density: f64, max_density: f64) -> bool {
    density > max_density
}

/// The order of two features by (dense, relative activation descending, id): `None` relative
/// activations sort after every number.
pub fn rank_order(a: (bool, Option<f64>, i64), b: (bool, Option<f64>, i64)) -> Ordering {
    let relative = |x: Option<f64>, y: Option<f64>| match (x, y) {
        (Some(x), Some(y)) => y.total_cmp(&x),
        (Some(_), None) => Ordering::Less,
        (None, Some(_)) => Ordering::Greater,
        (None, None) => Ordering::Equal,
    };
    a.0.cmp(&b.0).then(relative(a.1, b.1)).then(a.2.cmp(&b.2))
}

/// Per-feature scales of a features folder's statistics.
pub fn scales(features: &[FeatureStats], max_density: f64) -> Vec<Scale> {
    features.iter().map(|f| Scale::of(f, max_density)).collect()
}

/// Checks a `--max-density` value.
pub fn check_max_density(max_density: f64) -> anyhow::Result<()> {
    if !(0.0..=1.0).contains(&max_density) {
        anyhow::bail!("--max-density {max_density} must be a share of tokens in 0..=1 (0.02 = 2%)");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(max: f32, frequency: f64) -> FeatureStats {
        FeatureStats {
            feature: 0,
            fired: 0,
            frequency,
            max_activation: max,
            mean_activation: 0.0,
            dead: max == 0.0,
            histogram: vec![],
            top_logit_tokens: vec![],
            top_logits: vec![],
            bottom_logit_tokens: vec![],
            bottom_logits: vec![],
            neighbors: vec![],
            neighbor_cosines: vec![],
            language_shares: vec![],
        }
    }

    #[test]
    fn relative_activation_and_the_density_threshold() {
        let s = Scale::of(&stats(4.0, 0.02), 0.02);
        assert_eq!(s.relative(3.0), Some(0.75));
        assert!(!s.dense, "a feature exactly at the threshold is not dense");
        assert!(Scale::of(&stats(4.0, 0.020_000_1), 0.02).dense);
        assert_eq!(Scale::of(&stats(0.0, 0.0), 0.02).relative(1.0), None);
        assert!(check_max_density(1.5).is_err() && check_max_density(-0.1).is_err());
        assert!(check_max_density(0.0).is_ok() && check_max_density(1.0).is_ok());
    }

    #[test]
    fn dense_features_come_after_specific_ones_and_unseen_ones_last_in_their_group() {
        let mut keys = [
            (true, Some(0.9), 0),
            (false, Some(0.2), 1),
            (false, None, 2),
            (false, Some(0.5), 3),
            (true, Some(0.1), 4),
            (false, Some(0.5), 5),
        ];
        keys.sort_by(|a, b| rank_order(*a, *b));
        assert_eq!(keys.iter().map(|k| k.2).collect::<Vec<_>>(), vec![3, 5, 1, 2, 0, 4]);
    }
}
