use crate::fixture::{assert_close, of_kind, Fixture};
use candle_core::{DType, Device, Tensor};
use pretext::nn::densenet::{DenseNet, DenseNetConfig};
use pretext::nn::gradcam::{grad_cam, CamMethod};
use pretext::nn::mae::{Mae, MaeConfig};
use pretext::nn::params::ParamStore;
use pretext::nn::pos_embed::sincos_2d_tensor;
use pretext::nn::resnet::{ResNet, ResNetConfig};
use pretext::nn::tap::Taps;
use pretext::nn::vit::{Vit, VitConfig};
use serde_json::Value;

fn with_in_chans(mut config: Value, x: &Tensor) -> Value {
    config["in_chans"] = Value::from(x.dim(1).unwrap());
    config
}

fn build_vit(f: &Fixture, config: Value) -> (Vit, ParamStore) {
    let cfg: VitConfig = serde_json::from_value(config).expect("ViT config");
    let params = ParamStore::new();
    let vit = Vit::new(&cfg, params.var_builder(&Device::Cpu)).unwrap();
    let report = params.load_tensors(&f.weights(), |_| false).unwrap();
    assert!(
        report.is_clean() && report.unexpected.is_empty(),
        "{}: {}",
        f.name,
        report.describe()
    );
    (vit, params)
}

fn build_resnet(f: &Fixture, config: Value) -> (ResNet, ParamStore) {
    let cfg: ResNetConfig = serde_json::from_value(config).expect("ResNet config");
    let params = ParamStore::new();
    let net = ResNet::new(&cfg, params.var_builder(&Device::Cpu)).unwrap();
    let report = params
        .load_tensors(&f.weights(), |k| k.ends_with("num_batches_tracked"))
        .unwrap();
    assert!(
        report.is_clean() && report.unexpected.is_empty(),
        "{}: {}",
        f.name,
        report.describe()
    );
    (net, params)
}

#[test]
fn vit_matches_timm() {
    let fixtures = of_kind("timm.models.vision_transformer");
    assert!(!fixtures.is_empty());
    for f in fixtures {
        let x = f.t("input.x");
        let (vit, _) = build_vit(&f, f.config());
        let mut taps = Taps::record();
        let out = vit.forward_t(&x, None, &mut taps).unwrap();
        f.check("expected.logits", out.logits.as_ref().unwrap());
        f.check("expected.pre_logits", &out.pre_logits);
        f.check("expected.pooled", &out.pooled);
        f.check("expected.features", &out.features);
        let depth = vit.depth();
        f.check(
            "expected.block_tokens",
            taps.get(&format!("blocks.{}", depth - 1)).unwrap(),
        );
        for key in f
            .tensors
            .keys()
            .filter(|k| k.starts_with("expected.intermediate."))
        {
            let point = key.trim_start_matches("expected.intermediate.");
            f.check(
                key,
                taps.get(point)
                    .unwrap_or_else(|| panic!("no tap `{point}`")),
            );
        }
    }
}

#[test]
fn resnet_matches_torchvision() {
    let fixtures = of_kind("torchvision.models.resnet");
    assert!(!fixtures.is_empty());
    for f in fixtures {
        let x = f.t("input.x");
        let (net, _) = build_resnet(&f, with_in_chans(f.config(), &x));
        let mut taps = Taps::record();
        let out = net.forward_t(&x, false, &mut taps).unwrap();
        f.check("expected.logits", out.logits.as_ref().unwrap());
        f.check("expected.layer4", &out.features);
        f.check("expected.pooled", &out.pooled);
        for key in f
            .tensors
            .keys()
            .filter(|k| k.starts_with("expected.intermediate."))
        {
            f.check(
                key,
                taps.get(key.trim_start_matches("expected.intermediate."))
                    .unwrap(),
            );
        }
    }
}

#[test]
fn densenet_matches_torchvision() {
    let fixtures = of_kind("DenseNet");
    assert!(!fixtures.is_empty());
    for f in fixtures {
        let x = f.t("input.x");
        let cfg: DenseNetConfig =
            serde_json::from_value(with_in_chans(f.config(), &x)).expect("DenseNet config");
        let params = ParamStore::new();
        let net = DenseNet::new(&cfg, params.var_builder(&Device::Cpu)).unwrap();
        let report = params
            .load_tensors(&f.weights(), |k| k.ends_with("num_batches_tracked"))
            .unwrap();
        assert!(
            report.is_clean() && report.unexpected.is_empty(),
            "{}",
            report.describe()
        );
        let mut taps = Taps::record();
        let out = net.forward_t(&x, false, &mut taps).unwrap();
        f.check("expected.logits", out.logits.as_ref().unwrap());
        f.check("expected.features", &out.features);
        f.check("expected.pooled", &out.pooled);
        for key in f
            .tensors
            .keys()
            .filter(|k| k.starts_with("expected.intermediate."))
        {
            f.check(
                key,
                taps.get(key.trim_start_matches("expected.intermediate."))
                    .unwrap(),
            );
        }
    }
}

#[test]
fn mae_matches_reference_including_gradients() {
    let fixtures = of_kind("MaskedAutoencoderViT");
    assert!(!fixtures.is_empty());
    for f in fixtures {
        let mut config = f.config();
        let obj = config.as_object_mut().unwrap();
        assert_eq!(
            obj.remove("norm_layer_eps")
                .and_then(|v| v.as_f64())
                .unwrap_or(1e-6),
            1e-6,
            "only LayerNorm eps 1e-6 is built"
        );
        obj.remove("norm_layer");
        let cfg: MaeConfig = serde_json::from_value(config).expect("MAE config");
        let params = ParamStore::new();
        let mae = Mae::new(&cfg, params.var_builder(&Device::Cpu)).unwrap();
        let report = params
            .load_tensors(&f.weights(), |k| {
                k == "pos_embed" || k == "decoder_pos_embed"
            })
            .unwrap();
        assert!(
            report.is_clean() && report.unexpected.is_empty(),
            "{}",
            report.describe()
        );
        // The fixed position embeddings are computed, and must equal the stored ones.
        let (atol, rtol) = f.tol();
        assert_close(
            "pos_embed",
            &sincos_2d_tensor(cfg.embed_dim, cfg.grid(), true, &Device::Cpu).unwrap(),
            &f.t("pos_embed"),
            atol,
            rtol,
        );
        assert_close(
            "decoder_pos_embed",
            &sincos_2d_tensor(cfg.decoder_embed_dim, cfg.grid(), true, &Device::Cpu).unwrap(),
            &f.t("decoder_pos_embed"),
            atol,
            rtol,
        );

        let imgs = f.t("input.imgs");
        let noise: Vec<f32> = f.t("input.noise").flatten_all().unwrap().to_vec1().unwrap();
        let ratio = f.json["mask_ratio"].as_f64().expect("mask_ratio");
        let out = mae.forward(&imgs, &noise, ratio).unwrap();
        f.check("expected.loss", &out.loss);
        f.check("expected.pred", &out.pred);
        f.check("expected.mask", &out.mask);
        f.check("expected.latent", &out.latent);
        f.check("expected.target", &out.target);
        f.check("expected.pred_imgs", &mae.unpatchify(&out.pred).unwrap());
        let ids = |rows: &Vec<Vec<u32>>| {
            let flat: Vec<i64> = rows.iter().flatten().map(|&v| v as i64).collect();
            Tensor::from_vec(flat, (rows.len(), rows[0].len()), &Device::Cpu).unwrap()
        };
        f.check("expected.ids_shuffle", &ids(&out.plan.ids_shuffle));
        f.check("expected.ids_restore", &ids(&out.plan.ids_restore));

        let grads = out.loss.backward().unwrap();
        let grad_tol = &f.json["tolerance"]["gradients"];
        let rtol = grad_tol["rtol"].as_f64().unwrap_or(1e-4);
        let scale = grad_tol["atol_times_tensor_absmax"]
            .as_f64()
            .unwrap_or(1e-4);
        let mut checked = 0;
        for key in f.tensors.keys().filter(|k| k.starts_with("expected.grad.")) {
            let name = key.trim_start_matches("expected.grad.");
            let var = params
                .get(name)
                .unwrap_or_else(|| panic!("no parameter `{name}`"));
            let g = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("`{name}` received no gradient"));
            let expected = f.t(key);
            let absmax = expected
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_dtype(DType::F64)
                .unwrap()
                .to_scalar::<f64>()
                .unwrap();
            assert_close(
                &format!("{}: {key}", f.name),
                g,
                &expected,
                scale * absmax,
                rtol,
            );
            checked += 1;
        }
        let trainable = params.named().len();
        assert_eq!(
            checked, trainable,
            "every trainable MAE parameter has a reference gradient"
        );
    }
}

#[test]
fn pos_embed_matches_mae() {
    for f in of_kind("get_2d_sincos_pos_embed") {
        let (atol, rtol) = f.tol();
        for case in f.config()["cases"].as_array().unwrap() {
            let d = case["embed_dim"].as_u64().unwrap() as usize;
            let g = case["grid_size"].as_u64().unwrap() as usize;
            let cls = case["cls_token"].as_bool().unwrap();
            let got = sincos_2d_tensor(d, g, cls, &Device::Cpu)
                .unwrap()
                .squeeze(0)
                .unwrap();
            assert_close(
                case["key"].as_str().unwrap(),
                &got,
                &f.t(case["key"].as_str().unwrap()),
                atol,
                rtol.max(0.0),
            );
        }
    }
}

#[test]
fn gradcam_matches_pytorch_grad_cam() {
    let fixtures = of_kind("pytorch_grad_cam");
    assert!(!fixtures.is_empty());
    for f in fixtures {
        let model_json: Value = serde_json::from_str(
            &std::fs::read_to_string(f.dir.join(f.json["weights_config_file"].as_str().unwrap()))
                .unwrap(),
        )
        .unwrap();
        let model_fixture = crate::fixture::load(
            f.json["weights_file"]
                .as_str()
                .unwrap()
                .trim_end_matches(".safetensors"),
            model_json.clone(),
        );
        let x = f.t("input.x");
        let targets: Vec<usize> = f
            .t("input.targets")
            .to_vec1::<i64>()
            .unwrap()
            .into_iter()
            .map(|t| t as usize)
            .collect();
        let per_image: Vec<Vec<usize>> = targets.iter().map(|&t| vec![t]).collect();
        let (h, w) = (x.dim(2).unwrap(), x.dim(3).unwrap());
        let layer = f.config()["target_layer"].as_str().unwrap().to_owned();
        let module = model_json["reference_module"].as_str().unwrap();
        let mut logits_seen = None;
        let cam = if module.contains("VisionTransformer") {
            let (vit, _) = build_vit(&model_fixture, model_json["config"].clone());
            assert!(
                layer.ends_with("blocks[-1].norm1"),
                "ViT target layer `{layer}` not supported by this test"
            );
            let tap = format!("blocks.{}.norm1", vit.depth() - 1);
            grad_cam(
                |taps| {
                    let l = vit.forward_t(&x, None, taps)?.logits.unwrap();
                    logits_seen = Some(l.clone());
                    Ok(l)
                },
                &tap,
                &per_image,
                |t| vit.tokens_to_grid(t),
                (h, w),
                CamMethod::GradCam,
            )
            .unwrap()
        } else {
            let (net, _) = build_resnet(
                &model_fixture,
                with_in_chans(model_json["config"].clone(), &x),
            );
            assert!(
                layer == "model.layer4[-1]",
                "CNN target layer `{layer}` not supported by this test"
            );
            // `model.layer4[-1]` is the last block of layer4: tap `layer4.<last>`.
            let last = model_json["config"]["layers"][3].as_u64().unwrap() - 1;
            // Any convolution can be explained too; its map has that layer's resolution.
            let inner = grad_cam(
                |taps| Ok(net.forward_t(&x, false, taps)?.logits.unwrap()),
                "layer3.0.conv1",
                &per_image,
                |t| Ok(t.clone()),
                (h, w),
                CamMethod::GradCam,
            )
            .unwrap();
            assert_eq!(inner.low_hw, (h / 16, w / 16));
            grad_cam(
                |taps| {
                    let l = net.forward_t(&x, false, taps)?.logits.unwrap();
                    logits_seen = Some(l.clone());
                    Ok(l)
                },
                &format!("layer4.{last}"),
                &per_image,
                |t| Ok(t.clone()),
                (h, w),
                CamMethod::GradCam,
            )
            .unwrap()
        };
        f.check("expected.logits", logits_seen.as_ref().unwrap());
        f.check("expected.activations", &cam.activations);
        f.check("expected.gradients", &cam.gradients);
        let n = targets.len();
        let to_t = |rows: &Vec<Vec<f32>>, shape: &[usize]| {
            Tensor::from_vec(
                rows.iter().flatten().copied().collect::<Vec<f32>>(),
                shape,
                &Device::Cpu,
            )
            .unwrap()
        };
        let (lh, lw) = cam.low_hw;
        f.check(
            "expected.cam_weights",
            &to_t(&cam.weights, &[n, cam.weights[0].len()]),
        );
        f.check("expected.cam_raw", &to_t(&cam.raw, &[n, lh, lw]));
        // Min-max scaling amplifies upstream float error; the fixture documents atol 1e-4 here.
        let (_, rtol) = f.tol();
        for (key, rows, shape) in [
            (
                "expected.cam_lowres_scaled",
                &cam.lowres_scaled,
                vec![n, lh, lw],
            ),
            ("expected.cam_resized", &cam.resized, vec![n, h, w]),
            ("expected.grayscale_cam", &cam.grayscale, vec![n, h, w]),
        ] {
            assert_close(
                &format!("{}: {key}", f.name),
                &to_t(rows, &shape),
                &f.t(key),
                1e-4,
                rtol,
            );
        }
    }
}

/// What pretext writes for a model (`ParamStore::save_safetensors`, the file behind every
/// `model.safetensors` and `encoder.safetensors`) has exactly the keys and shapes of the
/// reference's `state_dict()` for the same constructor, as each fixture lists them: a strict
/// `load_state_dict` in timm or torchvision cannot fail on a missing or extra key.
#[test]
fn exported_weights_have_the_reference_state_dict_keys_and_shapes() {
    type Build = fn(&Value, &ParamStore);
    let cases: [(&str, Build); 3] = [
        ("timm.models.vision_transformer", |c, p| {
            let cfg: VitConfig = serde_json::from_value(c.clone()).unwrap();
            Vit::new(&cfg, p.var_builder(&Device::Cpu)).unwrap();
        }),
        ("torchvision.models.resnet", |c, p| {
            let cfg: ResNetConfig = serde_json::from_value(c.clone()).unwrap();
            ResNet::new(&cfg, p.var_builder(&Device::Cpu)).unwrap();
        }),
        ("DenseNet", |c, p| {
            let cfg: DenseNetConfig = serde_json::from_value(c.clone()).unwrap();
            DenseNet::new(&cfg, p.var_builder(&Device::Cpu)).unwrap();
        }),
    ];
    let dir = tempfile::tempdir().unwrap();
    for (module, build) in cases {
        let fixtures = of_kind(module);
        assert!(!fixtures.is_empty(), "{module}");
        for f in fixtures {
            let x = f.t("input.x");
            let params = ParamStore::new();
            build(&with_in_chans(f.config(), &x), &params);
            let file = dir.path().join(format!("{}.safetensors", f.name));
            params.save_safetensors(&file, |_| true).unwrap();
            let written = candle_core::safetensors::load(&file, &Device::Cpu).unwrap();
            let ours: std::collections::BTreeMap<String, Vec<usize>> = written
                .iter()
                .map(|(k, t)| (k.clone(), t.dims().to_vec()))
                .collect();
            let theirs: std::collections::BTreeMap<String, Vec<usize>> = f.json["weights"]
                .as_object()
                .unwrap()
                .iter()
                .map(|(k, v)| {
                    let shape = v["shape"].as_array().unwrap();
                    (
                        k.clone(),
                        shape.iter().map(|d| d.as_u64().unwrap() as usize).collect(),
                    )
                })
                .collect();
            assert_eq!(
                ours, theirs,
                "{}: keys and shapes of the state_dict",
                f.name
            );
            if let Some(t) = written
                .iter()
                .find(|(k, _)| k.ends_with("num_batches_tracked"))
            {
                assert_eq!(t.1.dtype(), DType::I64, "torch's buffer is int64");
            }
        }
    }
}
