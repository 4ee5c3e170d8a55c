// Fused CPU kernels. The build compiles this file once per CPU capability
// (DEFAULT, and AVX2 and AVX512 on x86-64), each time with -DCPU_CAPABILITY=X
// and that ISA's compiler flags, as ATen does for its own kernels: without
// them at::vec::Vectorized is plain scalar code. crelu_cpu.cpp picks one.
//
// Napkin math per input element: forward reads 1 and writes 2 (+ 2 mask bits);
// backward reads 2 (+ 2 bits) and writes 1. The work is memory bound, so each
// pass touches every byte once, in memory order, in blocks of 32 elements
// (one mask block). A block that lies inside one row of the [outer, inner]
// plan is done with ATen's Vectorized; blocks that straddle rows (inner not a
// multiple of 32) and the tail take the scalar path.

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <string>
#include <type_traits>

#if defined(__linux__)
#include <sys/mman.h>
#include <unistd.h>
#endif

#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>
#define CRELU_EXT_STREAMING_STORES 1
#endif

#include "../crelu.h"

namespace crelu_ext::cpu {
inline namespace CPU_CAPABILITY {

using at::vec::Vectorized;

// Each parallel task gets at least this many elements, so the thread pool's
// overhead stays small next to the memory traffic.
constexpr int64_t kGrainElements = 1 << 15;

// Large outputs are written with non-temporal stores, which skip reading each
// destination line before overwriting it: that read is a third of a forward
// pass's memory traffic. Smaller outputs stay in cache for the next op.
constexpr int64_t kStreamingBytes = int64_t{8} << 20;

// Streaming pays only on pages that are already mapped. A fresh mmap (glibc
// serves allocations over 32 MB so) faults on every first touch, the OS zeroes
// the page through the cache, and streaming over it then costs more than
// plain stores. Forward of (64, 64, 56, 56) float32, a 100 MB output, on a
// 2-core x86 VM: into fresh pages 36 ms streamed against 25 ms
// plain; into reused memory (jemalloc, tcmalloc, glibc below its mmap
// threshold) 3.7 ms streamed against 6.7 ms plain.
//
// Fresh pages are where the time goes, one fault per 4 KB page. The op owns
// its output, so where the OS gives transparent huge pages only on request
// (THP mode "madvise", the common default) it asks for them on the output's
// 2 MB-aligned interior: one fault per 2 MB, the speed torch reaches with
// THP_MEM_ALLOC_ENABLE=1 (3.5x on that forward). Resident (reused) memory
// and small outputs skip all of this.
#if defined(__linux__)
constexpr uintptr_t kHugePageBytes = uintptr_t{2} << 20;

// Whether the OS gives huge pages only to memory advised so; read once.
bool huge_pages_on_request() {
  static const bool on_request = [] {
    std::ifstream mode("/sys/kernel/mm/transparent_hugepage/enabled");
    std::string line;
    return std::getline(mode, line) &&
           line.find("[madvise]") != std::string::npos;
  }();
  return on_request;
}

bool page_resident(uintptr_t address) {
  static const auto page = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
  unsigned char resident = 0;
  return mincore(reinterpret_cast<void*>(address & ~(page - 1)), page,
                 &resident) == 0 &&
         (resident & 1) != 0;
}
#endif

// Called once per output before it is written; true: stream the stores
// (store_vector streams only where the ISA can).
inline bool prepare_output(void* dst, int64_t bytes) {
#if defined(__linux__)
  if (bytes < kStreamingBytes) {
    return false;
  }
  const auto begin = reinterpret_cast<uintptr_t>(dst);
  const uintptr_t end = begin + static_cast<uintptr_t>(bytes);
  // A page in the middle: an allocator's header may have touched the first.
  if (page_resident(begin + (end - begin) / 2)) {
    return true;
  }
  const uintptr_t huge_begin =
      (begin + kHugePageBytes - 1) & ~(kHugePageBytes - 1);
  const uintptr_t huge_end = end & ~(kHugePageBytes - 1);
  if (huge_begin < huge_end && huge_pages_on_request()) {
    // Advice only: where it is refused the pages stay small.
    madvise(reinterpret_cast<void*>(huge_begin), huge_end - huge_begin,
            MADV_HUGEPAGE);
  }
  return false;
#else
  (void)dst;
  (void)bytes;
  return false;
#endif
}

template <typename T>
inline void store_vector(T* p, const Vectorized<T>& v, bool streaming) {
#if defined(CPU_CAPABILITY_AVX512)
  if (streaming) {
    __m512i bits;
    std::memcpy(&bits, &v, sizeof(bits));
    _mm512_stream_si512(reinterpret_cast<__m512i*>(p), bits);
    return;
  }
#elif defined(CPU_CAPABILITY_AVX2)
  if (streaming) {
    __m256i bits;
    std::memcpy(&bits, &v, sizeof(bits));
    _mm256_stream_si256(reinterpret_cast<__m256i*>(p), bits);
    return;
  }
#endif
  v.store(p);
}

// A position (o, r) in the [outer, inner] plan that walks in memory order.
struct RowCursor {
  int64_t o;
  int64_t r;
  int64_t inner;

  RowCursor(int64_t flat, int64_t inner_)
      : o(flat / inner_), r(flat % inner_), inner(inner_) {}

  void advance(int64_t n) {
    r += n;
    while (r >= inner) {
      r -= inner;
      ++o;
    }
  }
  // Offset of the relu(x) half of this element in the [outer, 2, inner]
  // tensor; the relu(-x) half is `inner` further on.
  int64_t pair_offset() const { return o * 2 * inner + r; }
};

// Splits the flat range into mask blocks and hands each block to
// `vector_block(flat, cursor, block)` when it is a whole block inside one row,
// else to `scalar_block(flat, cursor, block, count)`. One task owns each
// block, so mask words never race.
template <typename VectorBlock, typename ScalarBlock>
void for_each_block(int64_t numel, int64_t inner, VectorBlock vector_block,
                    ScalarBlock scalar_block) {
  const int64_t blocks = (numel + kMaskBlock - 1) / kMaskBlock;
  at::parallel_for(
      0, blocks, kGrainElements / kMaskBlock, [&](int64_t begin, int64_t end) {
        RowCursor cursor(begin * kMaskBlock, inner);
        for (int64_t block = begin; block < end; ++block) {
          const int64_t flat = block * kMaskBlock;
          const int64_t count = std::min(kMaskBlock, numel - flat);
          if (count == kMaskBlock && cursor.r + kMaskBlock <= inner) {
            vector_block(flat, cursor, block);
          } else {
            scalar_block(flat, cursor, block, count);
          }
          cursor.advance(count);
        }
#if defined(CRELU_EXT_STREAMING_STORES)
        _mm_sfence();  // order this task's streaming stores before the join
#endif
      });
}

// A mask block of 32 elements as vectors of the accumulation type (float for
// 16-bit types: the conversions are exact, so the results are too).
template <typename scalar_t>
struct Block {
  using acc_t = at::opmath_type<scalar_t>;
  using AccVec = Vectorized<acc_t>;
  using LaneIntVec = Vectorized<at::vec::int_same_size_t<acc_t>>;
  static constexpr int kLanes = AccVec::size();
  static constexpr int kVecs = kMaskBlock / kLanes;
  static_assert(kMaskBlock % kLanes == 0);

  AccVec v[kVecs];

  void load(const scalar_t* p) {
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      for (int k = 0; k < kVecs; ++k) {
        v[k] = AccVec::loadu(p + k * kLanes);
      }
    } else {
      for (int k = 0; k < kVecs; k += 2) {
        auto [lo, hi] = at::vec::convert_to_float<scalar_t>(
            Vectorized<scalar_t>::loadu(p + k * kLanes));
        v[k] = lo;
        v[k + 1] = hi;
      }
    }
  }

  // streaming: non-temporal stores, where p is aligned for them.
  void store(scalar_t* p, bool streaming) const {
    streaming = streaming && reinterpret_cast<uintptr_t>(p) % 64 == 0;
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      for (int k = 0; k < kVecs; ++k) {
        store_vector(p + k * kLanes, v[k], streaming);
      }
    } else {
      for (int k = 0; k < kVecs; k += 2) {
        store_vector(p + k * kLanes,
                     at::vec::convert_from_float<scalar_t>(v[k], v[k + 1]),
                     streaming);
      }
    }
  }

  // All-ones lanes where bit (k * kLanes + lane) of `bits` is set.
  static AccVec lanes_of(uint32_t bits, int k) {
    using lane_int = at::vec::int_same_size_t<acc_t>;
    alignas(64) static const auto lane_bits = [] {
      std::array<lane_int, kLanes> b{};
      for (int lane = 0; lane < kLanes; ++lane) {
        b[lane] = lane_int(1) << lane;
      }
      return b;
    }();
    const LaneIntVec word(static_cast<lane_int>(bits >> (k * kLanes)));
    const LaneIntVec set =
        (word & LaneIntVec::loadu(lane_bits.data())) != LaneIntVec(0);
    return at::vec::cast<acc_t>(set);
  }
};

template <typename scalar_t>
void forward(const scalar_t* x, scalar_t* out, uint32_t* mask, int64_t numel,
             int64_t inner) {
  using B = Block<scalar_t>;
  using AccVec = typename B::AccVec;
  const bool streaming =
      prepare_output(out, 2 * numel * int64_t{sizeof(scalar_t)});
  for_each_block(
      numel, inner,
      [&](int64_t flat, const RowCursor& cursor, int64_t block) {
        B in, pos, neg;
        in.load(x + flat);
        const AccVec zero(0);
        uint32_t pos_bits = 0, neg_bits = 0;
        for (int k = 0; k < B::kVecs; ++k) {
          const AccVec v = in.v[k];
          // blendv(a, b, m) = m ? b : a
          pos.v[k] = AccVec::blendv(v, zero, v < zero);
          neg.v[k] = AccVec::blendv(v.neg(), zero, v > zero);
          if (mask != nullptr) {
            // zero_mask() has a bit per lane whose comparison was false.
            pos_bits |= static_cast<uint32_t>((v <= zero).zero_mask())
                        << (k * B::kLanes);
            neg_bits |= static_cast<uint32_t>((v >= zero).zero_mask())
                        << (k * B::kLanes);
          }
        }
        scalar_t* dst = out + cursor.pair_offset();
        pos.store(dst, streaming);
        neg.store(dst + inner, streaming);
        if (mask != nullptr) {
          mask[2 * block] = pos_bits;
          mask[2 * block + 1] = neg_bits;
        }
      },
      [&](int64_t flat, RowCursor cursor, int64_t block, int64_t count) {
        uint32_t pos_bits = 0, neg_bits = 0;
        for (int64_t e = 0; e < count; ++e, cursor.advance(1)) {
          const scalar_t v = x[flat + e];
          scalar_t* dst = out + cursor.pair_offset();
          dst[0] = relu_pos(v);
          dst[inner] = relu_neg(v);
          pos_bits |= static_cast<uint32_t>(passes_pos(v)) << e;
          neg_bits |= static_cast<uint32_t>(passes_neg(v)) << e;
        }
        if (mask != nullptr) {
          mask[2 * block] = pos_bits;
          mask[2 * block + 1] = neg_bits;
        }
      });
}

template <typename scalar_t>
void backward(const scalar_t* grad_out, const uint32_t* mask, scalar_t* grad_x,
              int64_t numel, int64_t inner) {
  using B = Block<scalar_t>;
  using AccVec = typename B::AccVec;
  using acc_t = typename B::acc_t;
  const bool streaming =
      prepare_output(grad_x, numel * int64_t{sizeof(scalar_t)});
  for_each_block(
      numel, inner,
      [&](int64_t flat, const RowCursor& cursor, int64_t block) {
        B g1, g2, result;
        const scalar_t* src = grad_out + cursor.pair_offset();
        g1.load(src);
        g2.load(src + inner);
        const uint32_t pos_bits = mask[2 * block];
        const uint32_t neg_bits = mask[2 * block + 1];
        const AccVec zero(0);
        for (int k = 0; k < B::kVecs; ++k) {
          const AccVec t1 =
              AccVec::blendv(zero, g1.v[k], B::lanes_of(pos_bits, k));
          const AccVec t2 =
              AccVec::blendv(zero, g2.v[k], B::lanes_of(neg_bits, k));
          result.v[k] = t1 + t2.neg();
        }
        result.store(grad_x + flat, streaming);
      },
      [&](int64_t flat, RowCursor cursor, int64_t block, int64_t count) {
        const uint32_t pos_bits = mask[2 * block];
        const uint32_t neg_bits = mask[2 * block + 1];
        for (int64_t e = 0; e < count; ++e, cursor.advance(1)) {
          const scalar_t* src = grad_out + cursor.pair_offset();
          grad_x[flat + e] = static_cast<scalar_t>(crelu_grad<acc_t>(
              src[0], src[inner], (pos_bits >> e) & 1u, (neg_bits >> e) & 1u));
        }
      });
}

template <typename scalar_t>
void backward_backward(const scalar_t* grad_grad_x, const uint32_t* mask,
                       scalar_t* out, int64_t numel, int64_t inner) {
  using B = Block<scalar_t>;
  using AccVec = typename B::AccVec;
  using acc_t = typename B::acc_t;
  const bool streaming =
      prepare_output(out, 2 * numel * int64_t{sizeof(scalar_t)});
  for_each_block(
      numel, inner,
      [&](int64_t flat, const RowCursor& cursor, int64_t block) {
        B g, pos, neg;
        g.load(grad_grad_x + flat);
        const uint32_t pos_bits = mask[2 * block];
        const uint32_t neg_bits = mask[2 * block + 1];
        const AccVec zero(0);
        for (int k = 0; k < B::kVecs; ++k) {
          pos.v[k] =
              AccVec::blendv(zero, g.v[k], B::lanes_of(pos_bits, k)) + zero;
          neg.v[k] =
              AccVec::blendv(zero, g.v[k].neg(), B::lanes_of(neg_bits, k)) +
              zero;
        }
        scalar_t* dst = out + cursor.pair_offset();
        pos.store(dst, streaming);
        neg.store(dst + inner, streaming);
      },
      [&](int64_t flat, RowCursor cursor, int64_t block, int64_t count) {
        const uint32_t pos_bits = mask[2 * block];
        const uint32_t neg_bits = mask[2 * block + 1];
        for (int64_t e = 0; e < count; ++e, cursor.advance(1)) {
          const acc_t g = grad_grad_x[flat + e];
          scalar_t* dst = out + cursor.pair_offset();
          dst[0] = static_cast<scalar_t>(
              crelu_grad_grad_pos<acc_t>(g, (pos_bits >> e) & 1u));
          dst[inner] = static_cast<scalar_t>(
              crelu_grad_grad_neg<acc_t>(g, (neg_bits >> e) & 1u));
        }
      });
}

// ---- entry points of this capability, called by crelu_cpu.cpp ----

inline uint32_t* mask_words(at::Tensor& mask) {
  return mask.defined() ? reinterpret_cast<uint32_t*>(mask.data_ptr<uint8_t>())
                        : nullptr;
}

inline const uint32_t* mask_words(const at::Tensor& mask) {
  return reinterpret_cast<const uint32_t*>(mask.const_data_ptr<uint8_t>());
}

void forward_kernel(const at::Tensor& x, const LayoutPlan& plan,
                    at::Tensor& out, at::Tensor& mask) {
  CRELU_EXT_DISPATCH_FLOATS(x.scalar_type(), "crelu_forward_cpu", [&] {
    forward(x.const_data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
            mask_words(mask), x.numel(), plan.inner);
  });
}

void backward_kernel(const at::Tensor& grad_out, const at::Tensor& mask,
                     const LayoutPlan& plan, at::Tensor& grad_x) {
  CRELU_EXT_DISPATCH_FLOATS(grad_x.scalar_type(), "crelu_backward_cpu", [&] {
    backward(grad_out.const_data_ptr<scalar_t>(), mask_words(mask),
             grad_x.data_ptr<scalar_t>(), grad_x.numel(), plan.inner);
  });
}

void backward_backward_kernel(const at::Tensor& grad_grad_x,
                              const at::Tensor& mask, const LayoutPlan& plan,
                              at::Tensor& out) {
  CRELU_EXT_DISPATCH_FLOATS(
      grad_grad_x.scalar_type(), "crelu_backward_backward_cpu", [&] {
        backward_backward(grad_grad_x.const_data_ptr<scalar_t>(),
                          mask_words(mask), out.data_ptr<scalar_t>(),
                          grad_grad_x.numel(), plan.inner);
      });
}

}  // namespace CPU_CAPABILITY
}  // namespace crelu_ext::cpu
