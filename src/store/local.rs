//! Embedded blob backend: one file per object under `<data_dir>/blobs`. An object is written to
//! a temporary name and renamed, so a reader sees either nothing or the whole object. `put` does
//! not fsync: `sync_prefix` fsyncs every file of a version and its directories once, before the
//! version's metadata commits (one batch of flushes per push instead of one per chunk).

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use bytes::Bytes;

use super::{BlobBody, BlobStore, StoreError};

pub struct LocalBlobs {
    root: PathBuf,
}

impl LocalBlobs {
    pub fn open(root: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(root)?;
        Ok(Self {
            root: root.to_path_buf(),
        })
    }

    /// Maps a key to a path, refusing anything but `[a-z0-9_-]` segments (no traversal).
    fn path(&self, key: &str) -> Result<PathBuf, StoreError> {
        let valid = !key.is_empty()
            && key.split('/').all(|seg| {
                !seg.is_empty()
                    && seg.bytes().all(|b| {
                        b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-'
                    })
            });
        if !valid {
            return Err(StoreError::Corrupt(format!("invalid blob key {key:?}")));
        }
        Ok(self.root.join(key))
    }
}

fn fsync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// Threads that fsync the files of one prefix at once. Concurrent fsyncs let the file system
/// share journal commits and cache flushes between files (ext4 groups the fsyncs that wait on
/// the same journal transaction) instead of paying one commit per file in turn.
const SYNC_THREADS: usize = 8;

/// Runs `sync` on every path from up to `SYNC_THREADS` threads; the first error is returned.
fn fsync_all(
    paths: &[PathBuf],
    sync: impl Fn(&Path) -> std::io::Result<()> + Sync,
) -> std::io::Result<()> {
    let next = std::sync::atomic::AtomicUsize::new(0);
    let threads = SYNC_THREADS.min(paths.len());
    std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| {
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let Some(p) = paths.get(i) else {
                            return Ok(());
                        };
                        sync(p)?;
                    }
                })
            })
            .collect();
        workers.into_iter().try_for_each(|w| {
            w.join()
                .unwrap_or_else(|_| Err(std::io::Error::other("fsync thread panicked")))
        })
    })
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| StoreError::Io(std::io::Error::other(e)))?
}

#[async_trait]
impl BlobStore for LocalBlobs {
    async fn put(&self, key: &str, data: Bytes) -> Result<(), StoreError> {
        let path = self.path(key)?;
        blocking(move || {
            let dir = path.parent().expect("blob path has a parent");
            std::fs::create_dir_all(dir)?;
            let tmp = path.with_extension("tmp");
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&data)?;
            // No fsync here: the object is not referenced until `sync_prefix` has made it durable.
            std::fs::rename(&tmp, &path)?;
            Ok(())
        })
        .await
    }

    async fn sync_prefix(&self, prefix: &str) -> Result<(), StoreError> {
        let root = self.root.clone();
        let top = self.path(prefix)?;
        blocking(move || {
            // The data of every object, then the directory entries under the prefix, then the
            // chain of parents up to the root.
            if top.exists() {
                let mut files = Vec::new();
                let mut dirs = Vec::new();
                let mut stack = vec![top.clone()];
                while let Some(dir) = stack.pop() {
                    for entry in std::fs::read_dir(&dir)? {
                        let entry = entry?;
                        if entry.file_type()?.is_dir() {
                            stack.push(entry.path());
                        } else {
                            files.push(entry.path());
                        }
                    }
                    dirs.push(dir);
                }
                fsync_all(&files, |f| std::fs::File::open(f)?.sync_all())?;
                fsync_all(&dirs, fsync_dir)?;
            }
            let mut dir = top.parent().map(Path::to_path_buf);
            while let Some(d) = dir {
                fsync_dir(&d)?;
                if d == root {
                    break;
                }
                dir = d.parent().map(Path::to_path_buf);
            }
            Ok(())
        })
        .await
    }

    async fn get(&self, key: &str) -> Result<Bytes, StoreError> {
        let path = self.path(key)?;
        let opened = blocking(move || {
            let f = std::fs::File::open(&path)?;
            let len = f.metadata()?.len();
            Ok((f, len))
        })
        .await;
        let (f, len) = match opened {
            Err(StoreError::Io(e)) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(StoreError::NotFound);
            }
            other => other?,
        };
        // The buffer is allocated here, on the async worker, and only filled on the blocking
        // pool: multi-MiB chunk buffers then come from the workers' few malloc arenas instead of
        // one arena per blocking thread, each keeping freed chunks resident (docs/performance.md).
        let cap = usize::try_from(len)
            .map_err(|_| StoreError::Corrupt(format!("blob of {len} bytes")))?;
        let buf = Vec::with_capacity(cap);
        let buf = blocking(move || {
            let mut buf = buf;
            let mut f = f;
            f.read_to_end(&mut buf)?;
            Ok(buf)
        })
        .await?;
        Ok(Bytes::from(buf))
    }

    async fn open(&self, key: &str) -> Result<BlobBody, StoreError> {
        let path = self.path(key)?;
        // Opened right here on the async worker, like the read that follows it (wire.rs): an
        // open and a stat of a recently used file take microseconds, far less than the two
        // thread hand-offs of the blocking pool, which cost more CPU per chunk than the open.
        let opened = std::fs::File::open(&path).and_then(|file| {
            let len = file.metadata()?.len();
            // Ask the kernel to start reading the object into the page cache now, so that the
            // sender's synchronous read (src/server/wire.rs) finds it there. Advice only: a
            // refusal changes nothing but speed.
            let _ = rustix::fs::fadvise(&file, 0, None, rustix::fs::Advice::WillNeed);
            Ok(BlobBody::File { file, len })
        });
        match opened {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(StoreError::NotFound),
            other => Ok(other?),
        }
    }

    async fn delete_prefix(&self, prefix: &str) -> Result<(), StoreError> {
        let path = self.path(prefix)?;
        blocking(move || match std::fs::remove_dir_all(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e.into()),
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn put_get_delete() {
        let dir = tempfile::tempdir().unwrap();
        let b = LocalBlobs::open(dir.path()).unwrap();
        b.put("v/ab/01/0", Bytes::from_static(b"hello"))
            .await
            .unwrap();
        b.sync_prefix("v/ab").await.unwrap();
        assert_eq!(&b.get("v/ab/01/0").await.unwrap()[..], b"hello");
        assert!(matches!(
            b.get("v/ab/01/1").await,
            Err(StoreError::NotFound)
        ));
        b.delete_prefix("v/ab").await.unwrap();
        assert!(matches!(
            b.get("v/ab/01/0").await,
            Err(StoreError::NotFound)
        ));
    }

    #[tokio::test]
    async fn rejects_traversal() {
        let dir = tempfile::tempdir().unwrap();
        let b = LocalBlobs::open(dir.path()).unwrap();
        for key in ["../x", "a//b", "A", "a/./b", ""] {
            assert!(b.get(key).await.is_err(), "{key}");
        }
    }
}
