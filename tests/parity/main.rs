//! Parity with the PyTorch reference code: every model, optimiser, schedule table, metric and
//! Grad-CAM stage pretext uses is checked against golden outputs of timm, torchvision, the
//! official MAE, torch's AdamW, pytorch-grad-cam and sklearn. Models are built from each
//! fixture's JSON config, never from constants.

mod fixture;
mod models;
mod training;

#[test]
fn every_fixture_is_recognised() {
    const KNOWN: &[&str] = &[
        "VisionTransformer",
        "MaskedAutoencoderViT",
        "resnet.ResNet",
        "DenseNet",
        "AdamW",
        "param_groups_lrd",
        "GradCAM",
        "sklearn",
        "get_2d_sincos_pos_embed",
    ];
    let all = fixture::all();
    assert!(
        !all.is_empty(),
        "no fixtures in {}",
        fixture::dir().display()
    );
    for (name, json) in all {
        let module = json["reference_module"].as_str().unwrap_or("");
        assert!(
            KNOWN.iter().any(|k| module.contains(k)),
            "fixture `{name}` ({module}) is not checked by any parity test"
        );
    }
}
