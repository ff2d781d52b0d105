//! Layer-wise learning-rate decay and no-decay sets, as MAE's `param_groups_lrd`: layer id 0 for
//! `cls_token`, `pos_embed`, `patch_embed.*`; `blocks.k.*` -> k+1; everything else -> depth+1.
//! lr_scale = decay^(depth+1 - id); no weight decay for 1-D parameters and the listed names.

#[derive(Debug, Clone, PartialEq)]
pub struct ParamSetting {
    pub name: String,
    pub layer_id: usize,
    pub lr_scale: f64,
    pub weight_decay: f64,
    /// Groups are numbered in order of first appearance, as the reference builds them.
    pub group: usize,
}

/// `num_layers` is depth + 1. `params` are (name, number of dimensions) in model order.
pub fn param_groups_lrd(
    params: &[(String, usize)],
    num_layers: usize,
    weight_decay: f64,
    no_weight_decay: &[&str],
    layer_decay: f64,
) -> Vec<ParamSetting> {
    let mut groups: Vec<(usize, bool)> = Vec::new();
    params
        .iter()
        .map(|(name, ndim)| {
            let no_decay = *ndim == 1 || no_weight_decay.contains(&name.as_str());
            let layer_id = vit_layer_id(name, num_layers);
            let key = (layer_id, no_decay);
            let group = groups.iter().position(|g| *g == key).unwrap_or_else(|| {
                groups.push(key);
                groups.len() - 1
            });
            ParamSetting {
                name: name.clone(),
                layer_id,
                lr_scale: layer_decay.powi((num_layers - layer_id) as i32),
                weight_decay: if no_decay { 0.0 } else { weight_decay },
                group,
            }
        })
        .collect()
}

/// MAE's `get_layer_id_for_vit`.
pub fn vit_layer_id(name: &str, num_layers: usize) -> usize {
    if name == "cls_token" || name == "pos_embed" || name.starts_with("patch_embed") {
        0
    } else if let Some(rest) = name.strip_prefix("blocks.") {
        rest.split('.')
            .next()
            .and_then(|k| k.parse::<usize>().ok())
            .map_or(num_layers, |k| k + 1)
    } else {
        num_layers
    }
}
