//! Memory hygiene for key material: locked pages and no core dumps, without unsafe code here.
//!
//! Every symmetric key of the hierarchy ([`super::secret`]) lives in a heap box whose pages are
//! locked with `mlock` (the `region` crate's safe API), so the kernel never writes it to swap.
//! `mlock` does not nest: unlocking a page unlocks it for every key on it. A process-wide count
//! per page therefore locks a page when its first key arrives and unlocks it when its last key
//! leaves. When the OS refuses (RLIMIT_MEMLOCK too low, or no permission) the key still works and
//! one warning says so: hygiene degrades, the vault does not stop.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};

use zeroize::Zeroize;

/// Locked pages and how many live buffers use each.
struct Pages {
    locked: HashMap<usize, (usize, region::LockGuard)>,
}

fn pages() -> &'static Mutex<Pages> {
    static PAGES: OnceLock<Mutex<Pages>> = OnceLock::new();
    PAGES.get_or_init(|| {
        Mutex::new(Pages {
            locked: HashMap::new(),
        })
    })
}

static WARNED: AtomicBool = AtomicBool::new(false);
static REFUSED: AtomicU64 = AtomicU64::new(0);

/// How many times the OS refused to lock a page since the process started (tests and status).
pub fn lock_refusals() -> u64 {
    REFUSED.load(Ordering::Relaxed)
}

/// Number of pages currently locked for key material.
pub fn locked_pages() -> usize {
    pages().lock().map(|p| p.locked.len()).unwrap_or_default()
}

fn page_range(addr: usize, len: usize) -> std::ops::RangeInclusive<usize> {
    let size = region::page::size();
    let first = addr / size * size;
    let last = (addr + len.max(1) - 1) / size * size;
    first..=last
}

fn register(addr: usize, len: usize) {
    let size = region::page::size();
    let Ok(mut p) = pages().lock() else { return };
    for page in page_range(addr, len).step_by(size) {
        if let Some((n, _)) = p.locked.get_mut(&page) {
            *n += 1;
            continue;
        }
        match region::lock(page as *const u8, size) {
            Ok(guard) => {
                p.locked.insert(page, (1, guard));
            }
            Err(e) => {
                REFUSED.fetch_add(1, Ordering::Relaxed);
                if !WARNED.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        error = %e,
                        "cannot lock key material in memory (raise RLIMIT_MEMLOCK, e.g. LimitMEMLOCK= in the systemd unit); keys may be swapped to disk"
                    );
                }
            }
        }
    }
}

fn unregister(addr: usize, len: usize) {
    let size = region::page::size();
    let Ok(mut p) = pages().lock() else { return };
    for page in page_range(addr, len).step_by(size) {
        if let Some((n, _)) = p.locked.get_mut(&page) {
            *n -= 1;
            if *n == 0 {
                // Dropping the guard unlocks the page.
                p.locked.remove(&page);
            }
        }
    }
}

/// A fixed-size secret buffer on the heap, in locked memory where the OS allows, wiped on drop.
/// No `Debug`, no `Clone`.
pub struct LockedBytes<const N: usize> {
    bytes: Box<[u8; N]>,
}

impl<const N: usize> LockedBytes<N> {
    /// A zeroed buffer, locked before anything secret is written to it.
    pub fn zeroed() -> Self {
        let bytes = Box::new([0u8; N]);
        register(bytes.as_ptr() as usize, N);
        Self { bytes }
    }

    pub fn expose(&self) -> &[u8; N] {
        &self.bytes
    }

    pub fn expose_mut(&mut self) -> &mut [u8; N] {
        &mut self.bytes
    }
}

impl<const N: usize> Drop for LockedBytes<N> {
    fn drop(&mut self) {
        self.bytes.zeroize();
        unregister(self.bytes.as_ptr() as usize, N);
    }
}

/// Turns core dumps off for this process (RLIMIT_CORE = 0, soft and hard), so a crash never writes
/// keys to disk. Returns an error message when the OS refuses; the caller logs it.
pub fn disable_core_dumps() -> Result<(), String> {
    rlimit::setrlimit(rlimit::Resource::CORE, 0, 0).map_err(|e| format!("RLIMIT_CORE: {e}"))?;
    match rlimit::getrlimit(rlimit::Resource::CORE) {
        Ok((0, 0)) => Ok(()),
        Ok((soft, hard)) => Err(format!("RLIMIT_CORE is still {soft}/{hard}")),
        Err(e) => Err(format!("RLIMIT_CORE: {e}")),
    }
}

/// The process-level part of memory hygiene, run once at server start: core dumps off (a
/// warning if refused).
pub fn harden_process() {
    match disable_core_dumps() {
        Ok(()) => tracing::debug!("core dumps disabled (RLIMIT_CORE=0)"),
        Err(e) => tracing::warn!(error = %e, "cannot disable core dumps"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn users_of(page: usize) -> Option<usize> {
        pages().lock().unwrap().locked.get(&page).map(|(n, _)| *n)
    }

    #[test]
    fn pages_are_counted_and_released() {
        // Other tests in this binary lock and unlock key pages concurrently, so this test only
        // looks at a page no one else can use: the interior page of a buffer it holds.
        let size = region::page::size();
        let owned = vec![0u8; 3 * size];
        let page = (owned.as_ptr() as usize).div_ceil(size) * size;
        let refused_before = lock_refusals();
        register(page, 16);
        match users_of(page) {
            // The OS refused (RLIMIT_MEMLOCK): counted as a refusal, nothing to release.
            None => {
                assert!(lock_refusals() > refused_before);
                return;
            }
            Some(n) => assert_eq!(n, 1),
        }
        register(page + 64, 16);
        assert_eq!(users_of(page), Some(2));
        unregister(page, 16);
        assert_eq!(users_of(page), Some(1), "still used by the second buffer");
        unregister(page + 64, 16);
        assert_eq!(users_of(page), None, "released with its last buffer");
        drop(owned);
    }

    #[test]
    fn a_key_buffer_is_locked_while_it_lives() {
        let a = LockedBytes::<32>::zeroed();
        let page = *page_range(a.expose().as_ptr() as usize, 32).start();
        // Either the OS locked the page (counted) or it refused (counted as a refusal).
        assert!(users_of(page).is_some_and(|n| n >= 1) || lock_refusals() > 0);
        drop(a);
    }

    #[test]
    fn a_shared_page_stays_locked_while_one_buffer_lives() {
        // Two buffers on the same page: dropping one must not unlock the other.
        let keep = LockedBytes::<32>::zeroed();
        let page = *page_range(keep.expose().as_ptr() as usize, 32).start();
        for _ in 0..64 {
            let other = LockedBytes::<32>::zeroed();
            drop(other);
        }
        if lock_refusals() == 0 {
            assert!(pages().lock().unwrap().locked.contains_key(&page));
        }
        drop(keep);
    }

    #[test]
    fn core_dumps_can_be_disabled() {
        disable_core_dumps().unwrap();
        assert_eq!(rlimit::getrlimit(rlimit::Resource::CORE).unwrap(), (0, 0));
    }
}
