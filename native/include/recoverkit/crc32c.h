// CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), as used by iSCSI, ext4 and
// google-crc32c. The value passed in and returned is the finished CRC, so calls chain:
// crc32c_extend(crc32c_extend(0, a), b) == crc32c of a followed by b.
//
// On x86-64 with SSE4.2 (and AArch64 with the CRC extension) the CPU's crc32 instruction
// is used over three interleaved streams; otherwise a portable slicing-by-8 table version.
// The choice is made once at run time from the CPU's feature bits.
#pragma once

#include <cstddef>
#include <cstdint>

namespace recoverkit {

// CRC-32C of `n` bytes at `data`, extending the finished CRC `crc` (0 to start).
uint32_t crc32c_extend(uint32_t crc, const void* data, size_t n) noexcept;

// Copies n bytes from src to dst (which must not overlap) and returns the CRC-32C of them,
// extending `crc`, in one pass. On x86 with SSE4.2 the bulk goes out as non-temporal
// stores: fastest for large copies, and dst is not left in the cache.
uint32_t crc32c_copy(uint32_t crc, void* dst, const void* src, size_t n) noexcept;

// The portable table-driven version (always available; used to cross-check).
uint32_t crc32c_extend_sw(uint32_t crc, const void* data, size_t n) noexcept;

// Whether crc32c_extend uses the CPU's CRC instruction.
bool crc32c_hardware() noexcept;

// CRC of A followed by B, from crc(A), crc(B) and len(B) (zlib's GF(2) method, O(log len)).
uint32_t crc32c_combine(uint32_t crc_a, uint32_t crc_b, uint64_t len_b) noexcept;

}  // namespace recoverkit
