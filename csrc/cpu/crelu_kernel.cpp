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
// pass's memory traffic. Outputs the cache can hold stay there instead
// (streaming_bytes()); fresh pages get huge-page advice from this size on.
constexpr int64_t kLargeOutputBytes = int64_t{8} << 20;

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

// The size of CPU 0's highest-level data cache as sysfs reports it (e.g.
// "32768K"), or 0 where it does not.
int64_t last_level_cache_bytes() {
  int64_t bytes = 0;
  int level = 0;
  for (int index = 0; index < 16; ++index) {
    const std::string dir =
        "/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(index);
    std::ifstream level_file(dir + "/level"), type_file(dir + "/type"),
        size_file(dir + "/size");
    int this_level = 0;
    std::string type;
    int64_t size = 0;
    char unit = 0;
    if (!(level_file >> this_level) || !(type_file >> type) ||
        !(size_file >> size)) {
      continue;
    }
    size_file >> unit;
    const int shift = unit == 'K'   ? 10
                      : unit == 'M' ? 20
                      : unit == 'G' ? 30
                                    : 0;
    if ((type == "Data" || type == "Unified") && this_level > level) {
      level = this_level;
      bytes = size << shift;
    }
  }
  return bytes;
}

// Outputs larger than this are streamed into resident memory. Plain stores
// win while an output stays cached for the next op (and the next call): it
// and its input must fit the last-level cache, which other cores share. On a
// VM the size the OS reports is the host's, not this VM's share of it: a
// 2-core VM that reports a 300 MB L3 writes 2 MB outputs faster with plain
// stores and 4 MB ones faster streamed. So: half the reported cache, and at
// most 4 MB per thread, which keeps 8 MB outputs of two threads in a 32 MB L3
// shared with a few other cores; 8 MB where the OS reports no cache. The
// cache size is read once, the thread count on each call.
int64_t streaming_bytes() {
  static const int64_t cache = last_level_cache_bytes();
  if (cache <= 0) {
    return kLargeOutputBytes;
  }
  constexpr int64_t kShareBytesPerThread = int64_t{4} << 20;
  return std::min(cache / 2, kShareBytesPerThread * at::get_num_threads());
}
#endif

// Called once per output before it is written; true: stream the stores
// (store_vector streams only where the ISA can).
inline bool prepare_output(void* dst, int64_t bytes) {
#if defined(__linux__)
  const int64_t streamed = streaming_bytes();
  if (bytes <= streamed && bytes < kLargeOutputBytes) {
    return false;
  }
  const auto begin = reinterpret_cast<uintptr_t>(dst);
  const uintptr_t end = begin + static_cast<uintptr_t>(bytes);
  // A page in the middle: an allocator's header may have touched the first.
  if (page_resident(begin + (end - begin) / 2)) {
    return bytes > streamed;
  }
  const uintptr_t huge_begin =
      (begin + kHugePageBytes - 1) & ~(kHugePageBytes - 1);
  const uintptr_t huge_end = end & ~(kHugePageBytes - 1);
  if (bytes >= kLargeOutputBytes && huge_begin < huge_end &&
      huge_pages_on_request()) {
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

// Non-temporal stores need aligned addresses: 64 bytes covers AVX-512 and AVX2.
// Along a run of whole mask blocks the alignment does not change (Block).
inline bool streamable(const void* p, bool streaming) {
  return streaming && reinterpret_cast<uintptr_t>(p) % 64 == 0;
}

// relu(v) = v < 0 ? +0 : v, keeping NaN and -0 as torch.relu does. On x86
// ATen's clamp_min is one max instruction, which returns its second operand,
// v, for NaN and for two zeros: the same bits.
template <typename Vec>
inline Vec relu(const Vec& v) {
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
  return at::vec::clamp_min(v, Vec(0));
#else
  return Vec::blendv(v, Vec(0), v < Vec(0));
#endif
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

// Splits the flat range into mask blocks and walks each task's blocks in
// memory order. Each stretch of whole blocks inside one row goes to
// `vector_run(flat, pair, block, blocks)`: its first element's flat index,
// that element's RowCursor::pair_offset(), its first mask block and the
// number of blocks. Blocks that straddle rows (inner not a multiple of 32)
// and the tail go to `scalar_block(flat, cursor, block, count)`. One task
// owns each block, so mask words never race.
template <typename VectorRun, typename ScalarBlock>
void for_each_block(int64_t numel, int64_t inner, VectorRun vector_run,
                    ScalarBlock scalar_block) {
  const int64_t blocks = (numel + kMaskBlock - 1) / kMaskBlock;
  const int64_t whole_blocks = numel / kMaskBlock;
  at::parallel_for(
      0, blocks, kGrainElements / kMaskBlock, [&](int64_t begin, int64_t end) {
        RowCursor cursor(begin * kMaskBlock, inner);
        int64_t block = begin;
        while (block < end) {
          const int64_t flat = block * kMaskBlock;
          const int64_t run = std::min({(inner - cursor.r) / kMaskBlock,
                                        end - block, whole_blocks - block});
          if (run > 0) {
            vector_run(flat, cursor.pair_offset(), block, run);
            cursor.advance(run * kMaskBlock);
            block += run;
          } else {
            const int64_t count = std::min(kMaskBlock, numel - flat);
            scalar_block(flat, cursor, block, count);
            cursor.advance(count);
            ++block;
          }
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
  // Whole blocks keep an address's alignment for streaming (streamable).
  static_assert(kMaskBlock * sizeof(scalar_t) % 64 == 0);

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

  // streaming: non-temporal stores; p is then streamable().
  void store(scalar_t* p, bool streaming) const {
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
    alignas(64) static constexpr auto lane_bits = [] {
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

// The vector runs take their pointers and flags as arguments: the compiler
// keeps them in registers, where state captured by reference would be
// reloaded after every vector store (those may alias anything).

// `blocks` whole blocks of one row: x -> pos = relu(x), neg = relu(-x), and
// their mask words when kMask.
template <typename scalar_t, bool kMask>
void forward_run(const scalar_t* x, scalar_t* pos, scalar_t* neg,
                 uint32_t* mask, int64_t blocks, bool stream_pos,
                 bool stream_neg) {
  using B = Block<scalar_t>;
  using AccVec = typename B::AccVec;
  const AccVec zero(0);
  for (int64_t b = 0; b < blocks; ++b) {
    B in, p, n;
    in.load(x + b * kMaskBlock);
    uint32_t pos_bits = 0, neg_bits = 0;
    for (int k = 0; k < B::kVecs; ++k) {
      const AccVec v = in.v[k];
      p.v[k] = relu(v);
      n.v[k] = relu(v.neg());
      if constexpr (kMask) {
        // zero_mask() has a bit per lane whose comparison was false.
        pos_bits |= static_cast<uint32_t>((v <= zero).zero_mask())
                    << (k * B::kLanes);
        neg_bits |= static_cast<uint32_t>((v >= zero).zero_mask())
                    << (k * B::kLanes);
      }
    }
    p.store(pos + b * kMaskBlock, stream_pos);
    n.store(neg + b * kMaskBlock, stream_neg);
    if constexpr (kMask) {
      mask[2 * b] = pos_bits;
      mask[2 * b + 1] = neg_bits;
    }
  }
}

template <typename scalar_t>
void forward(const scalar_t* x, scalar_t* out, uint32_t* mask, int64_t numel,
             int64_t inner) {
  const bool streaming =
      prepare_output(out, 2 * numel * int64_t{sizeof(scalar_t)});
  for_each_block(
      numel, inner,
      [&](int64_t flat, int64_t pair, int64_t block, int64_t blocks) {
        scalar_t* pos = out + pair;
        scalar_t* neg = pos + inner;
        const bool stream_pos = streamable(pos, streaming);
        const bool stream_neg = streamable(neg, streaming);
        if (mask != nullptr) {
          forward_run<scalar_t, true>(x + flat, pos, neg, mask + 2 * block,
                                      blocks, stream_pos, stream_neg);
        } else {
          forward_run<scalar_t, false>(x + flat, pos, neg, nullptr, blocks,
                                       stream_pos, stream_neg);
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

// `blocks` whole blocks of one row: the two halves of grad_out -> grad_x.
template <typename scalar_t>
void backward_run(const scalar_t* g_pos, const scalar_t* g_neg,
                  const uint32_t* mask, scalar_t* grad_x, int64_t blocks,
                  bool streaming) {
  using B = Block<scalar_t>;
  using AccVec = typename B::AccVec;
  const AccVec zero(0);
  for (int64_t b = 0; b < blocks; ++b) {
    B g1, g2, result;
    g1.load(g_pos + b * kMaskBlock);
    g2.load(g_neg + b * kMaskBlock);
    const uint32_t pos_bits = mask[2 * b];
    const uint32_t neg_bits = mask[2 * b + 1];
    for (int k = 0; k < B::kVecs; ++k) {
      const AccVec t1 = AccVec::blendv(zero, g1.v[k], B::lanes_of(pos_bits, k));
      const AccVec t2 = AccVec::blendv(zero, g2.v[k], B::lanes_of(neg_bits, k));
      result.v[k] = t1 + t2.neg();
    }
    result.store(grad_x + b * kMaskBlock, streaming);
  }
}

template <typename scalar_t>
void backward(const scalar_t* grad_out, const uint32_t* mask, scalar_t* grad_x,
              int64_t numel, int64_t inner) {
  using acc_t = typename Block<scalar_t>::acc_t;
  const bool streaming =
      prepare_output(grad_x, numel * int64_t{sizeof(scalar_t)});
  for_each_block(
      numel, inner,
      [&](int64_t flat, int64_t pair, int64_t block, int64_t blocks) {
        const scalar_t* src = grad_out + pair;
        backward_run(src, src + inner, mask + 2 * block, grad_x + flat, blocks,
                     streamable(grad_x + flat, streaming));
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

// `blocks` whole blocks of one row: grad_grad_x -> the two halves of out.
template <typename scalar_t>
void backward_backward_run(const scalar_t* g_in, const uint32_t* mask,
                           scalar_t* pos, scalar_t* neg, int64_t blocks,
                           bool stream_pos, bool stream_neg) {
  using B = Block<scalar_t>;
  using AccVec = typename B::AccVec;
  const AccVec zero(0);
  for (int64_t b = 0; b < blocks; ++b) {
    B g, p, n;
    g.load(g_in + b * kMaskBlock);
    const uint32_t pos_bits = mask[2 * b];
    const uint32_t neg_bits = mask[2 * b + 1];
    for (int k = 0; k < B::kVecs; ++k) {
      p.v[k] = AccVec::blendv(zero, g.v[k], B::lanes_of(pos_bits, k)) + zero;
      n.v[k] =
          AccVec::blendv(zero, g.v[k].neg(), B::lanes_of(neg_bits, k)) + zero;
    }
    p.store(pos + b * kMaskBlock, stream_pos);
    n.store(neg + b * kMaskBlock, stream_neg);
  }
}

template <typename scalar_t>
void backward_backward(const scalar_t* grad_grad_x, const uint32_t* mask,
                       scalar_t* out, int64_t numel, int64_t inner) {
  using acc_t = typename Block<scalar_t>::acc_t;
  const bool streaming =
      prepare_output(out, 2 * numel * int64_t{sizeof(scalar_t)});
  for_each_block(
      numel, inner,
      [&](int64_t flat, int64_t pair, int64_t block, int64_t blocks) {
        scalar_t* pos = out + pair;
        scalar_t* neg = pos + inner;
        backward_backward_run(grad_grad_x + flat, mask + 2 * block, pos, neg,
                              blocks, streamable(pos, streaming),
                              streamable(neg, streaming));
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
