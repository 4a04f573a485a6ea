#include "memory.h"

#include <sys/mman.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>

namespace standin {

namespace {
constexpr size_t PAGE = 4096;
size_t round_up(size_t n, size_t to) { return (n + to - 1) / to * to; }
}  // namespace

DeviceMemory::DeviceMemory(size_t capacity) : capacity_(capacity) {
    // Room for the capacity, a guard page per allocation and the quarantine, several times over.
    reserved_ = round_up(capacity, PAGE) * 4 + (size_t(16) << 30);
    void* m = mmap(nullptr, reserved_, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (m == MAP_FAILED) {
        fprintf(stderr, "cuda-standin: cannot reserve %zu bytes of address space\n", reserved_);
        abort();
    }
    base_ = (uint64_t)m;
    free_[base_] = reserved_;
}

uint64_t DeviceMemory::take_pages(size_t len) {
    for (auto it = free_.begin(); it != free_.end(); ++it) {
        if (it->second < len) continue;
        uint64_t start = it->first;
        size_t rest = it->second - len;
        free_.erase(it);
        if (rest) free_[start + len] = rest;
        return start;
    }
    return 0;
}

void DeviceMemory::give_pages(uint64_t start, size_t len) {
    auto next = free_.lower_bound(start);
    if (next != free_.end() && start + len == next->first) {
        len += next->second;
        free_.erase(next);
    }
    auto prev = free_.lower_bound(start);
    if (prev != free_.begin()) {
        --prev;
        if (prev->first + prev->second == start) {
            prev->second += len;
            return;
        }
    }
    free_[start] = len;
}

uint64_t DeviceMemory::alloc(size_t bytes) {
    size_t data = round_up(bytes ? bytes : 1, PAGE);
    if (used_ + data > capacity_) return 0;
    size_t len = data + PAGE;
    uint64_t start = take_pages(len);
    while (start == 0 && !quarantine_.empty()) {
        // Out of address space: recycle the oldest freed ranges.
        Allocation old = quarantine_.front();
        quarantine_.pop_front();
        quarantine_bytes_ -= old.map_len;
        give_pages(old.map_start, old.map_len);
        start = take_pages(len);
    }
    if (start == 0) return 0;
    if (bytes && mprotect((void*)start, data, PROT_READ | PROT_WRITE) != 0) {
        give_pages(start, len);
        return 0;
    }
    // The allocation ends where the guard page begins, so the first byte past it faults.
    uint64_t ptr = start + data - bytes;
    if (bytes == 0) ptr = start + data;  // a unique address nobody may touch
    // Fresh pages are zero; a device's memory is not. Small allocations (step buffers) start as
    // NaN bits so a read before the first write shows; large ones stay untouched (lazy pages).
    bool garbage = bytes <= (size_t(1) << 20);
    if (garbage && bytes) memset((void*)ptr, 0xff, bytes);
    live_[ptr] = Allocation{ptr, bytes, start, len, !garbage};
    used_ += data;
    return ptr;
}

bool DeviceMemory::free(uint64_t ptr) {
    auto it = live_.find(ptr);
    if (it == live_.end()) return false;
    Allocation a = it->second;
    live_.erase(it);
    used_ -= a.map_len - PAGE;
    // Give the memory back to the system, keep the addresses faulting.
    mprotect((void*)a.map_start, a.map_len, PROT_NONE);
    madvise((void*)a.map_start, a.map_len, MADV_DONTNEED);
    quarantine_.push_back(a);
    quarantine_bytes_ += a.map_len;
    while (quarantine_bytes_ > reserved_ / 4 && !quarantine_.empty()) {
        Allocation old = quarantine_.front();
        quarantine_.pop_front();
        quarantine_bytes_ -= old.map_len;
        give_pages(old.map_start, old.map_len);
    }
    return true;
}

Allocation* DeviceMemory::find(uint64_t ptr, size_t bytes) {
    auto it = live_.upper_bound(ptr);
    if (it == live_.begin()) return nullptr;
    --it;
    Allocation& a = it->second;
    if (ptr < a.ptr || ptr + bytes > a.ptr + a.bytes) return nullptr;
    return &a;
}

std::string DeviceMemory::describe(uint64_t ptr, size_t bytes) {
    char buf[256];
    auto it = live_.upper_bound(ptr);
    if (it != live_.begin()) {
        --it;
        const Allocation& a = it->second;
        if (ptr >= a.ptr && ptr < a.map_start + a.map_len) {
            snprintf(buf, sizeof buf, "%zu bytes at 0x%llx: %llu bytes past the end of a %zu-byte allocation at 0x%llx",
                     bytes, (unsigned long long)ptr, (unsigned long long)(ptr + bytes - (a.ptr + a.bytes)), a.bytes,
                     (unsigned long long)a.ptr);
            return buf;
        }
    }
    for (auto q = quarantine_.rbegin(); q != quarantine_.rend(); ++q) {
        if (ptr >= q->map_start && ptr < q->map_start + q->map_len) {
            snprintf(buf, sizeof buf, "%zu bytes at 0x%llx: inside a freed %zu-byte allocation at 0x%llx (use after free)",
                     bytes, (unsigned long long)ptr, q->bytes, (unsigned long long)q->ptr);
            return buf;
        }
    }
    snprintf(buf, sizeof buf, "%zu bytes at 0x%llx: not in any device allocation", bytes, (unsigned long long)ptr);
    return buf;
}

void DeviceMemory::touch_all() {
    for (auto& [_, a] : live_) a.pristine = false;
}

}  // namespace standin
