//! The data layer: dataset sources, decoding with a decoded-tensor cache, augmentation and a
//! parallel prefetching loader. Nothing here knows about models or YAML.

pub mod augment;
pub mod dataset;
pub mod decode;
pub mod dicom;
pub mod formats;
pub mod inspect;
pub mod loader;
pub mod source;
pub mod table;
