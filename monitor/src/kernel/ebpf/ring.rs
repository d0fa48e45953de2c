//! A BPF ring buffer read with its data pages mapped once.
//!
//! aya's `RingBuf` maps the data area twice, back to back, so that a record crossing the end is
//! one slice; both copies count in the agent's RSS (the kernel maps every page at mmap()): with
//! the EVENTS and PROCS rings of a 2-CPU host (2 MiB + 512 KiB) that was 5.1 MB of a 15.6 MB idle
//! agent. Here the data is mapped once, and the rare record that crosses the end is copied.
//! Measured (idle agent, eBPF mode, `grep VmRSS /proc/PID/status`): see docs/bench.md.
//!
//! The layout is the kernel's (kernel/bpf/ringbuf.c): page 0 of the map holds the consumer
//! position (the only page we may write), page 1 the producer position, then the data area of
//! `max_entries` bytes (a power of two). Each record starts 8-aligned with an 8-byte header: a
//! u32 length whose bit 31 says the producer has not committed it yet and bit 30 that it was
//! discarded, then the kernel's page offset (unused here).
use std::num::NonZeroUsize;
use std::os::fd::AsFd;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering, fence};

use aya::maps::MapData;
use nix::sys::mman::{MapFlags, ProtFlags, mmap, munmap};

const BUSY: u32 = 1 << 31;
const DISCARD: u32 = 1 << 30;
const HEADER: usize = 8;

/// One mmap()ed range, unmapped on drop.
struct Mapping {
    ptr: NonNull<std::ffi::c_void>,
    len: usize,
}

impl Mapping {
    fn new(map: &MapData, len: usize, prot: ProtFlags, offset: usize) -> std::io::Result<Self> {
        let n = NonZeroUsize::new(len).ok_or_else(|| std::io::Error::other("empty mapping"))?;
        let off = i64::try_from(offset).map_err(std::io::Error::other)?;
        // SAFETY: a fresh shared mapping of the map's descriptor chosen by the kernel (no address
        // given); the kernel checks the offset and length against the ring's pages.
        let ptr = unsafe { mmap(None, n, prot, MapFlags::MAP_SHARED, map.fd().as_fd(), off) }?;
        Ok(Mapping { ptr, len })
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: the range mapped in `new`, unmapped once; nothing borrows it past the Ring.
        let _ = unsafe { munmap(self.ptr, self.len) };
    }
}

// SAFETY: the mappings are plain shared memory, used only through the Ring that owns them.
unsafe impl Send for Mapping {}

/// Where a ring's positions and data are (the mmap()ed pages, or a test's memory).
struct View {
    consumer: *const AtomicUsize,
    producer: *const AtomicUsize,
    data: *const u8,
    /// Data bytes: a power of two.
    size: usize,
}

/// What one `drain` did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Drained {
    /// Records handed to the caller.
    pub records: usize,
    /// Stopped at the caller's maximum: more may be waiting.
    pub full: bool,
    /// Records skipped because their header made no sense (never seen: the kernel writes them);
    /// everything the producer had written is dropped then, and reading starts again after it.
    pub corrupt: u64,
}

/// A ring buffer map read in place.
pub struct Ring {
    map: MapData,
    _consumer_page: Mapping,
    _data_pages: Mapping,
    view: View,
    /// Our consumer position (published to the kernel at the end of each drain).
    pos: usize,
    /// A record that crosses the end of the data area, made whole.
    scratch: Vec<u8>,
}

// SAFETY: the raw pointers in `view` point into the mappings the Ring owns.
unsafe impl Send for Ring {}

impl Ring {
    /// Maps `map`, a ring buffer of `size` data bytes (checked against the kernel's view).
    pub fn new(map: MapData) -> std::io::Result<Self> {
        let info = map.info().map_err(std::io::Error::other)?;
        let size = info.max_entries() as usize;
        // SAFETY: sysconf has no preconditions.
        let page =
            usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).map_err(std::io::Error::other)?;
        if !size.is_power_of_two() || size < page {
            return Err(std::io::Error::other(format!(
                "ring of {size} bytes: not a power of two of at least a page"
            )));
        }
        let consumer_page = Mapping::new(&map, page, ProtFlags::PROT_READ | ProtFlags::PROT_WRITE, 0)?;
        let data_pages = Mapping::new(&map, page + size, ProtFlags::PROT_READ, page)?;
        let base = data_pages.ptr.as_ptr() as *const u8;
        let view = View {
            consumer: consumer_page.ptr.as_ptr() as *const AtomicUsize,
            producer: base as *const AtomicUsize,
            // SAFETY: the data area starts one page into the mapping of page + size bytes.
            data: unsafe { base.add(page) },
            size,
        };
        // SAFETY: the consumer page is mapped and page-aligned.
        let pos = unsafe { &*view.consumer }.load(Ordering::Acquire);
        Ok(Ring {
            map,
            _consumer_page: consumer_page,
            _data_pages: data_pages,
            view,
            pos,
            scratch: Vec::new(),
        })
    }

    /// Hands each committed record, up to `max`, to `f`, then frees their space.
    pub fn drain(&mut self, max: usize, f: impl FnMut(&[u8])) -> Drained {
        // SAFETY: `view` points into the mappings this Ring owns, alive as long as it is.
        unsafe { drain(&self.view, &mut self.pos, &mut self.scratch, max, f) }
    }
}

impl AsFd for Ring {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.map.fd().as_fd()
    }
}

/// Reads the records between our position and the producer's.
///
/// # Safety
/// `view`'s pointers must be valid for the ring's layout: aligned positions, `size` data bytes,
/// written by producers that follow the kernel's protocol.
unsafe fn drain(
    view: &View,
    pos: &mut usize,
    scratch: &mut Vec<u8>,
    max: usize,
    mut f: impl FnMut(&[u8]),
) -> Drained {
    // SAFETY (for the derefs below): per this function's contract.
    let (consumer, producer) = unsafe { (&*view.consumer, &*view.producer) };
    let mask = view.size - 1;
    let mut out = Drained::default();
    // The producer position, re-read when we catch up with it.
    let mut prod = producer.load(Ordering::Acquire);
    loop {
        if *pos == prod || out.records == max {
            // Free what was read. Then, as the kernel's commit reads our position after
            // writing its header (it wakes us only when it finds us caught up with its record),
            // a full fence before looking again: either we see that record now or it wakes us.
            consumer.store(*pos, Ordering::Release);
            if out.records == max {
                out.full = true;
                return out;
            }
            fence(Ordering::SeqCst);
            prod = producer.load(Ordering::Acquire);
            if *pos == prod {
                return out;
            }
        }
        let at = *pos & mask;
        // SAFETY: records start 8-aligned inside the data area, so the header is in it.
        let hdr = unsafe { &*(view.data.add(at) as *const AtomicU32) }.load(Ordering::Acquire);
        if hdr & BUSY != 0 {
            // Reserved, not committed yet: its commit wakes us once we are caught up with it.
            consumer.store(*pos, Ordering::Release);
            fence(Ordering::SeqCst);
            // SAFETY: as above.
            let again = unsafe { &*(view.data.add(at) as *const AtomicU32) }.load(Ordering::Acquire);
            if again & BUSY != 0 {
                return out;
            }
            continue;
        }
        let len = (hdr & !(BUSY | DISCARD)) as usize;
        let step = (len + HEADER + 7) & !7;
        if len + HEADER > view.size || step > prod.wrapping_sub(*pos) {
            // Not a record the kernel wrote: drop what is there, start again after it.
            out.corrupt += 1;
            *pos = prod;
            continue;
        }
        if hdr & DISCARD == 0 {
            let start = (at + HEADER) & mask;
            if start + len <= view.size {
                // SAFETY: a committed record inside the data area; the kernel does not write it
                // again before our position passes it.
                f(unsafe { std::slice::from_raw_parts(view.data.add(start), len) });
            } else {
                // It crosses the end: its tail is at the start of the area.
                let first = view.size - start;
                scratch.clear();
                // SAFETY: both parts lie inside the data area, committed as above.
                unsafe {
                    scratch.extend_from_slice(std::slice::from_raw_parts(view.data.add(start), first));
                    scratch.extend_from_slice(std::slice::from_raw_parts(view.data, len - first));
                }
                f(scratch);
            }
            out.records += 1;
        }
        *pos = pos.wrapping_add(step);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A ring in plain memory, written the kernel's way.
    struct Fake {
        consumer: Box<AtomicUsize>,
        producer: Box<AtomicUsize>,
        data: Vec<u64>,
    }

    impl Fake {
        fn new(size: usize) -> Self {
            Fake {
                consumer: Box::new(AtomicUsize::new(0)),
                producer: Box::new(AtomicUsize::new(0)),
                data: vec![0; size / 8],
            }
        }
        fn view(&self) -> View {
            View {
                consumer: &*self.consumer,
                producer: &*self.producer,
                data: self.data.as_ptr() as *const u8,
                size: self.data.len() * 8,
            }
        }
        fn bytes(&mut self) -> &mut [u8] {
            let n = self.data.len() * 8;
            // SAFETY: the Vec's u64s viewed as bytes.
            unsafe { std::slice::from_raw_parts_mut(self.data.as_mut_ptr() as *mut u8, n) }
        }
        /// Reserves a record at the producer position and returns its start.
        fn reserve(&mut self, len: usize) -> usize {
            let at = self.producer.load(Ordering::Relaxed);
            let size = self.data.len() * 8;
            let h = at % size;
            self.bytes()[h..h + 4].copy_from_slice(&(len as u32 | BUSY).to_ne_bytes());
            self.producer
                .store(at + ((len + HEADER + 7) & !7), Ordering::Release);
            at
        }
        fn commit(&mut self, at: usize, payload: &[u8], discard: bool) {
            let size = self.data.len() * 8;
            for (i, b) in payload.iter().enumerate() {
                self.bytes()[(at + HEADER + i) % size] = *b;
            }
            let flag = if discard { DISCARD } else { 0 };
            let h = at % size;
            self.bytes()[h..h + 4].copy_from_slice(&(payload.len() as u32 | flag).to_ne_bytes());
        }
        fn push(&mut self, payload: &[u8]) {
            let at = self.reserve(payload.len());
            self.commit(at, payload, false);
        }
        fn read(&self, pos: &mut usize, max: usize) -> (Vec<Vec<u8>>, Drained) {
            let mut got = Vec::new();
            let mut scratch = Vec::new();
            // SAFETY: the fake's memory follows the layout.
            let d = unsafe { drain(&self.view(), pos, &mut scratch, max, |r| got.push(r.to_vec())) };
            (got, d)
        }
    }

    fn rec(n: u8, len: usize) -> Vec<u8> {
        (0..len).map(|i| n.wrapping_add(i as u8)).collect()
    }

    #[test]
    fn records_come_out_in_order_whole_and_free_their_space() {
        let mut r = Fake::new(256);
        let mut pos = 0;
        for n in 0..5 {
            r.push(&rec(n, 20));
        }
        let (got, d) = r.read(&mut pos, 3);
        assert_eq!(got, vec![rec(0, 20), rec(1, 20), rec(2, 20)]);
        assert!(d.full);
        // Freed as far as read: 3 records of 8 + 20 bytes, rounded to 32.
        assert_eq!(r.consumer.load(Ordering::Relaxed), 96);
        let (got, d) = r.read(&mut pos, 10);
        assert_eq!(got, vec![rec(3, 20), rec(4, 20)]);
        assert_eq!(
            d,
            Drained {
                records: 2,
                full: false,
                corrupt: 0
            }
        );
        assert_eq!(
            r.consumer.load(Ordering::Relaxed),
            r.producer.load(Ordering::Relaxed)
        );
    }

    #[test]
    fn a_record_across_the_end_is_made_whole() {
        let mut r = Fake::new(128);
        let mut pos = 0;
        // 2 x 56 bytes; the third's header is at 112 and its payload runs from 120 to 168.
        for n in 0..2 {
            r.push(&rec(n * 50, 48));
        }
        let (got, _) = r.read(&mut pos, 10);
        assert_eq!(got.len(), 2);
        r.push(&rec(7, 48));
        let (got, d) = r.read(&mut pos, 10);
        assert_eq!(got, vec![rec(7, 48)], "8 bytes at the end, 40 at the start");
        assert_eq!(d.records, 1);
        assert_eq!(pos, 168);
        assert_eq!(r.consumer.load(Ordering::Relaxed), 168);
    }

    #[test]
    fn reading_stops_at_an_uncommitted_record_and_skips_discarded_ones() {
        let mut r = Fake::new(256);
        let mut pos = 0;
        r.push(&rec(1, 8));
        let busy = r.reserve(16);
        r.push(&rec(3, 8));
        let (got, d) = r.read(&mut pos, 10);
        assert_eq!(got, vec![rec(1, 8)]);
        assert!(!d.full);
        assert_eq!(
            r.consumer.load(Ordering::Relaxed),
            16,
            "freed up to the busy record"
        );
        r.commit(busy, &rec(2, 16), true);
        let (got, _) = r.read(&mut pos, 10);
        assert_eq!(got, vec![rec(3, 8)], "the discarded record is passed over");
        assert_eq!(pos, r.producer.load(Ordering::Relaxed));
    }

    #[test]
    fn a_nonsense_header_drops_what_is_there_and_never_reads_out_of_the_area() {
        let mut r = Fake::new(128);
        let mut pos = 0;
        r.push(&rec(1, 8));
        // A header claiming more than the ring holds.
        let at = r.reserve(8);
        r.bytes()[at..at + 4].copy_from_slice(&(4096u32).to_ne_bytes());
        let (got, d) = r.read(&mut pos, 10);
        assert_eq!(got, vec![rec(1, 8)]);
        assert_eq!(d.corrupt, 1);
        assert_eq!(pos, r.producer.load(Ordering::Relaxed));
        r.push(&rec(9, 8));
        let (got, d) = r.read(&mut pos, 10);
        assert_eq!((got, d.corrupt), (vec![rec(9, 8)], 0));
    }
}
