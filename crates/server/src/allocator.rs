//! The process allocator: mimalloc, asked through its plain entry points whenever the alignment
//! asked for is one every mimalloc block has anyway.
//!
//! `mimalloc::MiMalloc` sends every allocation to `mi_malloc_aligned`. In mimalloc 3 that call
//! takes a slower, generic path whenever the size class's page has no free block at hand (and
//! for sizes that are not a power of two it then over-allocates): callgrind counted about 6 of a
//! forward-auth request's 27 allocations there, some 700 instructions a request. `mi_malloc`
//! has no such detour. (The same change is proposed upstream in mimalloc_rust#170.)

use libmimalloc_sys::{mi_free, mi_malloc, mi_realloc, mi_zalloc};
use std::alloc::{GlobalAlloc, Layout};
use std::ffi::c_void;

/// Every mimalloc block is aligned to at least a machine word: its size classes are whole words.
const WORD_ALIGNED: usize = std::mem::size_of::<usize>();

pub struct Allocator;

fn plain(align: usize) -> bool {
    align <= WORD_ALIGNED
}

// SAFETY: each method forwards to mimalloc, which upholds `GlobalAlloc`'s contract for the
// layouts sent to it: the plain entry points only when the alignment asked for is at most the
// word alignment every block has; `MiMalloc` (the aligned ones) otherwise. Blocks from either are
// freed by `mi_free`, as `MiMalloc::dealloc` does.
unsafe impl GlobalAlloc for Allocator {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if plain(layout.align()) {
            unsafe { mi_malloc(layout.size()).cast() }
        } else {
            unsafe { mimalloc::MiMalloc.alloc(layout) }
        }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if plain(layout.align()) {
            unsafe { mi_zalloc(layout.size()).cast() }
        } else {
            unsafe { mimalloc::MiMalloc.alloc_zeroed(layout) }
        }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        unsafe { mi_free(ptr.cast::<c_void>()) }
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if plain(layout.align()) {
            unsafe { mi_realloc(ptr.cast::<c_void>(), new_size).cast() }
        } else {
            unsafe { mimalloc::MiMalloc.realloc(ptr, layout, new_size) }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_have_the_alignment_asked_for_and_keep_their_bytes_through_realloc() {
        for align in [1, 2, 4, 8, 16, 32, 64, 4096] {
            for size in [1, 3, 8, 12, 24, 40, 100, 1000, 70_000] {
                let layout = Layout::from_size_align(size, align).unwrap();
                unsafe {
                    let zeroed = Allocator.alloc_zeroed(layout);
                    assert!(!zeroed.is_null());
                    assert_eq!(zeroed as usize % align, 0, "size {size}, align {align}");
                    assert!(std::slice::from_raw_parts(zeroed, size)
                        .iter()
                        .all(|b| *b == 0));
                    Allocator.dealloc(zeroed, layout);
                    let block = Allocator.alloc(layout);
                    assert_eq!(block as usize % align, 0, "size {size}, align {align}");
                    std::ptr::write_bytes(block, 0xA5, size);
                    let grown = Allocator.realloc(block, layout, size * 3);
                    assert_eq!(grown as usize % align, 0, "size {size}, align {align}");
                    assert!(std::slice::from_raw_parts(grown, size)
                        .iter()
                        .all(|b| *b == 0xA5));
                    Allocator.dealloc(grown, Layout::from_size_align(size * 3, align).unwrap());
                }
            }
        }
    }
}
