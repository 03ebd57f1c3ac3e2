//! The agent's allocator: dlmalloc, except in a child that shares the agent's memory.
//!
//! A container's init and an exec'd process start as `CLONE_VM` children of the agent (see
//! `container::spawn`): until their execve they run in the agent's memory, and whatever they
//! allocate comes from the agent's heap. dlmalloc guards its heap with one lock; a child killed
//! while it holds that lock (SIGKILL from a process of the container it is joining, which a
//! tenant controls) would leave it held, and the agent's next allocation would wait forever.
//! So a child allocates from an arena of its own instead: the spawning thread takes a slot of
//! a reserved region before the clone ([`ChildArena::enter`]), the child (which runs on that
//! thread's thread-local storage) finds it there, bumps a pointer through it and frees
//! nothing, and the thread gives the slot back once the child has execed or died. No lock is
//! ever held by a child. Slots are reused, so their pages stay faulted in: a guest whose kernel
//! is emulated pays for each page fault.
//!
//! In the agent's threads the arena is unset and every call goes to dlmalloc.

use std::alloc::{GlobalAlloc, Layout};
use std::cell::Cell;
use std::sync::atomic::{AtomicPtr, AtomicU64, AtomicUsize, Ordering};

/// How many children may be between clone and execve at once with an arena each (more fall
/// back to the agent's heap).
pub const ARENA_SLOTS: usize = 64;
/// What one child may allocate before its execve (its set-up needs tens of KiB).
pub const ARENA_SLOT_BYTES: usize = 1 << 20;

/// The agent's global allocator (`#[global_allocator]` in its `main`).
#[derive(Debug)]
pub struct AgentAllocator;

/// The least alignment of what a child gets (malloc's on x86-64).
const MIN_ALIGN: usize = 16;

/// The arena of a child being set up, in the thread-local storage it shares with the thread
/// that cloned it (null everywhere else).
#[derive(Debug)]
struct Arena {
    start: usize,
    end: usize,
    next: Cell<usize>,
}

thread_local! {
    static CHILD_ARENA: Cell<*const Arena> = const { Cell::new(std::ptr::null()) };
}

/// The reserved region of all slots (mapped at the first spawn, never unmapped) and which slots
/// are taken (one bit each).
static REGION: AtomicPtr<u8> = AtomicPtr::new(std::ptr::null_mut());
static TAKEN: AtomicU64 = AtomicU64::new(0);
/// Allocations of children that found their arena full (they came from the heap).
static EXHAUSTED: AtomicUsize = AtomicUsize::new(0);

impl Arena {
    /// A pointer for `layout`, or null when the arena is full. Aligned to at least
    /// [`MIN_ALIGN`], as malloc's are: code in the field casts byte buffers to structures
    /// (nix's `sendmsg` its control-message buffer, a `Vec<u8>`, to `cmsghdr`).
    fn bump(&self, layout: Layout) -> *mut u8 {
        let align = layout.align().max(MIN_ALIGN);
        let Some(at) = self.next.get().checked_next_multiple_of(align) else {
            return std::ptr::null_mut();
        };
        match at.checked_add(layout.size()) {
            Some(end) if end <= self.end => {
                self.next.set(end);
                at as *mut u8
            }
            _ => {
                EXHAUSTED.fetch_add(1, Ordering::Relaxed);
                std::ptr::null_mut()
            }
        }
    }
}

/// Whether `ptr` lies in the arenas' region (memory dlmalloc never gave out).
fn in_region(ptr: *mut u8) -> bool {
    let base = REGION.load(Ordering::Acquire) as usize;
    base != 0 && (base..base + ARENA_SLOTS * ARENA_SLOT_BYTES).contains(&(ptr as usize))
}

// SAFETY: outside a child's arena every call is dlmalloc's. Inside one, memory comes from the
// slot that the spawning thread reserved for that child alone (no other task touches it until
// the child is gone), aligned as asked, never handed out twice; freeing is a no-op.
unsafe impl GlobalAlloc for AgentAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let arena = CHILD_ARENA.with(Cell::get);
        if arena.is_null() {
            // SAFETY: the caller's contract, passed on.
            return unsafe { dlmalloc::GlobalDlmalloc.alloc(layout) };
        }
        // SAFETY: set by `ChildArena::enter` to an arena that lives until its guard drops,
        // which is after the child is gone.
        let ptr = unsafe { &*arena }.bump(layout);
        if ptr.is_null() {
            // A full arena (a set-up that needs more than a megabyte): the heap, as before
            // arenas, rather than an allocation failure, whose abort(3) would signal the agent's
            // thread (the child runs on its thread ID). Never freed (see `dealloc`).
            // SAFETY: the caller's contract, passed on.
            return unsafe { dlmalloc::GlobalDlmalloc.alloc(layout) };
        }
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // A child frees nothing (its arena goes whole); what it drops that the agent allocated
        // (nothing today: it only borrows) stays allocated rather than touch dlmalloc's lock.
        if in_region(ptr) || !CHILD_ARENA.with(Cell::get).is_null() {
            return;
        }
        // SAFETY: the caller's contract: `ptr` came from dlmalloc with `layout`.
        unsafe { dlmalloc::GlobalDlmalloc.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if in_region(ptr) || !CHILD_ARENA.with(Cell::get).is_null() {
            // SAFETY: the caller's contract; a valid layout of `new_size` (GlobalAlloc::realloc).
            let new_layout = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
            // SAFETY: the same contract, for `alloc`.
            let new = unsafe { self.alloc(new_layout) };
            if !new.is_null() {
                // SAFETY: both valid for the smaller size, and distinct allocations.
                unsafe { std::ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size)) };
            }
            return new;
        }
        // SAFETY: the caller's contract, passed on.
        unsafe { dlmalloc::GlobalDlmalloc.realloc(ptr, layout, new_size) }
    }
}

/// A slot of the arenas' region, made the calling thread's child arena until dropped. Take it
/// right before the `CLONE_VM` clone and drop it right after the clone returned: the thread
/// itself must not allocate in between (what it allocated would be in the slot).
#[derive(Debug)]
pub struct ChildArena {
    slot: usize,
    arena: Box<Arena>,
}

impl ChildArena {
    /// Reserves a free slot for the next child of this thread; `None` when the region cannot
    /// be mapped or every slot is taken (the child then allocates from the agent's heap, as
    /// before arenas).
    pub fn enter() -> Option<ChildArena> {
        let base = region()?;
        let slot = take_slot()?;
        let start = base as usize + slot * ARENA_SLOT_BYTES;
        let arena = Box::new(Arena {
            start,
            end: start + ARENA_SLOT_BYTES,
            next: Cell::new(start),
        });
        CHILD_ARENA.with(|c| c.set(&raw const *arena));
        Some(ChildArena { slot, arena })
    }

    /// Bytes the child took from its slot (for the spawn's debug line).
    pub fn used(&self) -> usize {
        self.arena.next.get() - self.arena.start
    }
}

impl Drop for ChildArena {
    fn drop(&mut self) {
        CHILD_ARENA.with(|c| c.set(std::ptr::null()));
        TAKEN.fetch_and(!(1 << self.slot), Ordering::AcqRel);
    }
}

/// Whether this code runs in a container process between its clone and its execve (a child
/// with an arena: it shares the agent's memory and its spawning thread's thread-local storage).
pub fn in_child() -> bool {
    !CHILD_ARENA.with(Cell::get).is_null()
}

/// What [`prepare_child_arenas`] faults in of the first slot: a container's init takes ~18 KiB
/// for its set-up, an exec well under one.
const PREFAULT_BYTES: usize = 64 << 10;

/// Maps the region and touches the first [`PREFAULT_BYTES`] of the first slot, at boot: a VM
/// restored from a template then finds those pages in place, and its first containers' set-up
/// takes no page fault for them (each is emulated kernel work under `kvm_pvm`).
pub fn prepare_child_arenas() {
    let Some(base) = region() else {
        log::warn!("no region for child arenas: container set-ups allocate from the agent's heap");
        return;
    };
    let page = 4096;
    for offset in (0..PREFAULT_BYTES).step_by(page) {
        // SAFETY: within the region's first slot, which no child uses yet at boot (and a write
        // of zero over zero changes nothing a child could see).
        unsafe { base.add(offset).write_volatile(0) };
    }
}

/// How many allocations of children found their arena full since the agent started.
pub fn exhausted_allocations() -> usize {
    EXHAUSTED.load(Ordering::Relaxed)
}

/// The region, mapped on first use (reserved address space: only the pages children touch are
/// ever backed).
fn region() -> Option<*mut u8> {
    let base = REGION.load(Ordering::Acquire);
    if !base.is_null() {
        return Some(base);
    }
    // SAFETY: a new private anonymous mapping; no existing memory is affected.
    let mapped = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            ARENA_SLOTS * ARENA_SLOT_BYTES,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if mapped == libc::MAP_FAILED {
        return None;
    }
    let mapped = mapped.cast::<u8>();
    match REGION.compare_exchange(
        std::ptr::null_mut(),
        mapped,
        Ordering::AcqRel,
        Ordering::Acquire,
    ) {
        Ok(_) => Some(mapped),
        Err(theirs) => {
            // Another thread mapped it first.
            // SAFETY: our own mapping of that size, which nothing uses.
            unsafe { libc::munmap(mapped.cast(), ARENA_SLOTS * ARENA_SLOT_BYTES) };
            Some(theirs)
        }
    }
}

/// Takes the lowest free slot (its pages are the likeliest to be faulted in already).
fn take_slot() -> Option<usize> {
    let mut taken = TAKEN.load(Ordering::Acquire);
    loop {
        let slot = (!taken).trailing_zeros() as usize;
        if slot >= ARENA_SLOTS {
            return None;
        }
        match TAKEN.compare_exchange_weak(
            taken,
            taken | (1 << slot),
            Ordering::AcqRel,
            Ordering::Acquire,
        ) {
            Ok(_) => return Some(slot),
            Err(now) => taken = now,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thread_in_its_child_arena_allocates_there_and_frees_nothing() {
        let a = AgentAllocator;
        let layout = Layout::from_size_align(24, 8).unwrap();
        // SAFETY: plain allocator calls with valid layouts; each pointer is used within its
        // allocation and freed with the layout it was made with.
        unsafe {
            let heap = a.alloc(layout);
            assert!(!heap.is_null() && !in_region(heap));
            let arena = ChildArena::enter().expect("a slot");
            let x = a.alloc(layout);
            assert!(in_region(x), "in the arena");
            let byte = a.alloc(Layout::from_size_align(1, 1).unwrap());
            assert_eq!(byte as usize % 16, 0, "bytes too are aligned as malloc's");
            let big = Layout::from_size_align(100, 64).unwrap();
            let y = a.alloc(big);
            assert_eq!(y as usize % 64, 0, "aligned");
            assert!(y as usize >= x as usize + 24, "not overlapping");
            x.write_bytes(7, 24);
            let z = a.realloc(x, layout, 48);
            assert!(in_region(z) && z != x);
            assert_eq!(*z.add(23), 7, "contents kept");
            a.dealloc(z, Layout::from_size_align(48, 8).unwrap());
            // A block of the heap dropped inside the arena stays allocated (no heap lock).
            a.dealloc(heap, layout);
            let used = arena.used();
            assert!((24 + 100 + 48..4096).contains(&used), "{used}");
            // Too much for a slot: the heap, not memory of the next slot.
            let huge = Layout::from_size_align(ARENA_SLOT_BYTES, 8).unwrap();
            let h = a.alloc(huge);
            assert!(!h.is_null() && !in_region(h));
            assert!(exhausted_allocations() >= 1);
            assert_eq!(arena.used(), used, "the arena is unchanged");
            drop(arena);
            // Outside the arena again: the heap, and arena pointers freed late are ignored.
            let w = a.alloc(layout);
            assert!(!w.is_null() && !in_region(w));
            a.dealloc(y, big);
            a.dealloc(w, layout);
            a.dealloc(h, huge);
        }
    }

    #[test]
    fn slots_are_taken_lowest_first_and_given_back() {
        let first = ChildArena::enter().unwrap();
        // Another thread's arena is its own slot, and unset in this thread afterwards.
        let other = std::thread::spawn(|| {
            let a = ChildArena::enter().unwrap();
            a.slot
        })
        .join()
        .unwrap();
        assert_ne!(first.slot, other);
        assert!(in_child(), "this thread's next child has an arena");
        drop(first);
        assert!(!in_child());
    }
}
