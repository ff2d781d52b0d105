//! Typed blake3 digests: a stage key cannot be passed where a data fingerprint is expected.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;
use std::marker::PhantomData;

pub trait DigestKind {
    const NAME: &'static str;
}

pub struct Digest<K> {
    bytes: [u8; 32],
    kind: PhantomData<K>,
}

impl<K> Digest<K> {
    pub fn of(bytes: &[u8]) -> Self {
        Self::from_hash(blake3::hash(bytes))
    }
    pub fn from_hash(hash: blake3::Hash) -> Self {
        Digest {
            bytes: *hash.as_bytes(),
            kind: PhantomData,
        }
    }
    pub fn hex(&self) -> String {
        blake3::Hash::from(self.bytes).to_hex().to_string()
    }
    /// 12 hex digits: enough to tell entries apart in listings.
    pub fn short(&self) -> String {
        self.hex()[..12].to_owned()
    }
    pub fn parse(hex: &str) -> Option<Self> {
        blake3::Hash::from_hex(hex).ok().map(Self::from_hash)
    }
}

impl<K> Clone for Digest<K> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<K> Copy for Digest<K> {}
impl<K> PartialEq for Digest<K> {
    fn eq(&self, other: &Self) -> bool {
        self.bytes == other.bytes
    }
}
impl<K> Eq for Digest<K> {}
impl<K> std::hash::Hash for Digest<K> {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.bytes.hash(state)
    }
}
impl<K: DigestKind> fmt::Debug for Digest<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}({})", K::NAME, self.short())
    }
}
impl<K> fmt::Display for Digest<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.hex())
    }
}
impl<K> Serialize for Digest<K> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.hex())
    }
}
impl<'de, K> Deserialize<'de> for Digest<K> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Digest::parse(&s)
            .ok_or_else(|| serde::de::Error::custom(format!("not a blake3 hex digest: {s}")))
    }
}

#[derive(Debug)]
pub enum StageKeyKind {}
impl DigestKind for StageKeyKind {
    const NAME: &'static str = "StageKey";
}
#[derive(Debug)]
pub enum FingerprintKind {}
impl DigestKind for FingerprintKind {
    const NAME: &'static str = "Fingerprint";
}
#[derive(Debug)]
pub enum FileDigestKind {}
impl DigestKind for FileDigestKind {
    const NAME: &'static str = "FileDigest";
}

/// Names a cache entry: the hash of everything that determines a stage's result.
pub type StageKey = Digest<StageKeyKind>;
/// The content of a data folder or file (paths, sizes and file digests).
pub type Fingerprint = Digest<FingerprintKind>;
/// The content of one file.
pub type FileDigest = Digest<FileDigestKind>;
