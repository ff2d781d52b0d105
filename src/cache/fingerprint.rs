//! Content fingerprints of data folders and files, with a stat cache.
//!
//! fingerprint = blake3 over the sorted `(relative path, size, blake3 of content)` of every file.
//! Hashing contents is what makes a fingerprint trustworthy; it is also what is slow, so a state
//! file remembers each file's digest under its `(inode, size, mtime)` and an unchanged file is only
//! `stat`ed. Files modified in the last two seconds are not remembered (their mtime could still
//! change within the filesystem's time resolution without the stamp moving: git's "racy" case).

use super::digest::{FileDigest, Fingerprint};
use rayon::prelude::*;
use std::collections::HashMap;
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    inode: u64,
    size: u64,
    mtime_ns: i128,
}

struct FileEntry {
    rel: String,
    abs: PathBuf,
    stamp: Stamp,
}

/// Counts of a fingerprint run, for benchmarks and `--verbose`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct FingerprintStats {
    pub files: usize,
    pub hashed: usize,
    pub bytes_hashed: u64,
}

/// Fingerprints `path` (a folder or a single file). `state_dir` holds the stat cache; the cache
/// it belongs to (its parent folder) is left out of the walk, so an input that contains the cache
/// (`file:.`) does not change each time a stage is published.
pub fn fingerprint(path: &Path, state_dir: &Path) -> io::Result<(Fingerprint, FingerprintStats)> {
    let meta = fs::metadata(path)
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
    let mut files = Vec::new();
    if meta.is_dir() {
        let cache = state_dir
            .parent()
            .and_then(|c| fs::metadata(c).ok())
            .map(|m| (m.dev(), m.ino()));
        let walker = Walker { skip: cache };
        walker.walk(path, "", &[(meta.dev(), meta.ino())], &mut files)?;
    } else {
        files.push(FileEntry {
            rel: String::new(),
            abs: path.to_path_buf(),
            stamp: stamp(&meta),
        });
    }
    files.sort_unstable_by(|a, b| a.rel.cmp(&b.rel));

    let abs_root = path.canonicalize()?;
    let state_file = state_dir.join(format!(
        "{}.state",
        &blake3::hash(abs_root.as_os_str().as_encoded_bytes()).to_hex()[..24]
    ));
    let known = read_state(&state_file);
    let digests: Vec<io::Result<(FileDigest, bool)>> = files
        .par_iter()
        .map(|f| match known.get(&f.rel) {
            Some((s, d)) if *s == f.stamp => Ok((*d, false)),
            _ => hash_file(&f.abs).map(|d| (d, true)),
        })
        .collect();

    let mut hasher = blake3::Hasher::new();
    let mut stats = FingerprintStats {
        files: files.len(),
        ..Default::default()
    };
    let mut fresh = Vec::with_capacity(files.len());
    let racy_after = now_ns() - 2_000_000_000;
    for (f, d) in files.iter().zip(digests) {
        let (digest, hashed) =
            d.map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", f.abs.display())))?;
        if hashed {
            stats.hashed += 1;
            stats.bytes_hashed += f.stamp.size;
        }
        hasher.update(f.rel.as_bytes());
        hasher.update(&[0]);
        hasher.update(&f.stamp.size.to_le_bytes());
        hasher.update(digest.hex().as_bytes());
        if f.stamp.mtime_ns < racy_after {
            fresh.push((f, digest));
        }
    }
    if stats.hashed > 0 || fresh.len() != known.len() {
        // Best effort: a state file that cannot be written only costs re-hashing next time.
        let _ = write_state(&state_file, &fresh);
    }
    Ok((Fingerprint::from_hash(hasher.finalize()), stats))
}

fn stamp(meta: &fs::Metadata) -> Stamp {
    Stamp {
        inode: meta.ino(),
        size: meta.len(),
        mtime_ns: meta.mtime() as i128 * 1_000_000_000 + meta.mtime_nsec() as i128,
    }
}

/// What a fingerprint walk leaves out: the folder with this (device, inode), the cache.
struct Walker {
    skip: Option<(u64, u64)>,
}

impl Walker {
    /// Files under `dir`, following symlinks; `ancestors` are the (device, inode) of the folders
    /// above, so a symlink back up the tree is an error instead of an endless walk.
    fn walk(
        &self,
        dir: &Path,
        prefix: &str,
        ancestors: &[(u64, u64)],
        out: &mut Vec<FileEntry>,
    ) -> io::Result<()> {
        let mut subdirs = Vec::new();
        for entry in fs::read_dir(dir)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", dir.display())))?
        {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let rel = if prefix.is_empty() {
                name
            } else {
                format!("{prefix}/{}", name)
            };
            let mut file_type = entry.file_type()?;
            let abs = entry.path();
            let meta = if file_type.is_symlink() {
                let m = fs::metadata(&abs).map_err(|e| {
                    io::Error::new(
                        e.kind(),
                        format!(
                            "{}: a symlink whose target cannot be read: {e}",
                            abs.display()
                        ),
                    )
                })?;
                file_type = m.file_type();
                m
            } else {
                entry.metadata()?
            };
            if file_type.is_dir() {
                let id = (meta.dev(), meta.ino());
                if Some(id) == self.skip {
                    continue;
                }
                if ancestors.contains(&id) {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!(
                            "{}: a symlink loop (it leads back to a folder above it)",
                            abs.display()
                        ),
                    ));
                }
                subdirs.push((abs, rel, id));
            } else if file_type.is_file() {
                out.push(FileEntry {
                    rel,
                    abs,
                    stamp: stamp(&meta),
                });
            }
        }
        // Sub-folders in parallel: a 100k-file tree is mostly stat calls.
        let nested: Vec<io::Result<Vec<FileEntry>>> = subdirs
            .par_iter()
            .map(|(abs, rel, id)| {
                let mut v = Vec::new();
                let mut chain = ancestors.to_vec();
                chain.push(*id);
                self.walk(abs, rel, &chain, &mut v).map(|_| v)
            })
            .collect();
        for n in nested {
            out.extend(n?);
        }
        Ok(())
    }
}

/// blake3 of a file's content; large files are memory-mapped and hashed on all cores.
pub fn hash_file(path: &Path) -> io::Result<FileDigest> {
    let mut hasher = blake3::Hasher::new();
    if fs::metadata(path)?.len() > 4 << 20 {
        hasher.update_mmap_rayon(path)?;
    } else {
        hasher.update(&fs::read(path)?);
    }
    Ok(FileDigest::from_hash(hasher.finalize()))
}

fn now_ns() -> i128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i128)
}

/// One line per file: `inode size mtime_ns digest<TAB>relative path`.
fn read_state(file: &Path) -> HashMap<String, (Stamp, FileDigest)> {
    let Ok(text) = fs::read_to_string(file) else {
        return HashMap::new();
    };
    let mut out = HashMap::with_capacity(text.len() / 100);
    for line in text.lines() {
        let Some((fields, rel)) = line.split_once('\t') else {
            continue;
        };
        let mut it = fields.split(' ');
        let (Some(i), Some(s), Some(m), Some(d)) = (it.next(), it.next(), it.next(), it.next())
        else {
            continue;
        };
        let (Ok(inode), Ok(size), Ok(mtime_ns), Some(digest)) =
            (i.parse(), s.parse(), m.parse(), FileDigest::parse(d))
        else {
            continue;
        };
        out.insert(
            rel.to_owned(),
            (
                Stamp {
                    inode,
                    size,
                    mtime_ns,
                },
                digest,
            ),
        );
    }
    out
}

fn write_state(file: &Path, entries: &[(&FileEntry, FileDigest)]) -> io::Result<()> {
    let dir = file.parent().expect("state file has a folder");
    fs::create_dir_all(dir)?;
    let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
    {
        let mut w = io::BufWriter::new(tmp.as_file_mut());
        for (f, d) in entries {
            writeln!(
                w,
                "{} {} {} {}\t{}",
                f.stamp.inode,
                f.stamp.size,
                f.stamp.mtime_ns,
                d.hex(),
                f.rel
            )?;
        }
        w.flush()?;
    }
    tmp.persist(file).map_err(|e| e.error)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprint_follows_content_not_stamps() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let data = dir.path().join("data");
        fs::create_dir_all(data.join("sub")).unwrap();
        fs::write(data.join("a.txt"), "alpha").unwrap();
        fs::write(data.join("sub/b.txt"), "beta").unwrap();
        let (first, s1) = fingerprint(&data, &state).unwrap();
        assert_eq!(s1.files, 2);
        let (again, _) = fingerprint(&data, &state).unwrap();
        assert_eq!(first, again);
        fs::write(data.join("sub/b.txt"), "BETA").unwrap();
        let (changed, s3) = fingerprint(&data, &state).unwrap();
        assert_ne!(first, changed);
        assert!(s3.hashed >= 1);
        fs::write(data.join("sub/b.txt"), "beta").unwrap();
        assert_eq!(
            fingerprint(&data, &state).unwrap().0,
            first,
            "reverting content restores the fingerprint"
        );
        fs::rename(data.join("a.txt"), data.join("c.txt")).unwrap();
        assert_ne!(
            fingerprint(&data, &state).unwrap().0,
            first,
            "a rename is a change"
        );
    }

    #[test]
    fn old_files_are_not_rehashed() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        fs::create_dir_all(&data).unwrap();
        let f = data.join("old.bin");
        fs::write(&f, vec![7u8; 1000]).unwrap();
        let old = fs::FileTimes::new()
            .set_modified(SystemTime::now() - std::time::Duration::from_secs(60));
        fs::File::options()
            .write(true)
            .open(&f)
            .unwrap()
            .set_times(old)
            .unwrap();
        let state = dir.path().join("state");
        assert_eq!(fingerprint(&data, &state).unwrap().1.hashed, 1);
        assert_eq!(fingerprint(&data, &state).unwrap().1.hashed, 0);
    }
}
