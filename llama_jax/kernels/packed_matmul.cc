// y[M, N] = x[M, K] @ W[K, N] in fp32 on a CPU, with W packed once as [N/8, K, 8]: every 8-column strip of W
// is one contiguous run of memory, which a decode step streams at close to the machine's read bandwidth.
// XLA:CPU's GEMM reads W in its [K, N] layout, a short piece of a different page for each k.
//
// An XLA FFI handler: strips are shared out between the calling thread and XLA's intra-op thread pool.

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

typedef float Vec8 __attribute__((vector_size(32)));  // GCC/Clang vector extension: AVX, or two NEON registers

// R rows of x (row stride K) times one packed strip [K, 8] -> R rows of y (row stride N), 8 columns.
template <int R>
void Strip(const float* x, int64_t K, const float* strip, float* y, int64_t N) {
  Vec8 acc[R] = {};
  for (int64_t k = 0; k < K; ++k) {
    Vec8 w;
    std::memcpy(&w, strip + k * 8, sizeof(w));
    // 2 KiB ahead: the hardware prefetcher alone left a third of the read bandwidth unused (21 -> 27 GB/s).
    __builtin_prefetch(strip + k * 8 + 512);
    for (int r = 0; r < R; ++r) acc[r] += x[r * K + k] * w;
  }
  for (int r = 0; r < R; ++r) std::memcpy(y + r * N, &acc[r], sizeof(Vec8));
}

using StripFn = void (*)(const float*, int64_t, const float*, float*, int64_t);
constexpr StripFn kStrips[9] = {nullptr, Strip<1>, Strip<2>, Strip<3>, Strip<4>,
                                Strip<5>, Strip<6>, Strip<7>, Strip<8>};

// R rows of x times two adjacent strips (16 columns) as one 16-wide vector. With many rows (a prompt) the
// one-strip form above is bound by loading and broadcasting x, not by reading the weights: two strips per value
// of x halve that work, and on AVX-512 each product is one instruction.
typedef float Vec16 __attribute__((vector_size(64)));

template <int R>
void StripPair(const float* x, int64_t K, int64_t k0, int64_t k1, const float* strip, float* y, int64_t N) {
  Vec16 acc[R] = {};
  if (k0 > 0) {  // a later panel of k: carry on from the sums so far (the same order of additions as one pass)
    for (int r = 0; r < R; ++r) std::memcpy(&acc[r], y + r * N, sizeof(Vec16));
  }
  const float* next = strip + K * 8;
  for (int64_t k = k0; k < k1; ++k) {
    Vec8 w0, w1;
    std::memcpy(&w0, strip + k * 8, sizeof(w0));
    std::memcpy(&w1, next + k * 8, sizeof(w1));
#if defined(__clang__) || __GNUC__ >= 12
    Vec16 w = __builtin_shufflevector(w0, w1, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
#else
    Vec16 w = {w0[0], w0[1], w0[2], w0[3], w0[4], w0[5], w0[6], w0[7],
               w1[0], w1[1], w1[2], w1[3], w1[4], w1[5], w1[6], w1[7]};
#endif
    for (int r = 0; r < R; ++r) acc[r] += x[r * K + k] * w;
  }
  for (int r = 0; r < R; ++r) std::memcpy(y + r * N, &acc[r], sizeof(Vec16));
}

// Accumulators that fit the registers beside the strips' vector: 32 with AVX-512, 16 with AVX2 (two per Vec16).
#ifdef __AVX512F__
constexpr int kPairRows = 8;
#else
constexpr int kPairRows = 6;
#endif
using PairFn = void (*)(const float*, int64_t, int64_t, int64_t, const float*, float*, int64_t);
constexpr PairFn kStripPairs[] = {nullptr, StripPair<1>, StripPair<2>, StripPair<3>, StripPair<4>,
                                  StripPair<5>, StripPair<6>, StripPair<7>, StripPair<8>};
// From this many rows of x on, strips go in pairs (a decode step's few rows stream the weights either way).
constexpr int64_t kPairFromRows = 16;
// Paired strips run over k in panels of this many: a panel of two strips (16 KiB) stays in L1 while every row
// of the block passes, so the weights are read from memory once per block of rows, not once per 8 rows.
constexpr int64_t kPanel = 256;

// Rows [m0, m1) of x against strips [s0, s1): each strip is read from memory once per block of rows and
// reused from cache for each group of rows in it.
void Block(const float* x, int64_t K, const float* packed, float* y, int64_t N, int64_t M, int64_t m0,
           int64_t m1, int64_t s0, int64_t s1) {
  int64_t s = s0;
  if (M >= kPairFromRows) {
    int64_t pairs_end = s0 + (s1 - s0) / 2 * 2;
    for (int64_t k0 = 0; k0 < K; k0 += kPanel) {
      for (s = s0; s < pairs_end; s += 2) {
        for (int64_t m = m0; m < m1; m += kPairRows) {
          kStripPairs[std::min<int64_t>(kPairRows, m1 - m)](x + m * K, K, k0, std::min(K, k0 + kPanel),
                                                            packed + s * K * 8, y + m * N + s * 8, N);
        }
      }
    }
    s = pairs_end;
  }
  for (; s < s1; ++s) {
    for (int64_t m = m0; m < m1; m += 8) {
      kStrips[std::min<int64_t>(8, m1 - m)](x + m * K, K, packed + s * K * 8, y + m * N + s * 8, N);
    }
  }
}

// Work items (a block of rows x a chunk of strips) handed out by an atomic counter, so a helper thread that
// starts late (or never) only means the others take more items; the caller returns once every claimed item
// is finished.
struct Work {
  const float* x;
  const float* packed;
  float* y;
  int64_t M, K, N, strips, chunk, rows;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> finished{0};

  int64_t chunks() const { return (strips + chunk - 1) / chunk; }
  int64_t items() const { return chunks() * ((M + rows - 1) / rows); }

  void Run() {
    for (int64_t i; (i = next.fetch_add(1)) < items();) {
      int64_t m0 = i / chunks() * rows, s0 = i % chunks() * chunk;
      Block(x, K, packed, y, N, M, m0, std::min(M, m0 + rows), s0, std::min(strips, s0 + chunk));
      finished.fetch_add(1, std::memory_order_release);
    }
  }
};

ffi::Error PackedMatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> packed,
                            ffi::ResultBuffer<ffi::F32> y) {
  auto xd = x.dimensions(), pd = packed.dimensions(), yd = y->dimensions();
  if (xd.size() != 2 || pd.size() != 3 || pd[2] != 8 || pd[1] != xd[1] || yd.size() != 2 || yd[0] != xd[0] ||
      yd[1] != pd[0] * 8) {
    return ffi::Error::InvalidArgument("packed_matmul: expected x [M, K], packed [N/8, K, 8], y [M, N]");
  }
  if (xd[1] == 0) {  // an empty sum: zeros (and no division by K below)
    std::memset(y->typed_data(), 0, sizeof(float) * yd[0] * yd[1]);
    return ffi::Error::Success();
  }
  auto work = std::make_shared<Work>();
  work->x = x.typed_data();
  work->packed = packed.typed_data();
  work->y = y->typed_data();
  work->M = xd[0];
  work->K = xd[1];
  work->N = yd[1];
  work->strips = pd[0];
  // Waking a pool thread costs microseconds: a small product (a tiny model's) runs on the caller alone.
  constexpr int64_t kValuesPerThread = 1 << 16;  // 256 KiB of weights, ~10 us of streaming
  int64_t values = work->K * work->N * ((work->M + 7) / 8);
  int64_t threads = std::clamp<int64_t>(values / kValuesPerThread, 1, std::max<int64_t>(1, pool.num_threads()));
  // A few chunks per thread evens out uneven progress; more would only add counter traffic.
  work->chunk = std::max<int64_t>(1, work->strips / (4 * threads));
  // Rows per block: a block of x (~128 KiB; for paired strips, one panel of k of it) stays in L2.
  int64_t row_width = work->M >= kPairFromRows ? std::min(work->K, kPanel) : work->K;
  work->rows = std::max<int64_t>(8, (128 * 1024 / (4 * row_width)) / 8 * 8);
  for (int64_t t = 1; t < std::min(threads, work->items()); ++t) pool.Schedule([work] { work->Run(); });
  work->Run();
  while (work->finished.load(std::memory_order_acquire) < work->items()) std::this_thread::yield();
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(LlamaJaxPackedMatmulF32, PackedMatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
