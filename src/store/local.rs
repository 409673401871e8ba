//! Embedded blob backend: one file per object under `<data_dir>/blobs`. An object is written to
//! a temporary name and renamed, so a reader sees either nothing or the whole object. `put` does
//! not fsync: `sync_prefix` fsyncs every file of a version and its directories once, before the
//! version's metadata commits (one batch of flushes per push instead of one per chunk).
//!
//! Objects are written with `O_DIRECT` where the file system allows it: the data goes through a
//! small aligned staging buffer to the device without passing through the page cache (on file
//! systems that honour the flag: ext4 and xfs do; tmpfs and some others accept it and cache
//! anyway). A push of a model larger than the server's memory then neither evicts everything
//! else from the cache nor leaves gigabytes of dirty pages for the final fsync, and the vault
//! does not copy every byte into page-cache pages (on a virtual machine, pages the guest has not
//! touched recently cost a host fault each; docs/performance.md measures it). A file system that
//! refuses `O_DIRECT` (tmpfs before Linux 6.6, some network and FUSE file systems) gets ordinary
//! buffered writes from then on.

use std::io::{Read, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use async_trait::async_trait;
use bytes::Bytes;

use super::{BlobBody, BlobStore, StoreError};

pub struct LocalBlobs {
    root: PathBuf,
    /// Whether `put` still tries `O_DIRECT` (cleared the first time the file system refuses it).
    direct: Arc<AtomicBool>,
}

impl LocalBlobs {
    pub fn open(root: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(root)?;
        Ok(Self {
            root: root.to_path_buf(),
            direct: Arc::new(AtomicBool::new(true)),
        })
    }

    /// The same store writing through the page cache only (tests compare the two paths).
    #[cfg(test)]
    fn buffered(root: &Path) -> Result<Self, StoreError> {
        let store = Self::open(root)?;
        store.direct.store(false, Ordering::Relaxed);
        Ok(store)
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

/// Alignment of `O_DIRECT` buffers, file offsets and lengths: the largest logical block size in
/// common use (Linux requires the device's logical block size, 512 or 4096 bytes; open(2),
/// "O_DIRECT").
const DIRECT_ALIGN: usize = 4096;

/// Size of an `O_DIRECT` staging buffer: objects are written through it piece by piece, so
/// the memory a write needs does not grow with the chunk size.
const DIRECT_PIECE: usize = 1024 * 1024;

/// Staging buffers kept for the next `O_DIRECT` writes: as many as one push writes at once
/// (`server::admin` has up to 4 chunk writes in flight).
const DIRECT_BUFS_KEPT: usize = 4;
static DIRECT_BUFS: std::sync::Mutex<Vec<Vec<u8>>> = std::sync::Mutex::new(Vec::new());

/// Writes `data` as the new file `tmp` with `O_DIRECT`: piece by piece through an aligned
/// staging buffer (one of [`DIRECT_BUFS`], or a new one), the last piece padded with zeros to
/// a whole block, then the file cut to its length (`set_len`), so it holds exactly `data`.
/// `Ok(false)` when the file system does not take `O_DIRECT` as expected (EINVAL at open or at
/// a write, as when it needs a larger alignment, or a write that stops off a block boundary);
/// the caller then writes the whole object again, buffered.
fn write_direct(tmp: &Path, data: &[u8]) -> std::io::Result<bool> {
    const EINVAL: i32 = rustix::io::Errno::INVAL.raw_os_error();
    let file = match std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(rustix::fs::OFlags::DIRECT.bits() as i32)
        .open(tmp)
    {
        Ok(f) => f,
        Err(e) if e.raw_os_error() == Some(EINVAL) => return Ok(false),
        Err(e) => return Err(e),
    };
    let mut buf = DIRECT_BUFS
        .lock()
        .ok()
        .and_then(|mut bufs| bufs.pop())
        .unwrap_or_else(|| vec![0; DIRECT_PIECE + DIRECT_ALIGN]);
    let written = (|| {
        let skew = buf.as_ptr() as usize % DIRECT_ALIGN;
        let start = (DIRECT_ALIGN - skew) % DIRECT_ALIGN;
        let stage = &mut buf[start..start + DIRECT_PIECE];
        for (i, piece) in data.chunks(DIRECT_PIECE).enumerate() {
            let offset = i * DIRECT_PIECE;
            let padded = piece.len().next_multiple_of(DIRECT_ALIGN);
            stage[..piece.len()].copy_from_slice(piece);
            stage[piece.len()..padded].fill(0);
            let mut done = 0;
            while done < padded {
                match file.write_at(&stage[done..padded], (offset + done) as u64) {
                    Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
                    // A write ending off a block boundary leaves the next one unaligned.
                    Ok(n) if n % DIRECT_ALIGN != 0 => return Ok(false),
                    Ok(n) => done += n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) if e.raw_os_error() == Some(EINVAL) => return Ok(false),
                    Err(e) => return Err(e),
                }
            }
        }
        file.set_len(data.len() as u64)?;
        Ok(true)
    })();
    if let Ok(mut bufs) = DIRECT_BUFS.lock()
        && bufs.len() < DIRECT_BUFS_KEPT
    {
        bufs.push(buf);
    }
    written
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
        let direct = self.direct.clone();
        blocking(move || {
            let dir = path.parent().expect("blob path has a parent");
            std::fs::create_dir_all(dir)?;
            let tmp = path.with_extension("tmp");
            let written = direct.load(Ordering::Relaxed) && write_direct(&tmp, &data)?;
            if !written {
                if direct.swap(false, Ordering::Relaxed) {
                    tracing::info!(dir = %dir.display(), "the blob file system refuses O_DIRECT; writing through the page cache");
                }
                let mut f = std::fs::File::create(&tmp)?;
                f.write_all(&data)?;
            }
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
    async fn direct_and_buffered_writes_store_exactly_the_bytes_at_every_size() {
        let dir = tempfile::tempdir().unwrap();
        let direct = LocalBlobs::open(&dir.path().join("d")).unwrap();
        let buffered = LocalBlobs::buffered(&dir.path().join("b")).unwrap();
        // Around the block size and the staging piece, a whole chunk with its tag, and a smaller
        // object after a larger one (staging buffers are reused: no bytes of an earlier object
        // may follow).
        let sizes = [
            0usize,
            1,
            4095,
            4096,
            4097,
            3 * 4096 + 5,
            DIRECT_PIECE - 1,
            DIRECT_PIECE,
            DIRECT_PIECE + 1,
            (4 << 20) + 16,
            100,
        ];
        for (i, size) in sizes.into_iter().enumerate() {
            let data: Vec<u8> = (0..size).map(|j| (j * 7 + i) as u8).collect();
            let key = format!("v/ab/{i}");
            for store in [&direct, &buffered] {
                store.put(&key, Bytes::from(data.clone())).await.unwrap();
                let path = store.path(&key).unwrap();
                assert_eq!(std::fs::metadata(&path).unwrap().len(), size as u64);
                assert_eq!(store.get(&key).await.unwrap(), data, "size {size}");
                assert!(!path.with_extension("tmp").exists());
            }
        }
        // Whether the temp dir's file system took O_DIRECT (ext4, xfs, btrfs, tmpfs since Linux
        // 6.6 do); the buffered store exercised the other path above either way.
        eprintln!(
            "O_DIRECT in {}: {}",
            dir.path().display(),
            direct.direct.load(Ordering::Relaxed)
        );
        assert!(!buffered.direct.load(Ordering::Relaxed));
    }

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
