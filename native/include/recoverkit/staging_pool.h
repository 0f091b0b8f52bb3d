// The staging pool: one page-aligned host arena allocated once and reused across saves.
// Ranges are handed out by offset, first-fit over a free list sorted by offset, and freed
// out of order with coalescing of neighbours. The Python fallback uses exactly the same
// algorithm, so the same alloc/free sequence yields the same offsets on both backends.
//
// The arena is optionally mlock'ed, and registered as page-locked with the CUDA driver when
// one is present (so device-to-host copies into it run at full DMA speed).
//
// The arena's memory is owned by a shared Arena object: views handed to Python hold a
// reference to it, so closing the pool while a view is alive never leaves a dangling
// pointer; the memory is released when the last holder lets go.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>

namespace recoverkit {

// Owns the arena's memory (munmap / free on destruction).
class Arena {
 public:
  Arena(size_t capacity, size_t alignment);  // throws OsError / PoolExhausted
  ~Arena();
  Arena(const Arena&) = delete;
  Arena& operator=(const Arena&) = delete;
  uint8_t* data() const noexcept { return data_; }
  size_t size() const noexcept { return size_; }

 private:
  uint8_t* data_ = nullptr;
  size_t size_ = 0;      // bytes requested (the pool's capacity)
  size_t mapped_ = 0;    // bytes mmap'ed (0 when posix_memalign was used)
};

struct PoolStats {
  size_t capacity, used, high_water, alignment;
  uintptr_t base;
  bool locked, cuda_registered;
};

class StagingPool {
 public:
  // capacity > 0; alignment a power of two. lock_memory: mlock (throws OsError on failure).
  // register_cuda: cuMemHostRegister the arena when a driver is present (skipped otherwise).
  StagingPool(size_t capacity, size_t alignment, bool lock_memory, bool register_cuda);
  ~StagingPool();
  StagingPool(const StagingPool&) = delete;
  StagingPool& operator=(const StagingPool&) = delete;

  // Offset of a range of round_up(max(nbytes, 1), alignment) bytes; throws PoolExhausted.
  size_t alloc(size_t nbytes);
  // Returns a range to the free list; throws InvalidArgument for an unknown offset.
  void free(size_t offset);
  // base + offset, bounds-checked.
  uintptr_t address(size_t offset) const;
  // The arena (to keep it alive) after checking [offset, offset + nbytes) is inside it.
  std::shared_ptr<Arena> arena_for(size_t offset, size_t nbytes) const;
  // Unregisters, unlocks and drops the arena (freed once no view holds it). Idempotent.
  void close() noexcept;

  bool closed() const;
  PoolStats stats() const;  // base is 0 once closed; used is 0, high_water is kept
  size_t largest_free() const;

 private:
  void check_open() const;  // caller holds mu_
  void release() noexcept;  // caller holds mu_
  size_t largest_free_locked() const;

  mutable std::mutex mu_;
  std::shared_ptr<Arena> arena_;
  size_t capacity_, alignment_;
  size_t used_ = 0, high_water_ = 0;
  bool locked_ = false, cuda_registered_ = false;
  int cuda_device_ = -1;
  std::map<size_t, size_t> free_;       // offset -> length, sorted by offset
  std::map<size_t, size_t> allocated_;  // offset -> length
};

}  // namespace recoverkit
