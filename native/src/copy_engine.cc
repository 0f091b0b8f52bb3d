// The copy engine's queue, workers and host copy loop (see copy_engine.h).

#include "recoverkit/copy_engine.h"

#include <algorithm>
#include <cstring>
#include <exception>

#if defined(__x86_64__)
#include <emmintrin.h>
#endif

#include "recoverkit/crc32c.h"
#include "recoverkit/cuda_copy.h"
#include "recoverkit/errors.h"
#include "recoverkit/mem_check.h"

namespace recoverkit {
namespace {

// Large copies without a checksum: non-temporal stores (no read-for-ownership of dst, and
// a multi-GB snapshot does not flush the training loop's working set out of the cache).
void copy_plain(uint8_t* dst, const uint8_t* src, size_t n) {
#if defined(__x86_64__)
  constexpr size_t kStreamMin = 1 << 20;
  if (n >= kStreamMin) {
    const size_t head = (16 - (reinterpret_cast<uintptr_t>(dst) & 15)) & 15;
    std::memcpy(dst, src, head);
    dst += head, src += head, n -= head;
    for (; n >= 64; dst += 64, src += 64, n -= 64) {
      for (size_t k = 0; k < 64; k += 16)
        _mm_stream_si128(reinterpret_cast<__m128i*>(dst + k),
                         _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + k)));
    }
    _mm_sfence();
  }
#endif
  std::memcpy(dst, src, n);
}

uint32_t copy_block(uint8_t* dst, const uint8_t* src, size_t n, bool want_crc) {
  if (!want_crc) {
    copy_plain(dst, src, n);
    return 0;
  }
  return crc32c_copy(0, dst, src, n);
}

}  // namespace

// ---- CopyJob ---------------------------------------------------------------------------

bool CopyJob::wait(double timeout_s) {
  std::unique_lock<std::mutex> lock(mu_);
  if (timeout_s < 0) {
    cv_.wait(lock, [this] { return done_; });
    return true;
  }
  return cv_.wait_for(lock, std::chrono::duration<double>(timeout_s), [this] { return done_; });
}

bool CopyJob::done() const {
  std::lock_guard<std::mutex> lock(mu_);
  return done_;
}

bool CopyJob::failed() const {
  std::lock_guard<std::mutex> lock(mu_);
  return done_ && !error_.empty();
}

std::string CopyJob::error() const {
  std::lock_guard<std::mutex> lock(mu_);
  return done_ ? error_ : std::string();
}

uint32_t CopyJob::crc() const {
  std::lock_guard<std::mutex> lock(mu_);
  return crc_;
}

double CopyJob::elapsed_s() const {
  std::lock_guard<std::mutex> lock(mu_);
  const auto end = done_ ? t_done_ : Clock::now();
  return std::chrono::duration<double>(end - t_submit_).count();
}

// ---- CopyEngine ------------------------------------------------------------------------

CopyEngine::CopyEngine(int num_threads, size_t chunk_bytes)
    : num_threads_(num_threads), chunk_bytes_(chunk_bytes) {
  if (num_threads < 1 || num_threads > 1024)
    throw InvalidArgument("num_threads must be in [1, 1024], got " + std::to_string(num_threads));
  if (chunk_bytes == 0) throw InvalidArgument("chunk_bytes must be positive");
  try {
    for (int i = 0; i < num_threads; i++) workers_.emplace_back([this] { worker_loop(); });
  } catch (...) {
    close();
    throw;
  }
}

CopyEngine::~CopyEngine() { close(); }

CudaCopyDevice& CopyEngine::device(int ordinal) {
  const CudaDriver* drv = CudaDriver::get();
  if (drv == nullptr) throw CudaFailure("no CUDA driver");
  if (static_cast<size_t>(ordinal) >= devices_.size()) devices_.resize(ordinal + 1);
  if (!devices_[ordinal]) devices_[ordinal] = std::make_unique<CudaCopyDevice>(*drv, ordinal);
  return *devices_[ordinal];
}

std::shared_ptr<CopyJob> CopyEngine::submit(uintptr_t src, uintptr_t dst, int64_t nbytes,
                                            bool crc, int device_ordinal, uintptr_t stream) {
  if (nbytes < 0) throw InvalidArgument("nbytes must be >= 0, got " + std::to_string(nbytes));
  if (nbytes > 0 && (src == 0 || dst == 0))
    throw InvalidArgument("src_ptr and dst_ptr must be non-null when nbytes > 0");
  if (device_ordinal >= 0 && CudaDriver::get() == nullptr) throw CudaFailure("no CUDA driver");
  // Host ranges are checked here, so a bad pointer is an error of submit, not a signal in
  // a worker (a device source is the driver's to check: the copy fails with its error).
  if (device_ordinal < 0) check_mapped(src, static_cast<uint64_t>(nbytes), "CopyEngine.submit: src_ptr");
  check_mapped(dst, static_cast<uint64_t>(nbytes), "CopyEngine.submit: dst_ptr");
  auto job = std::make_shared<CopyJob>();
  job->src_ = reinterpret_cast<const uint8_t*>(src);
  job->dst_ = reinterpret_cast<uint8_t*>(dst);
  job->nbytes_ = static_cast<uint64_t>(nbytes);
  job->want_crc_ = crc;
  job->device_ = device_ordinal < 0 ? -1 : device_ordinal;
  job->chunk_bytes_ = chunk_bytes_;
  job->nchunks_ = device_ordinal >= 0 ? 1 : (job->nbytes_ + chunk_bytes_ - 1) / chunk_bytes_;
  job->t_submit_ = CopyJob::Clock::now();

  std::lock_guard<std::mutex> lock(mu_);
  if (closed_) throw InvalidArgument("engine is closed");
  if (device_ordinal >= 0) {
    job->cuda_ = &device(device_ordinal);
    job->producer_event_ = job->cuda_->record_producer(stream);
    if (nbytes == 0) job->cuda_->give_event(job->producer_event_);
  }
  if (nbytes == 0) {  // nothing to copy: finished at once, crc32c of no bytes is 0
    job->done_ = true;
    job->t_done_ = job->t_submit_;
    copies_done_++;
    return job;
  }
  job->chunk_crc_.assign(job->nchunks_, 0);
  job->remaining_ = job->nchunks_;
  pending_++;
  queue_.push_back(job);
  if (job->nchunks_ > 1) {
    cv_.notify_all();
  } else {
    cv_.notify_one();
  }
  return job;
}

void CopyEngine::worker_loop() {
  for (;;) {
    std::shared_ptr<CopyJob> job;
    size_t unit = 0;
    {
      std::unique_lock<std::mutex> lock(mu_);
      cv_.wait(lock, [this] { return closed_ || !queue_.empty(); });
      if (closed_) return;
      job = queue_.front();
      unit = job->next_++;
      if (job->next_ == job->nchunks_) queue_.pop_front();
    }
    try {
      if (job->device_ >= 0) {
        run_device_copy(*job);
      } else {
        run_host_chunk(*job, unit);
      }
    } catch (const std::exception& e) {
      note_failure(*job, e.what());
    } catch (...) {
      note_failure(*job, "unknown error in the copy engine");
    }
    finish_units(job, 1);
  }
}

void CopyEngine::run_host_chunk(CopyJob& job, size_t chunk) {
  const size_t off = chunk * job.chunk_bytes_;
  const size_t len = std::min<uint64_t>(job.chunk_bytes_, job.nbytes_ - off);
  job.chunk_crc_[chunk] = copy_block(job.dst_ + off, job.src_ + off, len, job.want_crc_);
}

void CopyEngine::run_device_copy(CopyJob& job) {
  CUevent producer = job.producer_event_;
  job.producer_event_ = nullptr;  // copy_to_host returns it to the pool
  job.cuda_->copy_to_host(producer, job.dst_, reinterpret_cast<uintptr_t>(job.src_), job.nbytes_,
                          job.chunk_bytes_, job.want_crc_ ? &job.chunk_crc_[0] : nullptr);
}

void CopyEngine::note_failure(CopyJob& job, const std::string& why) {
  std::lock_guard<std::mutex> lock(job.mu_);
  if (job.error_.empty()) job.error_ = why.empty() ? "copy failed" : why;
}

void CopyEngine::finish_units(const std::shared_ptr<CopyJob>& job, size_t units) {
  if (units == 0 || job->remaining_.fetch_sub(units) != units) return;
  // The last unit of this job: combine the chunk CRCs in order and complete it.
  uint32_t crc = 0;
  bool ok;
  {
    std::lock_guard<std::mutex> lock(job->mu_);
    ok = job->error_.empty();
  }
  if (ok && job->want_crc_) {
    crc = job->chunk_crc_[0];
    for (size_t i = 1; i < job->nchunks_; i++) {
      const uint64_t len = std::min<uint64_t>(job->chunk_bytes_, job->nbytes_ - i * job->chunk_bytes_);
      crc = crc32c_combine(crc, job->chunk_crc_[i], len);
    }
  }
  if (ok) {
    bytes_copied_ += job->nbytes_;
    copies_done_++;
  } else {
    copies_failed_++;
  }
  pending_--;
  std::lock_guard<std::mutex> lock(job->mu_);
  job->crc_ = crc;
  job->done_ = true;
  job->t_done_ = CopyJob::Clock::now();
  job->cv_.notify_all();
}

void CopyEngine::close() {
  std::lock_guard<std::mutex> serial(close_mu_);
  std::deque<std::shared_ptr<CopyJob>> dropped;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (closed_ && workers_.empty()) return;
    closed_ = true;
    dropped.swap(queue_);
  }
  cv_.notify_all();
  for (auto& job : dropped) {
    if (job->producer_event_ && job->next_ == 0) {
      job->cuda_->give_event(job->producer_event_);
      job->producer_event_ = nullptr;
    }
    note_failure(*job, "engine closed");
    finish_units(job, job->nchunks_ - job->next_);
  }
  for (auto& t : workers_) {
    if (t.joinable()) t.join();
  }
  workers_.clear();
  std::lock_guard<std::mutex> lock(mu_);
  devices_.clear();  // after the workers: no copy is using a stream any more
}

CopyStats CopyEngine::stats() const {
  CopyStats s;
  s.bytes_copied = bytes_copied_.load();
  s.copies_done = copies_done_.load();
  s.copies_failed = copies_failed_.load();
  s.copies_pending = pending_.load();
  return s;
}

}  // namespace recoverkit
