//! Large float buffers kept after use (the newest few) and handed out again zeroed: a fold allocates an
//! accumulator and a result of the model's size every round, and fresh memory costs a page
//! fault per 4 KiB page (20,000 for an 80 MB accumulator), which on a virtual machine is more
//! than the arithmetic. Fresh buffers ask for transparent huge pages (2 MiB) for the same reason.
use std::sync::Mutex;

/// Buffers smaller than this are left to the allocator.
const MIN_BYTES: usize = 4 << 20;
/// Most bytes and buffers the pool keeps; past them the oldest kept buffers are freed.
const MAX_BYTES: usize = 256 << 20;
const MAX_BUFFERS: usize = 4;
const HUGE_PAGE: usize = 2 << 20;

/// Kept buffers, oldest first in each shelf.
#[derive(Default)]
pub(super) struct Pool {
    f32s: Vec<Vec<f32>>,
    f64s: Vec<Vec<f64>>,
    bytes: usize,
}

impl Pool {
    /// Frees the oldest buffers until `more` bytes and one more buffer fit.
    fn make_room(&mut self, more: usize) {
        while self.bytes + more > MAX_BYTES || self.f32s.len() + self.f64s.len() >= MAX_BUFFERS {
            let freed = if self.f32s.len() >= self.f64s.len() && !self.f32s.is_empty() {
                bytes_of(&self.f32s.remove(0))
            } else if !self.f64s.is_empty() {
                bytes_of(&self.f64s.remove(0))
            } else {
                return;
            };
            self.bytes -= freed;
        }
    }
}

static POOL: Mutex<Pool> = Mutex::new(Pool { f32s: Vec::new(), f64s: Vec::new(), bytes: 0 });

/// The float types the pool keeps.
pub(super) trait Pooled: Copy + Default + Send + 'static {
    fn shelf(pool: &mut Pool) -> &mut Vec<Vec<Self>>;
}

impl Pooled for f32 {
    fn shelf(pool: &mut Pool) -> &mut Vec<Vec<f32>> {
        &mut pool.f32s
    }
}

impl Pooled for f64 {
    fn shelf(pool: &mut Pool) -> &mut Vec<Vec<f64>> {
        &mut pool.f64s
    }
}

fn bytes_of<T>(v: &Vec<T>) -> usize {
    v.capacity() * std::mem::size_of::<T>()
}

/// Keeps a buffer that is no longer used, if it is large and the pool has room.
pub(super) fn recycle(buffer: super::Buffer) {
    match buffer {
        super::Buffer::F32(v) => keep(v),
        super::Buffer::F64(v) => keep(v),
        _ => {}
    }
}

fn keep<T: Pooled>(v: Vec<T>) {
    let bytes = bytes_of(&v);
    if bytes < MIN_BYTES {
        return;
    }
    if bytes > MAX_BYTES {
        return;
    }
    let Ok(mut pool) = POOL.lock() else { return };
    pool.make_room(bytes);
    pool.bytes += bytes;
    T::shelf(&mut pool).push(v);
}

/// `len` zeros: a kept buffer of about that size, zeroed on every core, or fresh memory in huge
/// pages where the kernel grants them.
pub(super) fn zeroed<T: Pooled>(len: usize) -> Vec<T> {
    match kept(len) {
        Some(mut v) => {
            fill_zero(&mut v);
            v
        }
        None => fresh(len),
    }
}

/// `len` elements whose values are whatever a kept buffer last held (or zeros, when none fits):
/// for a result every element of which is written before it is read, which then skips a pass
/// over memory that zeroing would cost.
pub(super) fn leftovers<T: Pooled>(len: usize) -> Vec<T> {
    kept(len).unwrap_or_else(|| fresh(len))
}

/// An empty vector with room for `len` elements: a kept buffer, or a new allocation.
pub(super) fn emptied<T: Pooled>(len: usize) -> Vec<T> {
    match kept(len) {
        Some(mut v) => {
            v.clear();
            v
        }
        None => Vec::with_capacity(len),
    }
}

/// The smallest kept buffer of at least `len` elements that wastes at most half of itself,
/// cut to `len`; None for small sizes, which the allocator serves well.
fn kept<T: Pooled>(len: usize) -> Option<Vec<T>> {
    if len.saturating_mul(std::mem::size_of::<T>()) < MIN_BYTES {
        return None;
    }
    let mut pool = POOL.lock().ok()?;
    let shelf = T::shelf(&mut pool);
    let k = (0..shelf.len())
        .filter(|&k| shelf[k].len() >= len && shelf[k].len() <= 2 * len)
        .min_by_key(|&k| shelf[k].len())?;
    let mut v = shelf.swap_remove(k);
    pool.bytes -= bytes_of(&v);
    v.truncate(len);
    Some(v)
}

/// Zeroed by the allocator (fresh pages, first touched by whoever fills the buffer), in huge
/// pages where the kernel grants them.
fn fresh<T: Pooled>(len: usize) -> Vec<T> {
    let v: Vec<T> = vec![T::default(); len];
    let bytes = len.saturating_mul(std::mem::size_of::<T>());
    if bytes < MIN_BYTES {
        return v;
    }
    let start = v.as_ptr() as usize;
    let aligned = start.next_multiple_of(HUGE_PAGE);
    let end = (start + bytes) / HUGE_PAGE * HUGE_PAGE;
    if end > aligned {
        // SAFETY: the range lies inside the vector's own allocation; madvise only changes how
        // the kernel backs those pages, never their contents. A refusal leaves normal pages.
        unsafe {
            libc::madvise(aligned as *mut libc::c_void, end - aligned, libc::MADV_HUGEPAGE);
        }
    }
    v
}

fn fill_zero<T: Pooled>(v: &mut [T]) {
    super::for_each_part(v, 1 << 16, |_, part| part.fill(T::default()));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kept_buffer_comes_back_as_zeros() {
        let n = (MIN_BYTES / 4) + 1000;
        let mut v: Vec<f32> = zeroed(n);
        v.iter_mut().for_each(|x| *x = 7.0);
        let ptr = v.as_ptr();
        recycle(super::super::Buffer::F32(v));
        let again: Vec<f32> = zeroed(n - 10);
        assert_eq!(again.len(), n - 10);
        assert!(again.iter().all(|x| *x == 0.0));
        // Most likely the same allocation (another test may have taken it first).
        let _ = ptr;
    }

    #[test]
    fn leftovers_are_a_kept_buffer_as_it_was_or_fresh_zeros() {
        let n = (MIN_BYTES / 8) + 1000;
        assert!(leftovers::<f64>(n).iter().all(|x| *x == 0.0), "nothing kept: zeros");
        recycle(super::super::Buffer::F64(vec![3.0; n]));
        let v: Vec<f64> = leftovers(n - 10);
        assert_eq!(v.len(), n - 10);
        // Another test may have taken the kept buffer: then these are fresh zeros.
        assert!(v.iter().all(|x| *x == 3.0) || v.iter().all(|x| *x == 0.0));
    }
}
