//! Reading golden fixtures (`<name>.json` + `<name>.safetensors`) and comparing tensors with each
//! fixture's own tolerance. The folder comes from `PRETEXT_FIXTURES` (default `tests/fixtures`,
//! a copy of the reference set), so the same tests run against fixture sets of other shapes.

use candle_core::{DType, Device, Tensor};
use serde_json::Value;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

pub struct Fixture {
    pub name: String,
    pub json: Value,
    pub tensors: HashMap<String, Tensor>,
    pub dir: PathBuf,
}

pub fn dir() -> PathBuf {
    std::env::var_os("PRETEXT_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures"))
}

pub fn all() -> Vec<(String, Value)> {
    let dir = dir();
    let mut out: Vec<(String, Value)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| {
            panic!(
                "fixture folder {}: {e} (set PRETEXT_FIXTURES)",
                dir.display()
            )
        })
        .filter_map(|e| {
            let p = e.ok()?.path();
            (p.extension()? == "json").then(|| {
                let v: Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
                (p.file_stem().unwrap().to_string_lossy().into_owned(), v)
            })
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// The fixtures whose `reference_module` contains `needle`, loaded.
pub fn of_kind(needle: &str) -> Vec<Fixture> {
    all()
        .into_iter()
        .filter(|(_, j)| {
            j["reference_module"]
                .as_str()
                .is_some_and(|m| m.contains(needle))
        })
        .map(|(name, json)| load(&name, json))
        .collect()
}

pub fn load(name: &str, json: Value) -> Fixture {
    let dir = dir();
    let file = dir.join(
        json["safetensors_file"]
            .as_str()
            .map_or(format!("{name}.safetensors"), str::to_owned),
    );
    let tensors = candle_core::safetensors::load(&file, &Device::Cpu)
        .unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    Fixture {
        name: name.to_owned(),
        json,
        tensors,
        dir,
    }
}

impl Fixture {
    pub fn t(&self, key: &str) -> Tensor {
        self.tensors
            .get(key)
            .unwrap_or_else(|| panic!("{}: no tensor `{key}`", self.name))
            .clone()
    }
    pub fn weights(&self) -> HashMap<String, Tensor> {
        self.tensors
            .iter()
            .filter(|(k, _)| !k.starts_with("input.") && !k.starts_with("expected."))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }
    pub fn tol(&self) -> (f64, f64) {
        let t = &self.json["tolerance"];
        (
            t["atol"].as_f64().unwrap_or(1e-5),
            t["rtol"].as_f64().unwrap_or(1e-4),
        )
    }
    pub fn config(&self) -> Value {
        self.json["config"].clone()
    }
    /// Compares with this fixture's tolerance.
    pub fn check(&self, key: &str, actual: &Tensor) {
        let (atol, rtol) = self.tol();
        assert_close(
            &format!("{}: {key}", self.name),
            actual,
            &self.t(key),
            atol,
            rtol,
        );
    }
}

pub fn to_f64(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// numpy `allclose` semantics, NaN matching NaN; panics with the worst element.
pub fn assert_close(what: &str, actual: &Tensor, expected: &Tensor, atol: f64, rtol: f64) {
    assert_eq!(actual.dims(), expected.dims(), "{what}: shape");
    let (a, e) = (to_f64(actual), to_f64(expected));
    let mut worst: Option<(usize, f64)> = None;
    for (i, (x, y)) in a.iter().zip(&e).enumerate() {
        if x.is_nan() && y.is_nan() {
            continue;
        }
        let err = (x - y).abs();
        // Written so that a NaN error counts as outside the tolerance.
        let within = err <= atol + rtol * y.abs();
        if !within && worst.is_none_or(|(_, w)| err > w) {
            worst = Some((i, err));
        }
    }
    if let Some((i, err)) = worst {
        panic!("{what}: element {i}: got {} expected {} (|diff| {err:e}, atol {atol:e}, rtol {rtol:e})", a[i], e[i]);
    }
}
