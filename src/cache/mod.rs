//! The content-addressed cache: stage keys, data fingerprints, the store and its locks, the journal.

pub mod digest;
pub mod fingerprint;
pub mod journal;
pub mod key;
pub mod store;

pub use digest::{FileDigest, Fingerprint, StageKey};
pub use key::{KeyInput, KeyedInput};
pub use store::{Entry, Manifest, Store};
