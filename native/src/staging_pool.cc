// The staging pool's arena and its first-fit allocator (see staging_pool.h).

#include "recoverkit/staging_pool.h"

#include <sys/mman.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <iterator>
#include <string>

#include "recoverkit/cuda_driver.h"
#include "recoverkit/errors.h"

namespace recoverkit {
namespace {

size_t page_size() {
  static const size_t ps = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  return ps;
}

std::string sys_message(const char* what, int err) {
  return std::string(what) + ": " + std::strerror(err);
}

}  // namespace

Arena::Arena(size_t capacity, size_t alignment) : size_(capacity) {
  if (alignment <= page_size()) {
    mapped_ = (capacity + page_size() - 1) / page_size() * page_size();
    void* p = mmap(nullptr, mapped_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) {
      int err = errno;
      throw OsError(err, "", sys_message("mmap of the staging pool", err));
    }
    data_ = static_cast<uint8_t*>(p);
  } else {
    void* p = nullptr;
    int rc = posix_memalign(&p, alignment, capacity);
    if (rc != 0) throw OsError(rc, "", sys_message("posix_memalign of the staging pool", rc));
    data_ = static_cast<uint8_t*>(p);
  }
}

Arena::~Arena() {
  if (mapped_) {
    munmap(data_, mapped_);
  } else {
    std::free(data_);
  }
}

StagingPool::StagingPool(size_t capacity, size_t alignment, bool lock_memory, bool register_cuda)
    : capacity_(capacity), alignment_(alignment) {
  if (capacity == 0) throw InvalidArgument("capacity_bytes must be positive");
  if (alignment == 0 || (alignment & (alignment - 1)) != 0)
    throw InvalidArgument("alignment must be a power of two, got " + std::to_string(alignment));
  arena_ = std::make_shared<Arena>(capacity, alignment);
  if (lock_memory) {
    if (mlock(arena_->data(), capacity) != 0) {
      int err = errno;
      throw OsError(err, "", sys_message("mlock of the staging pool", err) +
                                 " (raise RLIMIT_MEMLOCK or pass lock_memory=False)");
    }
    locked_ = true;
  }
  if (register_cuda) {
    // Page-lock the arena for every context (PORTABLE); best effort, skipped on any error.
    const CudaDriver* drv = CudaDriver::get();
    int count = 0;
    CUdevice dev = 0;
    CUcontext ctx = nullptr;
    if (drv && drv->cuDeviceGetCount(&count) == kCudaSuccess && count > 0 &&
        drv->cuDeviceGet(&dev, 0) == kCudaSuccess &&
        drv->cuDevicePrimaryCtxRetain(&ctx, dev) == kCudaSuccess) {
      if (drv->cuCtxPushCurrent(ctx) == kCudaSuccess) {
        cuda_registered_ = drv->cuMemHostRegister(arena_->data(), capacity,
                                                  kCuMemHostRegisterPortable) == kCudaSuccess;
        CUcontext popped = nullptr;
        drv->cuCtxPopCurrent(&popped);
      }
      if (cuda_registered_) {
        cuda_device_ = dev;
      } else {
        drv->cuDevicePrimaryCtxRelease(dev);
      }
    }
  }
  free_.emplace(0, capacity);
}

StagingPool::~StagingPool() { close(); }

void StagingPool::check_open() const {
  if (!arena_) throw InvalidArgument("pool is closed");
}

size_t StagingPool::alloc(size_t nbytes) {
  std::lock_guard<std::mutex> lock(mu_);
  check_open();
  const size_t want = nbytes == 0 ? 1 : nbytes;
  if (want <= capacity_) {
    const size_t need = (want + alignment_ - 1) / alignment_ * alignment_;
    for (auto it = free_.begin(); it != free_.end(); ++it) {
      if (it->second < need) continue;
      const size_t offset = it->first, rest = it->second - need;
      free_.erase(it);
      if (rest) free_.emplace(offset + need, rest);
      allocated_.emplace(offset, need);
      used_ += need;
      if (used_ > high_water_) high_water_ = used_;
      return offset;
    }
  }
  throw PoolExhausted("staging pool exhausted: requested " + std::to_string(nbytes) +
                      " bytes, largest free range " + std::to_string(largest_free_locked()) +
                      " bytes, capacity " + std::to_string(capacity_) + " bytes (" +
                      std::to_string(used_) + " in use)");
}

void StagingPool::free(size_t offset) {
  std::lock_guard<std::mutex> lock(mu_);
  check_open();
  auto a = allocated_.find(offset);
  if (a == allocated_.end())
    throw InvalidArgument("free of offset " + std::to_string(offset) +
                          ", which is not allocated (unknown or already freed)");
  size_t start = offset, len = a->second;
  allocated_.erase(a);
  used_ -= len;
  auto next = free_.lower_bound(offset);
  if (next != free_.end() && next->first == start + len) {  // merge with the right neighbour
    len += next->second;
    next = free_.erase(next);
  }
  if (next != free_.begin()) {  // merge with the left neighbour
    auto prev = std::prev(next);
    if (prev->first + prev->second == start) {
      start = prev->first;
      len += prev->second;
      free_.erase(prev);
    }
  }
  free_.emplace(start, len);
}

uintptr_t StagingPool::address(size_t offset) const {
  std::lock_guard<std::mutex> lock(mu_);
  check_open();
  if (offset >= capacity_)
    throw InvalidArgument("offset " + std::to_string(offset) + " is outside the pool (capacity " +
                          std::to_string(capacity_) + ")");
  return reinterpret_cast<uintptr_t>(arena_->data()) + offset;
}

std::shared_ptr<Arena> StagingPool::arena_for(size_t offset, size_t nbytes) const {
  std::lock_guard<std::mutex> lock(mu_);
  check_open();
  if (offset > capacity_ || nbytes > capacity_ - offset)
    throw InvalidArgument("range [" + std::to_string(offset) + ", " + std::to_string(offset) +
                          " + " + std::to_string(nbytes) + ") is outside the pool (capacity " +
                          std::to_string(capacity_) + ")");
  return arena_;
}

bool StagingPool::closed() const {
  std::lock_guard<std::mutex> lock(mu_);
  return !arena_;
}

PoolStats StagingPool::stats() const {
  std::lock_guard<std::mutex> lock(mu_);
  const uintptr_t base = arena_ ? reinterpret_cast<uintptr_t>(arena_->data()) : 0;
  return PoolStats{capacity_, used_, high_water_, alignment_, base, locked_, cuda_registered_};
}

size_t StagingPool::largest_free() const {
  std::lock_guard<std::mutex> lock(mu_);
  return largest_free_locked();
}

size_t StagingPool::largest_free_locked() const {
  size_t largest = 0;
  for (const auto& r : free_) largest = r.second > largest ? r.second : largest;
  return largest;
}

void StagingPool::close() noexcept {
  std::lock_guard<std::mutex> lock(mu_);
  release();
}

void StagingPool::release() noexcept {
  if (!arena_) return;
  if (cuda_registered_) {
    const CudaDriver* drv = CudaDriver::get();
    CUcontext ctx = nullptr;
    if (drv->cuDevicePrimaryCtxRetain(&ctx, cuda_device_) == kCudaSuccess) {
      if (drv->cuCtxPushCurrent(ctx) == kCudaSuccess) {
        drv->cuMemHostUnregister(arena_->data());
        CUcontext popped = nullptr;
        drv->cuCtxPopCurrent(&popped);
      }
      drv->cuDevicePrimaryCtxRelease(cuda_device_);
    }
    drv->cuDevicePrimaryCtxRelease(cuda_device_);  // the reference taken at registration
    cuda_registered_ = false;
  }
  if (locked_) {
    munlock(arena_->data(), capacity_);
    locked_ = false;
  }
  arena_.reset();  // freed now, or when the last view lets go
  free_.clear();
  allocated_.clear();
  used_ = 0;
}

}  // namespace recoverkit
