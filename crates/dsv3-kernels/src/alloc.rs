//! The allocator of the `dsv3` program (feature `mimalloc`): mimalloc, told to keep the pages
//! it frees.
//!
//! A step allocates buffers of a few MB (a prefill chunk's activations, the expert inputs and
//! outputs) and frees them before the next layer asks for the same sizes again. glibc handed
//! the large ones back to the kernel at once, and the next layer faulted them in and had them
//! zeroed again (a fifth of a long prefill in page faults); mimalloc keeps them, but by
//! default returns them to the system one second after they are freed, so phases of a run
//! still fault them in again. Never returning them measured, on the 32K-vocabulary `small`
//! model, prefill@128 +1-10% and decode +4-20% (three alternating pairs,
//! `MIMALLOC_PURGE_DELAY=-1` against 1000). An inference process's working set is steady, so
//! it keeps them.

pub use mimalloc::MiMalloc;

/// `mi_option_purge_delay`: its position in the C enum of mimalloc (`mimalloc.h`, v2 and v3),
/// which the Rust bindings do not name.
const PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Tells mimalloc never to return freed pages to the system (`purge_delay = -1`). A user's
/// `MIMALLOC_PURGE_DELAY` still wins.
pub fn keep_freed_pages() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_some() {
        return;
    }
    // SAFETY: mi_option_set stores an integer option, for any option number and value; -1 is
    // the documented "never purge" value of purge_delay.
    unsafe { libmimalloc_sys::mi_option_set(PURGE_DELAY, -1) };
}

/// The purge delay mimalloc uses now.
pub fn purge_delay() -> std::ffi::c_long {
    // SAFETY: mi_option_get reads an integer option, for any option number.
    unsafe { libmimalloc_sys::mi_option_get(PURGE_DELAY) }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_purge_delay_is_set() {
        if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
            // 1000 ms is mimalloc 3's default (10 in mimalloc 2): checks the option's position.
            assert!(matches!(super::purge_delay(), 1000 | 10), "purge delay {}", super::purge_delay());
            super::keep_freed_pages();
            assert_eq!(super::purge_delay(), -1);
        }
    }
}
