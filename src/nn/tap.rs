//! Named points inside a model's forward pass, to record activations (parity tests check
//! intermediates) or to read the gradient at one of them (Grad-CAM).
//!
//! candle drops the gradients of non-leaf tensors, so a tap adds a zero `Var` (the probe) to the
//! activation: the probe's gradient is the activation's gradient.

use candle_core::{Result, Tensor, Var};

#[derive(Default)]
pub struct Taps {
    record: bool,
    probe_at: Option<String>,
    pub recorded: Vec<(String, Tensor)>,
    /// The tapped activation and its probe, once the forward pass reached the point.
    pub probe: Option<(Tensor, Var)>,
}

impl Taps {
    pub fn none() -> Taps {
        Taps::default()
    }
    pub fn record() -> Taps {
        Taps {
            record: true,
            ..Taps::default()
        }
    }
    pub fn probe(name: &str) -> Taps {
        Taps {
            probe_at: Some(name.to_owned()),
            ..Taps::default()
        }
    }

    /// Passes `t` through, recording or probing it if `name` is asked for.
    pub fn point(&mut self, name: &str, t: Tensor) -> Result<Tensor> {
        if self.record {
            self.recorded.push((name.to_owned(), t.clone()));
        }
        if self.probe_at.as_deref() == Some(name) {
            let probe = Var::zeros(t.shape(), t.dtype(), t.device())?;
            let out = t.broadcast_add(probe.as_tensor())?;
            self.probe = Some((t, probe));
            return Ok(out);
        }
        Ok(t)
    }

    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.recorded
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, t)| t)
    }
}
