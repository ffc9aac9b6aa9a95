//! SHA-256 of running binaries, cached by file identity.
//!
//! The file handed in is `/proc/<pid>/exe` opened by the attestor: the inode the process is
//! running, not whatever now sits at its path. The cache key is (device, inode, size, mtime,
//! ctime), so an in-place modification (which changes mtime/ctime) is hashed again, and a
//! binary replaced by rename keeps its own inode and its own entry.
#![forbid(unsafe_code)]

use std::{
    collections::HashMap,
    fmt,
    fs::File,
    io,
    os::unix::fs::MetadataExt as _,
    str::FromStr,
    sync::{Mutex, PoisonError},
};

use sha2::{Digest as _, Sha256};

/// Errors of hashing.
#[derive(Debug, thiserror::Error)]
pub enum HashError {
    /// The file's metadata could not be read.
    #[error("failed to stat the binary")]
    Stat(#[source] io::Error),
    /// The file is larger than the configured cap (a guard against hashing huge files).
    #[error("binary is {size} bytes, above the {max} byte hashing cap")]
    TooLarge {
        /// The file's size.
        size: u64,
        /// The cap.
        max: u64,
    },
    /// The file could not be read.
    #[error("failed to read the binary")]
    Read(#[source] io::Error),
}

/// A SHA-256 digest; displayed and parsed as 64 lowercase hex digits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Sha256Digest(pub [u8; 32]);

impl fmt::Display for Sha256Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for byte in self.0 {
            write!(f, "{byte:02x}")?;
        }
        Ok(())
    }
}

/// Errors of parsing a hex digest.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum DigestParseError {
    /// Not 64 characters long.
    #[error("a sha256 digest has 64 hex digits, got {0} characters")]
    Length(usize),
    /// A character that is not a lowercase hex digit.
    #[error("character {position} of the sha256 digest is not a lowercase hex digit")]
    Digit {
        /// Zero-based character position.
        position: usize,
    },
}

impl FromStr for Sha256Digest {
    type Err = DigestParseError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        if text.len() != 64 {
            return Err(DigestParseError::Length(text.chars().count()));
        }
        let nibble = |position: usize| {
            let byte = text.as_bytes()[position];
            match byte {
                b'0'..=b'9' => Ok(byte - b'0'),
                b'a'..=b'f' => Ok(byte - b'a' + 10),
                _ => Err(DigestParseError::Digit { position }),
            }
        };
        let mut out = [0u8; 32];
        for (i, byte) in out.iter_mut().enumerate() {
            *byte = (nibble(2 * i)? << 4) | nibble(2 * i + 1)?;
        }
        Ok(Self(out))
    }
}

/// Identity of a file's contents for caching purposes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct FileKey {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

/// Hashes binaries, refusing files above a size cap, and remembers results.
#[derive(Debug)]
pub(crate) struct ExeHasher {
    max_bytes: u64,
    capacity: usize,
    cache: Mutex<HashMap<FileKey, Sha256Digest>>,
}

impl ExeHasher {
    /// A hasher that refuses files above `max_bytes` and keeps at most `capacity` digests.
    #[must_use]
    pub(crate) fn new(max_bytes: u64, capacity: usize) -> Self {
        Self {
            max_bytes,
            capacity: capacity.max(1),
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// The digest of `file`'s contents, from the cache when the file is unchanged.
    pub(crate) fn digest(&self, file: &mut File) -> Result<Sha256Digest, HashError> {
        let meta = file.metadata().map_err(HashError::Stat)?;
        let key = FileKey {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
            ctime: (meta.ctime(), meta.ctime_nsec()),
        };
        if let Some(digest) = self.lock().get(&key) {
            return Ok(*digest);
        }
        if key.size > self.max_bytes {
            return Err(HashError::TooLarge {
                size: key.size,
                max: self.max_bytes,
            });
        }
        let digest = hash_reader(file, self.max_bytes)?;
        let mut cache = self.lock();
        if cache.len() >= self.capacity
            && let Some(victim) = cache.keys().next().copied()
        {
            cache.remove(&victim);
        }
        cache.insert(key, digest);
        Ok(digest)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<FileKey, Sha256Digest>> {
        self.cache.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// SHA-256 of everything `reader` yields, stopping with `TooLarge` past `max_bytes` (the file
/// may grow between the size check and the read).
fn hash_reader(reader: &mut impl io::Read, max_bytes: u64) -> Result<Sha256Digest, HashError> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut total: u64 = 0;
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
            Err(error) => return Err(HashError::Read(error)),
        };
        total += n as u64;
        if total > max_bytes {
            return Err(HashError::TooLarge {
                size: total,
                max: max_bytes,
            });
        }
        hasher.update(&buf[..n]);
    }
    Ok(Sha256Digest(hasher.finalize().into()))
}

#[cfg(test)]
mod tests {
    use std::io::{Seek as _, Write as _};

    use super::{DigestParseError, ExeHasher, HashError, Sha256Digest};

    const EMPTY: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn digest_round_trips_and_rejects_bad_text() {
        let digest: Sha256Digest = EMPTY.parse().unwrap();
        assert_eq!(digest.to_string(), EMPTY);
        assert_eq!(
            "abc".parse::<Sha256Digest>(),
            Err(DigestParseError::Length(3))
        );
        let upper = EMPTY.to_uppercase();
        assert_eq!(
            upper.parse::<Sha256Digest>(),
            Err(DigestParseError::Digit { position: 0 })
        );
    }

    #[test]
    fn hashes_caches_and_rehashes_after_modification() {
        let mut file = tempfile();
        let hasher = ExeHasher::new(1 << 20, 8);
        assert_eq!(hasher.digest(&mut file).unwrap().to_string(), EMPTY);
        file.write_all(b"abc").unwrap();
        file.rewind().unwrap();
        let abc = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        assert_eq!(hasher.digest(&mut file).unwrap().to_string(), abc);
    }

    #[test]
    fn refuses_files_above_the_cap() {
        let mut file = tempfile();
        file.write_all(&[0u8; 100]).unwrap();
        file.rewind().unwrap();
        let hasher = ExeHasher::new(10, 8);
        assert!(matches!(
            hasher.digest(&mut file),
            Err(HashError::TooLarge { size: 100, max: 10 })
        ));
    }

    fn tempfile() -> std::fs::File {
        let path = std::env::temp_dir().join(format!(
            "enforcer-hash-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        std::fs::remove_file(&path).unwrap();
        file
    }
}
