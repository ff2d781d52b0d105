//! Classification metrics with sklearn's definitions: ROC AUC with ties counted as 1/2 (undefined,
//! `None`, when a class has one label value), Cohen's kappa, accuracy, macro-F1, confusion matrix,
//! study-level aggregation (mean image probability per study, as MURA is scored) and percentile
//! bootstrap confidence intervals.

use std::collections::BTreeMap;

/// Mann-Whitney AUC with average ranks for ties. `None` if all labels are equal.
pub fn roc_auc(labels: &[bool], scores: &[f64]) -> Option<f64> {
    let pos = labels.iter().filter(|&&l| l).count();
    let neg = labels.len() - pos;
    if pos == 0 || neg == 0 {
        return None;
    }
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]));
    let mut ranks = vec![0f64; scores.len()];
    let mut i = 0;
    while i < order.len() {
        let mut j = i;
        while j + 1 < order.len() && scores[order[j + 1]] == scores[order[i]] {
            j += 1;
        }
        let rank = (i + j) as f64 / 2.0 + 1.0;
        for &k in &order[i..=j] {
            ranks[k] = rank;
        }
        i = j + 1;
    }
    let sum_pos: f64 = labels
        .iter()
        .zip(&ranks)
        .filter(|(l, _)| **l)
        .map(|(_, r)| r)
        .sum();
    Some((sum_pos - (pos * (pos + 1)) as f64 / 2.0) / (pos * neg) as f64)
}

/// One-vs-rest AUC per class; the mean skips undefined classes.
pub fn roc_auc_per_class(
    labels: &[Vec<bool>],
    scores: &[Vec<f64>],
) -> (Vec<Option<f64>>, Option<f64>) {
    let classes = scores.first().map_or(0, Vec::len);
    let per: Vec<Option<f64>> = (0..classes)
        .map(|c| {
            let l: Vec<bool> = labels.iter().map(|r| r[c]).collect();
            let s: Vec<f64> = scores.iter().map(|r| r[c]).collect();
            roc_auc(&l, &s)
        })
        .collect();
    let defined: Vec<f64> = per.iter().flatten().copied().collect();
    let mean = (!defined.is_empty()).then(|| defined.iter().sum::<f64>() / defined.len() as f64);
    (per, mean)
}

pub fn confusion(truth: &[usize], pred: &[usize], classes: usize) -> Vec<Vec<u64>> {
    let mut m = vec![vec![0u64; classes]; classes];
    for (&t, &p) in truth.iter().zip(pred) {
        m[t][p] += 1;
    }
    m
}

/// sklearn's `cohen_kappa_score` (unweighted). NaN when undefined (0/0).
pub fn cohen_kappa(truth: &[usize], pred: &[usize], classes: usize) -> f64 {
    let m = confusion(truth, pred, classes);
    let total: f64 = m.iter().flatten().sum::<u64>() as f64;
    let rows: Vec<f64> = m.iter().map(|r| r.iter().sum::<u64>() as f64).collect();
    let cols: Vec<f64> = (0..classes)
        .map(|j| m.iter().map(|r| r[j]).sum::<u64>() as f64)
        .collect();
    let (mut observed, mut expected) = (0.0, 0.0);
    for i in 0..classes {
        for j in 0..classes {
            if i != j {
                observed += m[i][j] as f64;
                expected += rows[i] * cols[j] / total;
            }
        }
    }
    1.0 - observed / expected
}

pub fn accuracy(truth: &[usize], pred: &[usize]) -> f64 {
    truth.iter().zip(pred).filter(|(t, p)| t == p).count() as f64 / truth.len().max(1) as f64
}

/// Unweighted mean of per-class F1 over the classes present in truth or prediction (sklearn's
/// `f1_score(average='macro')` with zero_division=0 for the others).
pub fn macro_f1(truth: &[usize], pred: &[usize], classes: usize) -> f64 {
    let m = confusion(truth, pred, classes);
    let f1: Vec<f64> = (0..classes)
        .map(|c| {
            let tp = m[c][c] as f64;
            let fp: f64 = (0..classes)
                .filter(|&r| r != c)
                .map(|r| m[r][c] as f64)
                .sum();
            let fn_: f64 = (0..classes)
                .filter(|&p| p != c)
                .map(|p| m[c][p] as f64)
                .sum();
            if tp == 0.0 {
                0.0
            } else {
                2.0 * tp / (2.0 * tp + fp + fn_)
            }
        })
        .collect();
    f1.iter().sum::<f64>() / classes.max(1) as f64
}

/// Mean image probability per study, studies sorted by id: (ids, image counts, probabilities, labels).
pub fn study_level(
    study_ids: &[i64],
    probs: &[f64],
    labels: &[usize],
) -> (Vec<i64>, Vec<usize>, Vec<f64>, Vec<usize>) {
    let mut acc: BTreeMap<i64, (f64, usize, usize)> = BTreeMap::new();
    for ((&s, &p), &l) in study_ids.iter().zip(probs).zip(labels) {
        let e = acc.entry(s).or_insert((0.0, 0, l));
        e.0 += p;
        e.1 += 1;
    }
    let mut out = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for (s, (sum, n, l)) in acc {
        out.0.push(s);
        out.1.push(n);
        out.2.push(sum / n as f64);
        out.3.push(l);
    }
    out
}

/// Percentile bootstrap (95% by default) of `stat` over resampled indices, seeded.
pub fn bootstrap_ci(
    n: usize,
    rounds: usize,
    seed: u64,
    alpha: f64,
    stat: impl Fn(&[usize]) -> Option<f64>,
) -> Option<(f64, f64)> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut values: Vec<f64> = (0..rounds)
        .filter_map(|_| {
            let idx: Vec<usize> = (0..n).map(|_| (next() % n as u64) as usize).collect();
            stat(&idx).filter(|v| v.is_finite())
        })
        .collect();
    if values.len() < rounds / 2 {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let at =
        |q: f64| values[((q * (values.len() - 1) as f64).round() as usize).min(values.len() - 1)];
    Some((at(alpha / 2.0), at(1.0 - alpha / 2.0)))
}

/// The Wilcoxon signed-rank test of paired differences (two-sided): zero differences dropped,
/// tied magnitudes given their average rank, the variance corrected for ties, and the normal
/// approximation (as scipy's `wilcoxon` does by default for more than 50 pairs or with ties).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Wilcoxon {
    /// Non-zero differences.
    pub n: usize,
    /// Sum of the ranks of the positive differences.
    pub w_plus: f64,
    pub z: f64,
    pub p: f64,
}

pub fn wilcoxon_signed_rank(diffs: &[f64]) -> Option<Wilcoxon> {
    let mut d: Vec<f64> = diffs
        .iter()
        .copied()
        .filter(|v| *v != 0.0 && v.is_finite())
        .collect();
    let n = d.len();
    if n == 0 {
        return None;
    }
    d.sort_by(|a, b| a.abs().total_cmp(&b.abs()));
    let (mut w_plus, mut tie_term) = (0.0, 0.0);
    let mut i = 0;
    while i < n {
        let mut j = i;
        while j + 1 < n && d[j + 1].abs() == d[i].abs() {
            j += 1;
        }
        let rank = (i + j) as f64 / 2.0 + 1.0;
        let t = (j - i + 1) as f64;
        tie_term += t * t * t - t;
        w_plus += d[i..=j].iter().filter(|v| **v > 0.0).count() as f64 * rank;
        i = j + 1;
    }
    let nf = n as f64;
    let mean = nf * (nf + 1.0) / 4.0;
    let var = nf * (nf + 1.0) * (2.0 * nf + 1.0) / 24.0 - tie_term / 48.0;
    let z = if var > 0.0 {
        (w_plus - mean) / var.sqrt()
    } else {
        0.0
    };
    Some(Wilcoxon {
        n,
        w_plus,
        z,
        p: (2.0 * normal_sf(z.abs())).min(1.0),
    })
}

/// P(Z > z) for a standard normal Z.
pub fn normal_sf(z: f64) -> f64 {
    use statrs::distribution::{ContinuousCDF, Normal};
    Normal::standard().sf(z)
}

/// The 95% confidence interval of a mean over a few runs (seeds): mean ± t(0.975, n - 1) x sd /
/// sqrt(n). `None` for fewer than two values. This is the interval of the seed-to-seed spread,
/// not of any one run's test-set sampling (that is the bootstrap's).
pub fn mean_ci95(v: &[f64]) -> Option<(f64, f64, f64)> {
    use statrs::distribution::{ContinuousCDF, StudentsT};
    let n = v.len();
    if n < 2 {
        return None;
    }
    let mean = v.iter().sum::<f64>() / n as f64;
    let sd = (v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64).sqrt();
    let t = StudentsT::new(0.0, 1.0, (n - 1) as f64)
        .ok()?
        .inverse_cdf(0.975);
    let half = t * sd / (n as f64).sqrt();
    Some((mean, mean - half, mean + half))
}

/// One class's row of the per-class table, one-vs-rest from the confusion matrix.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ClassRow {
    pub support: u64,
    /// Recall: true positives / images of the class.
    pub sensitivity: f64,
    /// True negatives / images of the other classes.
    pub specificity: f64,
    /// Precision: true positives / images predicted as the class (`None`: never predicted).
    pub ppv: Option<f64>,
    pub f1: f64,
}

/// Per-class sensitivity, specificity, PPV and F1 from a confusion matrix (rows: truth).
pub fn per_class(confusion: &[Vec<u64>]) -> Vec<ClassRow> {
    let total: u64 = confusion.iter().flatten().sum();
    (0..confusion.len())
        .map(|c| {
            let tp = confusion[c][c];
            let support: u64 = confusion[c].iter().sum();
            let predicted: u64 = confusion.iter().map(|row| row[c]).sum();
            let (fp, fn_) = (predicted - tp, support - tp);
            let tn = total - tp - fp - fn_;
            let ratio = |a: u64, b: u64| if b == 0 { 0.0 } else { a as f64 / b as f64 };
            let ppv = (predicted > 0).then(|| ratio(tp, predicted));
            let sensitivity = ratio(tp, support);
            let f1 = match ppv {
                Some(p) if p + sensitivity > 0.0 => 2.0 * p * sensitivity / (p + sensitivity),
                _ => 0.0,
            };
            ClassRow {
                support,
                sensitivity,
                specificity: ratio(tn, tn + fp),
                ppv,
                f1,
            }
        })
        .collect()
}

/// The ROC curve of one class: (false positive rate, true positive rate) at every distinct
/// score threshold, from (0, 0) to (1, 1). Empty when the class has one label value.
pub fn roc_curve(labels: &[bool], scores: &[f64]) -> Vec<(f64, f64)> {
    let pos = labels.iter().filter(|&&l| l).count() as f64;
    let neg = labels.len() as f64 - pos;
    if pos == 0.0 || neg == 0.0 {
        return Vec::new();
    }
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
    let (mut tp, mut fp) = (0.0, 0.0);
    let mut points = vec![(0.0, 0.0)];
    for (k, &i) in order.iter().enumerate() {
        if labels[i] {
            tp += 1.0;
        } else {
            fp += 1.0;
        }
        // One point per threshold: ties move together.
        if order.get(k + 1).is_none_or(|&j| scores[j] != scores[i]) {
            points.push((fp / neg, tp / pos));
        }
    }
    points
}

/// A reliability diagram: for equal-width bins of the predicted class's probability, the mean
/// confidence, the accuracy and the count; and the expected calibration error (the
/// count-weighted mean gap between the two).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Calibration {
    pub ece: f64,
    /// (mean confidence, accuracy, images) per non-empty bin, low to high.
    pub bins: Vec<(f64, f64, usize)>,
}

pub fn calibration(confidence: &[f64], correct: &[bool], bins: usize) -> Calibration {
    let mut acc = vec![(0.0, 0.0, 0usize); bins];
    for (&c, &ok) in confidence.iter().zip(correct) {
        let b = ((c * bins as f64) as usize).min(bins - 1);
        acc[b].0 += c;
        acc[b].1 += ok as u8 as f64;
        acc[b].2 += 1;
    }
    let n = confidence.len().max(1) as f64;
    let bins: Vec<(f64, f64, usize)> = acc
        .into_iter()
        .filter(|b| b.2 > 0)
        .map(|(c, a, k)| (c / k as f64, a / k as f64, k))
        .collect();
    let ece = bins
        .iter()
        .map(|(c, a, k)| (c - a).abs() * *k as f64 / n)
        .sum();
    Calibration { ece, bins }
}

/// Holm's step-down adjustment of p-values for multiple comparisons, in the input order.
pub fn holm(p: &[f64]) -> Vec<f64> {
    let m = p.len();
    let mut order: Vec<usize> = (0..m).collect();
    order.sort_by(|&a, &b| p[a].total_cmp(&p[b]));
    let mut out = vec![0.0; m];
    let mut running: f64 = 0.0;
    for (rank, &i) in order.iter().enumerate() {
        running = running.max(((m - rank) as f64 * p[i]).min(1.0));
        out[i] = running;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_class_rows_roc_and_calibration() {
        // truth 0: 3 images, 2 right; truth 1: 2 images, both predicted 0.
        let rows = per_class(&[vec![2, 1], vec![2, 0]]);
        assert_eq!(rows[0].support, 3);
        assert!((rows[0].sensitivity - 2.0 / 3.0).abs() < 1e-12);
        assert_eq!(rows[0].specificity, 0.0);
        assert_eq!(rows[0].ppv, Some(0.5));
        assert_eq!(rows[1].ppv, Some(0.0));
        let roc = roc_curve(&[false, false, true, true], &[0.1, 0.4, 0.35, 0.8]);
        assert_eq!(
            roc,
            vec![(0.0, 0.0), (0.0, 0.5), (0.5, 0.5), (0.5, 1.0), (1.0, 1.0)]
        );
        let c = calibration(&[0.9, 0.9, 0.6, 0.6], &[true, false, true, true], 10);
        assert_eq!(c.bins.len(), 2);
        assert!((c.ece - (0.5 * 0.4 + 0.5 * 0.4)).abs() < 1e-12, "{}", c.ece);
        let (m, lo, hi) = mean_ci95(&[0.5, 0.6, 0.7]).unwrap();
        // t(0.975, 2) = 4.303
        assert!(
            (m - 0.6).abs() < 1e-12 && (hi - lo - 2.0 * 4.3027 * 0.1 / 3f64.sqrt()).abs() < 1e-3
        );
        assert!(mean_ci95(&[0.5]).is_none());
    }

    #[test]
    fn auc_counts_ties_as_half() {
        assert_eq!(roc_auc(&[false, true], &[0.5, 0.5]), Some(0.5));
        assert_eq!(
            roc_auc(&[false, false, true, true], &[0.1, 0.4, 0.35, 0.8]),
            Some(0.75)
        );
        assert_eq!(roc_auc(&[true, true], &[0.1, 0.2]), None);
    }

    #[test]
    fn kappa_and_f1() {
        assert!((cohen_kappa(&[0, 1, 0, 1], &[0, 1, 0, 1], 2) - 1.0).abs() < 1e-12);
        assert!(
            (macro_f1(&[0, 1, 1], &[0, 1, 0], 2) - (2.0 / 3.0 + 2.0 / 3.0) / 2.0).abs() < 1e-12
        );
    }

    #[test]
    fn bootstrap_brackets_the_estimate() {
        let truth = [0usize, 1, 1, 0, 1, 0, 1, 1, 0, 0];
        let pred = [0usize, 1, 0, 0, 1, 0, 1, 1, 1, 0];
        let (lo, hi) = bootstrap_ci(10, 500, 7, 0.05, |i| {
            Some(accuracy(
                &i.iter().map(|&k| truth[k]).collect::<Vec<_>>(),
                &i.iter().map(|&k| pred[k]).collect::<Vec<_>>(),
            ))
        })
        .unwrap();
        assert!(lo <= 0.8 && 0.8 <= hi && lo < hi);
    }

    #[test]
    fn wilcoxon_matches_hand_computation_and_behaves() {
        // diffs 1, -2, 3, 3, 0: zero dropped; |d| ranks 1, 2, 3.5, 3.5; W+ = 1 + 3.5 + 3.5 = 8.
        let w = wilcoxon_signed_rank(&[1.0, -2.0, 3.0, 3.0, 0.0]).unwrap();
        assert_eq!(w.n, 4);
        assert_eq!(w.w_plus, 8.0);
        // mean 5, var = 4*5*9/24 - (8-2)/48 = 7.5 - 0.125
        assert!((w.z - 3.0 / 7.375f64.sqrt()).abs() < 1e-12, "{w:?}");
        // Symmetric differences: no evidence either way.
        let sym = wilcoxon_signed_rank(&[-3.0, -2.0, -1.0, 1.0, 2.0, 3.0]).unwrap();
        assert!(sym.z.abs() < 1e-12 && (sym.p - 1.0).abs() < 1e-6, "{sym:?}");
        // 60 positive differences: overwhelming evidence.
        let pos: Vec<f64> = (1..=60).map(|i| i as f64 * 0.01).collect();
        assert!(wilcoxon_signed_rank(&pos).unwrap().p < 1e-9);
        assert!(wilcoxon_signed_rank(&[0.0, 0.0]).is_none());
    }

    #[test]
    fn normal_tail_and_holm() {
        assert!((normal_sf(0.0) - 0.5).abs() < 1e-7);
        assert!((normal_sf(1.959_963_984_540_054) - 0.025).abs() < 1e-7);
        assert!((normal_sf(-1.0) - 0.841_344_746_068_542_9).abs() < 1e-7);
        let adj = holm(&[0.01, 0.04, 0.03]);
        // sorted 0.01 (x3), 0.03 (x2), 0.04 (x1), running max
        for (a, e) in adj.iter().zip([0.03, 0.06, 0.06]) {
            assert!((a - e).abs() < 1e-12, "{adj:?}");
        }
    }
}
