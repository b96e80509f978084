//! The bookkeeping of a device workspace: one block of device memory, sized once (at load, for
//! the largest step), from which a step's temporaries are carved instead of being allocated
//! one by one. Host only and backend independent, so it is tested on any machine; the CUDA
//! backend keeps one [`ArenaBook`] next to its workspace memory.
//!
//! The workspace is a **stack with deferred frees**: each allocation goes on top (aligned to
//! [`ALIGN`] bytes); freeing a block marks it dead, and dead blocks on top are popped, so the
//! space of a block is reused as soon as everything allocated after it is gone too. Model code
//! frees its temporaries roughly in reverse order (Rust drops locals in reverse), so the peak
//! is about one layer's temporaries, not a whole step's. The same sequence of allocations and
//! frees always gives the same offsets, which is what lets a captured CUDA graph replay a step
//! at the addresses it was recorded with.
//!
//! A request that does not fit is refused ([`ArenaBook::alloc`] returns `None`, counted in
//! [`ArenaBook::overflows`]); the backend then allocates that buffer on its own.

/// Every block starts at a multiple of this many bytes (what TMA and vector loads need; the
/// driver's own allocations are aligned at least as much).
pub const ALIGN: usize = 256;

/// `bytes` rounded up to [`ALIGN`] (`None` on overflow).
pub fn aligned(bytes: usize) -> Option<usize> {
    bytes.checked_add(ALIGN - 1).map(|b| b / ALIGN * ALIGN)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Block {
    id: u64,
    offset: usize,
    len: usize,
    live: bool,
}

/// Offsets of the live blocks of a workspace of `capacity` bytes (module docs).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ArenaBook {
    capacity: usize,
    stack: Vec<Block>,
    next_id: u64,
    peak: usize,
    allocs: u64,
    overflows: u64,
}

impl ArenaBook {
    /// An empty workspace of `capacity` bytes (`usize::MAX`: a measuring book that never
    /// refuses, for sizing a workspace by running a step, see [`ArenaBook::peak`]).
    pub fn new(capacity: usize) -> ArenaBook {
        ArenaBook { capacity, ..ArenaBook::default() }
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Bytes from the start to the end of the topmost block (dead blocks below it included).
    pub fn top(&self) -> usize {
        self.stack.last().map_or(0, |b| b.offset + b.len)
    }

    /// Blocks not yet freed.
    pub fn live(&self) -> usize {
        self.stack.iter().filter(|b| b.live).count()
    }

    /// The largest [`ArenaBook::top`] since creation or [`ArenaBook::reset_peak`]: the size a
    /// workspace needs for what ran meanwhile.
    pub fn peak(&self) -> usize {
        self.peak
    }

    /// Starts a new peak measurement from the current top.
    pub fn reset_peak(&mut self) {
        self.peak = self.top();
    }

    /// Allocations served.
    pub fn allocs(&self) -> u64 {
        self.allocs
    }

    /// Allocations refused for lack of room.
    pub fn overflows(&self) -> u64 {
        self.overflows
    }

    /// Reserves `bytes` (rounded up to [`ALIGN`], at least one unit) on top: `(id, offset)`,
    /// or `None` when it would pass the capacity.
    pub fn alloc(&mut self, bytes: usize) -> Option<(u64, usize)> {
        let len = aligned(bytes.max(1))?;
        let offset = self.top();
        match offset.checked_add(len) {
            Some(end) if end <= self.capacity => {
                let id = self.next_id;
                self.next_id += 1;
                self.stack.push(Block { id, offset, len, live: true });
                self.peak = self.peak.max(end);
                self.allocs += 1;
                Some((id, offset))
            }
            _ => {
                self.overflows += 1;
                None
            }
        }
    }

    /// Releases block `id` and pops every released block on top; `false` for an id that is
    /// not live (never given out, or freed already).
    pub fn free(&mut self, id: u64) -> bool {
        let Some(b) = self.stack.iter_mut().rev().find(|b| b.id == id && b.live) else {
            return false;
        };
        b.live = false;
        while self.stack.last().is_some_and(|b| !b.live) {
            self.stack.pop();
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_are_aligned_and_stacked() {
        let mut a = ArenaBook::new(4096);
        let (x, ox) = a.alloc(10).unwrap();
        let (_, oy) = a.alloc(300).unwrap();
        let (_, oz) = a.alloc(0).unwrap();
        assert_eq!((ox, oy, oz), (0, 256, 768));
        assert_eq!((a.top(), a.live(), a.peak()), (1024, 3, 1024));
        assert!(a.free(x));
        assert!(!a.free(x), "a second free of one block");
        assert_eq!(a.top(), 1024, "a hole below live blocks is not reused yet");
    }

    #[test]
    fn freed_tops_are_popped_in_any_order() {
        let mut a = ArenaBook::new(1 << 20);
        let ids: Vec<u64> = (0..4).map(|_| a.alloc(1000).unwrap().0).collect();
        // Free 1 then 3: 3 pops, 2 is live so 1 stays as a hole.
        a.free(ids[1]);
        a.free(ids[3]);
        assert_eq!((a.top(), a.live()), (3 * 1024, 2));
        // Free 2: pops 2 and the hole 1.
        a.free(ids[2]);
        assert_eq!((a.top(), a.live()), (1024, 1));
        // The space is reused at the same offsets: a replayed step sees the same addresses.
        assert_eq!(a.alloc(1000).unwrap().1, 1024);
        a.free(ids[0]);
        assert_eq!(a.live(), 1);
        assert_eq!(a.peak(), 4 * 1024);
    }

    #[test]
    fn full_workspace_refuses_and_counts() {
        let mut a = ArenaBook::new(1024);
        assert!(a.alloc(1024).is_some());
        assert!(a.alloc(1).is_none());
        assert_eq!((a.overflows(), a.allocs()), (1, 1));
        assert!(ArenaBook::new(100).alloc(usize::MAX).is_none(), "no overflow panic");
    }

    #[test]
    fn same_sequence_same_offsets() {
        // What graph replay relies on: a step's allocation sequence, run twice from an empty
        // workspace, gets identical offsets.
        let run = |a: &mut ArenaBook| {
            let mut offs = Vec::new();
            let (x, o) = a.alloc(5000).unwrap();
            offs.push(o);
            for i in 0..5 {
                let (t, o) = a.alloc(100 * (i + 1)).unwrap();
                offs.push(o);
                a.free(t);
            }
            let (y, o) = a.alloc(77).unwrap();
            offs.push(o);
            a.free(x);
            a.free(y);
            offs
        };
        let mut a = ArenaBook::new(1 << 16);
        let first = run(&mut a);
        assert_eq!(a.live(), 0);
        assert_eq!(run(&mut a), first);
    }

    #[test]
    fn measuring_book_sizes_a_workspace() {
        let mut m = ArenaBook::new(usize::MAX);
        let a = m.alloc(3 << 20).unwrap().0;
        let b = m.alloc(1 << 20).unwrap().0;
        m.free(b);
        let c = m.alloc(2 << 20).unwrap().0;
        m.free(c);
        m.free(a);
        assert_eq!(m.peak(), 5 << 20);
        // A workspace of exactly the peak serves the same sequence without a refusal.
        let mut w = ArenaBook::new(m.peak());
        let a = w.alloc(3 << 20).unwrap().0;
        let b = w.alloc(1 << 20).unwrap().0;
        w.free(b);
        assert!(w.alloc(2 << 20).is_some());
        w.free(a);
        assert_eq!(w.overflows(), 0);
    }
}
