//! Descriptor chains as the devices see them: a bounded list of checked guest buffers.

use virtio_queue::desc::split::Descriptor;
use virtio_queue::DescriptorChain;
use vm_memory::{GuestAddress, GuestMemory, GuestMemoryMmap, Permissions};

/// Errors in a descriptor chain built by the driver.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ChainError {
    /// The chain does not end: it loops, points past the descriptor table, or is longer than
    /// the queue.
    #[error("descriptor chain does not terminate within the queue size")]
    Unterminated,
    /// A buffer lies outside guest memory, or its end overflows the address space.
    #[error("descriptor buffer {addr:#x}+{len:#x} is outside guest memory")]
    OutsideMemory {
        /// Guest address of the buffer.
        addr: u64,
        /// Its length.
        len: u32,
    },
    /// A buffer is device-readable where it must be device-writable, or the reverse.
    #[error("descriptor buffer has the wrong direction")]
    WrongDirection,
}

/// The descriptors of one chain, read once from the descriptor table.
#[derive(Debug)]
pub(crate) struct Chain {
    /// Index of the head descriptor (what goes in the used ring).
    pub head: u16,
    /// The descriptors, at most the queue size of them.
    pub descs: Vec<Descriptor>,
    /// False when the chain was cut short: a loop, a `next` past the table, an unreadable
    /// descriptor, or more descriptors than the queue size.
    pub complete: bool,
}

impl Chain {
    /// Reads up to `max_len` descriptors of `chain`.
    pub fn collect(chain: DescriptorChain<&GuestMemoryMmap<()>>, max_len: usize) -> Self {
        let head = chain.head_index();
        let mut descs = Vec::new();
        let mut complete = false;
        for desc in chain {
            if descs.len() == max_len {
                complete = false;
                break;
            }
            // The iterator stops early (loop, bad index, unreadable table) on a descriptor that
            // still has NEXT set; a proper chain ends on one without it.
            complete = !desc.has_next();
            descs.push(desc);
        }
        Self {
            head,
            descs,
            complete,
        }
    }
}

/// Checks that `desc` points at guest memory with the given direction.
pub(crate) fn check_buffer(
    mem: &GuestMemoryMmap<()>,
    desc: &Descriptor,
    writable: bool,
) -> Result<(), ChainError> {
    if desc.is_write_only() != writable {
        return Err(ChainError::WrongDirection);
    }
    check_range(mem, desc.addr(), desc.len())
}

/// Checks that `[addr, addr + len)` is guest memory and does not overflow.
pub(crate) fn check_range(
    mem: &GuestMemoryMmap<()>,
    addr: GuestAddress,
    len: u32,
) -> Result<(), ChainError> {
    let err = ChainError::OutsideMemory { addr: addr.0, len };
    if addr.0.checked_add(u64::from(len)).is_none() {
        return Err(err);
    }
    if !GuestMemory::check_range(mem, addr, len as usize, Permissions::ReadWrite) {
        return Err(err);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::testing::{mem, DescSpec, TestQueue};
    use virtio_queue::QueueOwnedT;

    fn collect_first(tq: &TestQueue, max: usize) -> Chain {
        let m = tq.mem();
        let mut q = tq.queue();
        let chain = q.iter(m).unwrap().next().unwrap();
        Chain::collect(chain, max)
    }

    #[test]
    fn complete_chain() {
        let m = mem();
        let tq = TestQueue::new(&m, 16);
        tq.add_chain(0, &[DescSpec::r(0x4_0000, 16), DescSpec::w(0x4_1000, 1)]);
        let c = collect_first(&tq, 16);
        assert!(c.complete);
        assert_eq!(c.descs.len(), 2);
        assert_eq!(c.head, 0);
    }

    #[test]
    fn loop_is_unterminated_and_bounded() {
        let m = mem();
        let tq = TestQueue::new(&m, 16);
        // 0 -> 1 -> 0 -> ...
        tq.set_desc(0, 0x4_0000, 16, DescSpec::NEXT, 1);
        tq.set_desc(1, 0x4_1000, 1, DescSpec::NEXT | DescSpec::WRITE, 0);
        tq.publish(&[0]);
        let c = collect_first(&tq, 16);
        assert!(!c.complete);
        assert!(c.descs.len() <= 16);
    }

    #[test]
    fn next_past_table_is_unterminated() {
        let m = mem();
        let tq = TestQueue::new(&m, 16);
        tq.set_desc(0, 0x4_0000, 16, DescSpec::NEXT, 200);
        tq.publish(&[0]);
        let c = collect_first(&tq, 16);
        assert!(!c.complete);
        assert_eq!(c.descs.len(), 1);
    }

    #[test]
    fn longer_than_max_is_unterminated() {
        let m = mem();
        let tq = TestQueue::new(&m, 16);
        let specs: Vec<_> = (0..10)
            .map(|i| DescSpec::r(0x4_0000 + i * 0x100, 16))
            .collect();
        tq.add_chain(0, &specs);
        let c = collect_first(&tq, 4);
        assert!(!c.complete);
        assert_eq!(c.descs.len(), 4);
    }

    #[test]
    fn ranges_are_checked() {
        let m = mem();
        assert!(check_range(&m, GuestAddress(0x1000), 0x1000).is_ok());
        assert!(check_range(&m, GuestAddress(0x1000), 0).is_ok());
        assert!(check_range(&m, GuestAddress(u64::MAX - 4), 0x100).is_err());
        assert!(check_range(&m, GuestAddress(0x10_0000_0000), 1).is_err());
        let end = crate::virtio::testing::MEM_SIZE;
        assert!(check_range(&m, GuestAddress(end - 1), 2).is_err());
        let d = Descriptor::new(0x1000, 16, 0, 0);
        assert_eq!(check_buffer(&m, &d, true), Err(ChainError::WrongDirection));
        assert!(check_buffer(&m, &d, false).is_ok());
    }
}
