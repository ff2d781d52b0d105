//! Plan-time checks on params: each names the first value no run could use and what would do.
//! A stage's `Task::check` combines them, so a zero batch or a patch that does not divide the
//! image is refused before any stage runs, with the stage's file and line.

pub type Checked = Result<(), String>;

pub fn positive(name: &str, value: usize) -> Checked {
    if value == 0 {
        return Err(format!("`{name}` must be at least 1"));
    }
    Ok(())
}

/// `lo <= value <= hi` (`hi_open`: `value < hi`), and finite.
pub fn within(name: &str, value: f64, lo: f64, hi: f64, hi_open: bool) -> Checked {
    let above = if hi_open { value >= hi } else { value > hi };
    if !value.is_finite() || value < lo || above {
        let close = if hi_open { ")" } else { "]" };
        return Err(format!(
            "`{name}` is {value}; it must lie in [{lo}, {hi}{close}"
        ));
    }
    Ok(())
}

pub fn positive_f(name: &str, value: f64) -> Checked {
    if !value.is_finite() || value <= 0.0 {
        return Err(format!("`{name}` is {value}; it must be above 0"));
    }
    Ok(())
}

/// A RandomResizedCrop area range: 0 < low <= high <= 1.
pub fn crop_scale(scale: (f64, f64)) -> Checked {
    let (lo, hi) = scale;
    if !(lo > 0.0 && lo <= hi && hi <= 1.0) {
        return Err(format!(
            "`crop_scale` is [{lo}, {hi}]; it must be [low, high] with 0 < low <= high <= 1"
        ));
    }
    Ok(())
}

/// The schedule of a training kind: epochs, batch, warmup and weight decay.
pub fn schedule(epochs: usize, batch: usize, warmup_epochs: f64, weight_decay: f64) -> Checked {
    positive("epochs", epochs)?;
    positive("batch", batch)?;
    within("warmup_epochs", warmup_epochs, 0.0, f64::MAX, false)?;
    within("weight_decay", weight_decay, 0.0, f64::MAX, false)
}

/// The plan-time warning of a warmup as long as the run.
pub fn warmup_lint(warmup_epochs: f64, epochs: usize) -> Vec<String> {
    if warmup_epochs >= epochs as f64 {
        vec![format!("warmup_epochs ({warmup_epochs}) >= epochs ({epochs}): the warmup is cut to half the run, and the lr peaks only at its middle")]
    } else {
        Vec::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_the_param_and_the_range() {
        assert_eq!(
            positive("batch", 0).unwrap_err(),
            "`batch` must be at least 1"
        );
        assert!(within("drop_path", 1.0, 0.0, 1.0, true)
            .unwrap_err()
            .contains("[0, 1)"));
        assert!(within("x", f64::NAN, 0.0, 1.0, false).is_err());
        assert!(crop_scale((0.8, 0.5)).is_err() && crop_scale((0.5, 1.0)).is_ok());
    }
}
