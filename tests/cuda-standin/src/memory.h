// Device memory of the stand-in: host memory carved out of one reserved address range, each
// allocation ending exactly at a guard page, freed ranges kept inaccessible for a while. A kernel
// that reads or writes past the end of an allocation, or into a freed one, faults; the fault
// handler reports it (memcheck) and aborts, naming the kernel.
#pragma once

#include <cstddef>
#include <cstdint>
#include <deque>
#include <map>
#include <mutex>
#include <string>

namespace standin {

/// One live allocation.
struct Allocation {
    uint64_t ptr;         // what the program sees
    size_t bytes;         // what it asked for
    uint64_t map_start;   // the pages it owns (data pages + the guard page after them)
    size_t map_len;
    bool pristine;        // never written since it was allocated (all zero)
};

/// The device's memory.
class DeviceMemory {
  public:
    /// `capacity`: the bytes the device claims to have.
    explicit DeviceMemory(size_t capacity);

    /// A new allocation of `bytes`, or 0 when the device is full.
    uint64_t alloc(size_t bytes);
    /// Frees a live allocation; false if `ptr` is not one (a double free, or never allocated).
    bool free(uint64_t ptr);
    /// The live allocation holding [ptr, ptr + bytes), or null.
    Allocation* find(uint64_t ptr, size_t bytes);
    /// Says why [ptr, ptr + bytes) is not accessible (past an allocation's end, freed, unknown).
    std::string describe(uint64_t ptr, size_t bytes);
    /// Whether an address lies in the device's address range.
    bool owns(uint64_t addr) const { return addr >= base_ && addr < base_ + reserved_; }
    /// Marks every allocation as possibly written (a kernel may write anything).
    void touch_all();

    size_t capacity() const { return capacity_; }
    size_t used() const { return used_; }

  private:
    uint64_t take_pages(size_t len);
    void give_pages(uint64_t start, size_t len);

    size_t capacity_, used_ = 0;
    uint64_t base_ = 0;
    size_t reserved_ = 0;
    std::map<uint64_t, size_t> free_;          // start -> length, coalesced
    std::map<uint64_t, Allocation> live_;      // by ptr
    std::deque<Allocation> quarantine_;        // freed, still inaccessible
    size_t quarantine_bytes_ = 0;
};

}  // namespace standin
