use crate::fixture::{assert_close, of_kind, to_f64};
use candle_core::{Device, Tensor, Var};
use pretext::nn::params::ParamStore;
use pretext::nn::vit::{Vit, VitConfig};
use pretext::train::lr_decay::param_groups_lrd;
use pretext::train::metrics::{cohen_kappa, roc_auc, roc_auc_per_class, study_level};
use pretext::train::optim::{AdamW, AdamWConfig, ParamGroup};

#[test]
fn adamw_matches_torch() {
    let fixtures = of_kind("torch.optim.AdamW");
    assert!(!fixtures.is_empty());
    for f in fixtures {
        let c = f.config();
        let betas = c["betas"].as_array().unwrap();
        let config = AdamWConfig {
            beta1: betas[0].as_f64().unwrap(),
            beta2: betas[1].as_f64().unwrap(),
            eps: c["eps"].as_f64().unwrap(),
        };
        let count = c["shapes"].as_array().unwrap().len();
        let vars: Vec<Var> = (0..count)
            .map(|i| Var::from_tensor(&f.t(&format!("input.param.{i}"))).unwrap())
            .collect();
        let group = ParamGroup {
            lr_scale: 1.0,
            weight_decay: c["weight_decay"].as_f64().unwrap(),
            params: vars
                .iter()
                .enumerate()
                .map(|(i, v)| (format!("p{i}"), v.clone()))
                .collect(),
        };
        let mut opt = AdamW::new(config, vec![group]);
        let (atol, rtol) = f.tol();
        for step in 1..=2 {
            // sum(p * g) has gradient exactly g.
            let loss = vars
                .iter()
                .enumerate()
                .map(|(i, v)| {
                    (v.as_tensor() * f.t(&format!("input.grad.step{step}.{i}")))
                        .unwrap()
                        .sum_all()
                        .unwrap()
                })
                .reduce(|a, b| (a + b).unwrap())
                .unwrap();
            let grads = loss.backward().unwrap();
            opt.step(&grads, c["lr"].as_f64().unwrap()).unwrap();
            for (i, v) in vars.iter().enumerate() {
                assert_close(
                    &format!("param step{step}.{i}"),
                    v.as_tensor(),
                    &f.t(&format!("expected.param.step{step}.{i}")),
                    atol,
                    rtol,
                );
                let (m, s, _) = &opt.state[&format!("p{i}")];
                assert_close(
                    &format!("exp_avg step{step}.{i}"),
                    m,
                    &f.t(&format!("expected.exp_avg.step{step}.{i}")),
                    atol,
                    rtol,
                );
                assert_close(
                    &format!("exp_avg_sq step{step}.{i}"),
                    s,
                    &f.t(&format!("expected.exp_avg_sq.step{step}.{i}")),
                    atol,
                    rtol,
                );
            }
        }
    }
}

#[test]
fn layer_decay_table_matches_mae() {
    let fixtures = of_kind("param_groups_lrd");
    assert!(!fixtures.is_empty());
    for f in fixtures {
        let cfg: VitConfig = serde_json::from_value(f.json["model_config"].clone()).unwrap();
        let params = ParamStore::new();
        Vit::new(&cfg, params.var_builder(&Device::Cpu)).unwrap();
        let named: Vec<(String, usize)> = params
            .named()
            .into_iter()
            .map(|(n, v)| (n, v.rank()))
            .collect();
        let order: Vec<String> = f.json["param_order"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_owned())
            .collect();
        assert_eq!(
            named.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>(),
            order,
            "parameter order follows timm's named_parameters"
        );
        let c = f.config();
        let no_wd: Vec<&str> = c["no_weight_decay_list"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        let settings = param_groups_lrd(
            &named,
            c["num_layers"].as_u64().unwrap() as usize,
            c["weight_decay"].as_f64().unwrap(),
            &no_wd,
            c["layer_decay"].as_f64().unwrap(),
        );
        for s in &settings {
            let e = &f.json["params"][&s.name];
            assert_eq!(
                s.layer_id as u64,
                e["layer_id"].as_u64().unwrap(),
                "{}",
                s.name
            );
            assert_eq!(
                s.group as u64,
                e["group_index"].as_u64().unwrap(),
                "{}",
                s.name
            );
            assert!(
                (s.lr_scale - e["lr_scale"].as_f64().unwrap()).abs()
                    <= 1e-12 * e["lr_scale"].as_f64().unwrap(),
                "{}",
                s.name
            );
            assert_eq!(
                s.weight_decay,
                e["weight_decay"].as_f64().unwrap(),
                "{}",
                s.name
            );
        }
    }
}

#[test]
fn metrics_match_sklearn() {
    let fixtures = of_kind("sklearn");
    assert!(!fixtures.is_empty());
    for f in fixtures {
        let ev = &f.json["expected_values_float64"];
        let (atol, _) = f.tol();
        let close = |what: &str, got: f64, want: &serde_json::Value| match want.as_f64() {
            Some(w) => assert!((got - w).abs() <= atol, "{what}: {got} vs {w}"),
            None => assert!(got.is_nan(), "{what}: {got} vs undefined"),
        };
        let labels = f.t("input.multilabel.labels");
        let (n, k) = labels.dims2().unwrap();
        let lab = to_f64(&labels);
        let sco = to_f64(&f.t("input.multilabel.scores"));
        let lab_rows: Vec<Vec<bool>> = (0..n)
            .map(|i| (0..k).map(|c| lab[i * k + c] > 0.5).collect())
            .collect();
        let sco_rows: Vec<Vec<f64>> = (0..n).map(|i| sco[i * k..(i + 1) * k].to_vec()).collect();
        let (per, mean) = roc_auc_per_class(&lab_rows, &sco_rows);
        for (c, auc) in per.iter().enumerate() {
            close(
                &format!("auc class {c}"),
                auc.unwrap_or(f64::NAN),
                &ev["multilabel.roc_auc_per_class"][c],
            );
            let truth: Vec<usize> = lab_rows.iter().map(|r| r[c] as usize).collect();
            let pred: Vec<usize> = sco_rows.iter().map(|r| (r[c] >= 0.5) as usize).collect();
            let kappa = cohen_kappa(&truth, &pred, 2);
            close(
                &format!("kappa class {c}"),
                if kappa.is_nan() { 0.0 } else { kappa },
                &ev["multilabel.kappa_per_class"][c],
            );
        }
        close("auc mean", mean.unwrap(), &ev["multilabel.roc_auc_mean"]);

        let bl: Vec<usize> = to_f64(&f.t("input.binary.labels"))
            .iter()
            .map(|&v| v as usize)
            .collect();
        let bp: Vec<usize> = to_f64(&f.t("input.binary.probs"))
            .iter()
            .map(|&p| (p >= 0.5) as usize)
            .collect();
        assert_eq!(
            bp,
            to_f64(&f.t("expected.binary.preds"))
                .iter()
                .map(|&v| v as usize)
                .collect::<Vec<_>>()
        );
        close(
            "binary kappa",
            cohen_kappa(&bl, &bp, 2),
            &ev["binary.kappa"],
        );

        let ids: Vec<i64> = to_f64(&f.t("input.study.study_ids"))
            .iter()
            .map(|&v| v as i64)
            .collect();
        let probs = to_f64(&f.t("input.study.image_probs"));
        let labels: Vec<usize> = to_f64(&f.t("input.study.image_labels"))
            .iter()
            .map(|&v| v as usize)
            .collect();
        let (sid, counts, sprob, slab) = study_level(&ids, &probs, &labels);
        assert_eq!(
            sid,
            to_f64(&f.t("expected.study.ids"))
                .iter()
                .map(|&v| v as i64)
                .collect::<Vec<_>>()
        );
        assert_eq!(
            counts,
            to_f64(&f.t("expected.study.num_images"))
                .iter()
                .map(|&v| v as usize)
                .collect::<Vec<_>>()
        );
        assert_eq!(
            slab,
            to_f64(&f.t("expected.study.labels"))
                .iter()
                .map(|&v| v as usize)
                .collect::<Vec<_>>()
        );
        assert_close(
            "study probs",
            &Tensor::new(sprob.as_slice(), &Device::Cpu).unwrap(),
            &f.t("expected.study.probs"),
            atol,
            1e-6,
        );
        let spred: Vec<usize> = sprob.iter().map(|&p| (p >= 0.5) as usize).collect();
        close(
            "study kappa",
            cohen_kappa(&slab, &spred, 2),
            &ev["study.kappa"],
        );
        let sl: Vec<bool> = slab.iter().map(|&l| l == 1).collect();
        close(
            "study auc",
            roc_auc(&sl, &sprob).unwrap(),
            &ev["study.roc_auc"],
        );
    }
}
