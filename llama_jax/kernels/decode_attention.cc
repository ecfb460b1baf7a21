// One decode step's attention on a CPU, fp32: each row's query reads only the filled part of its own row of the
// KV cache (its first kv_len[b] slots), so a step costs what the sequences hold, not the cache's length or the
// longest sequence's. XLA's dot reads every slot of every row; a window bounds all rows by the longest.
//
// The arithmetic is Meta's: scores q.k / sqrt(head_dim), slots masked by position (a query at position p sees
// the slots at positions 0..p; -1 marks an empty or padding slot), a softmax, then the probabilities times v.
// An XLA FFI handler: (row, kv head) pairs are shared out between the calling thread and XLA's intra-op pool.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

typedef float Vec8 __attribute__((vector_size(32)));  // GCC/Clang vector extension: AVX, or two NEON registers

float Dot(const float* a, const float* b, int64_t n) {
  int64_t i = 0;
  float sum = 0.0f;
  if (n >= 8) {
    Vec8 acc = {};
    for (; i + 8 <= n; i += 8) {
      Vec8 x, y;
      std::memcpy(&x, a + i, sizeof(x));
      std::memcpy(&y, b + i, sizeof(y));
      acc += x * y;
    }
    for (int j = 0; j < 8; ++j) sum += acc[j];
  }
  for (; i < n; ++i) sum += a[i] * b[i];
  return sum;
}

// out[0..n) += p * x[0..n)
void Axpy(float p, const float* x, float* out, int64_t n) {
  int64_t i = 0;
  Vec8 pv = {p, p, p, p, p, p, p, p};
  for (; i + 8 <= n; i += 8) {
    Vec8 x8, o8;
    std::memcpy(&x8, x + i, sizeof(x8));
    std::memcpy(&o8, out + i, sizeof(o8));
    o8 += pv * x8;
    std::memcpy(out + i, &o8, sizeof(o8));
  }
  for (; i < n; ++i) out[i] += p * x[i];
}

struct Work {
  const float *q, *k, *v;
  const int32_t *q_pos, *kv_pos, *kv_len;
  float* out;
  int64_t B, H, G, S, D;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> finished{0};

  int64_t items() const { return B * G; }

  // Row b against kv head g, for the H / G query heads that share it (query head g * R + r, as in the model).
  void Head(int64_t b, int64_t g, std::vector<float>& scores, std::vector<int32_t>& seen) const {
    const int64_t R = H / G;
    const int64_t n = std::clamp<int64_t>(kv_len[b], 0, S);
    const int32_t position = q_pos[b];
    const float* keys = k + (b * G + g) * S * D;
    const float* values = v + (b * G + g) * S * D;
    const float* queries = q + (b * H + g * R) * D;
    float* result = out + (b * H + g * R) * D;
    std::memset(result, 0, sizeof(float) * R * D);
    seen.clear();
    for (int64_t s = 0; s < n; ++s) {
      int32_t p = kv_pos[b * S + s];
      if (p >= 0 && p <= position) seen.push_back(static_cast<int32_t>(s));
    }
    if (seen.empty()) return;  // a query that sees no key (an idle row): zeros, which nothing reads
    const int64_t m = seen.size();
    scores.resize(R * m);
    const float scale = static_cast<float>(std::sqrt(static_cast<double>(D)));
    for (int64_t j = 0; j < m; ++j) {
      const float* key = keys + seen[j] * D;
      for (int64_t r = 0; r < R; ++r) scores[r * m + j] = Dot(queries + r * D, key, D) / scale;
    }
    for (int64_t r = 0; r < R; ++r) {
      float* row = scores.data() + r * m;
      float top = *std::max_element(row, row + m);
      float total = 0.0f;
      for (int64_t j = 0; j < m; ++j) total += (row[j] = std::exp(row[j] - top));
      for (int64_t j = 0; j < m; ++j) row[j] /= total;
    }
    for (int64_t j = 0; j < m; ++j) {
      const float* value = values + seen[j] * D;
      for (int64_t r = 0; r < R; ++r) Axpy(scores[r * m + j], value, result + r * D, D);
    }
  }

  void Run() {
    std::vector<float> scores;
    std::vector<int32_t> seen;
    for (int64_t i; (i = next.fetch_add(1)) < items();) {
      Head(i / G, i % G, scores, seen);
      finished.fetch_add(1, std::memory_order_release);
    }
  }
};

ffi::Error DecodeAttentionImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                               ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::S32> q_pos, ffi::Buffer<ffi::S32> kv_pos,
                               ffi::Buffer<ffi::S32> kv_len, ffi::ResultBuffer<ffi::F32> out) {
  auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions(), od = out->dimensions();
  auto pd = kv_pos.dimensions();
  if (qd.size() != 3 || kd.size() != 4 || vd.size() != 4 || od.size() != 3 || kd[0] != qd[0] ||
      kd[3] != qd[2] || kd[1] == 0 || qd[1] % kd[1] != 0 || !std::equal(kd.begin(), kd.end(), vd.begin()) ||
      !std::equal(qd.begin(), qd.end(), od.begin()) || q_pos.element_count() != qd[0] ||
      kv_len.element_count() != qd[0] || pd.size() != 2 || pd[0] != qd[0] || pd[1] != kd[2]) {
    return ffi::Error::InvalidArgument(
        "decode_attention: expected q [B, H, D], k and v [B, G, S, D] (G divides H), q_pos [B], kv_pos [B, S], "
        "kv_len [B]");
  }
  auto work = std::make_shared<Work>();
  work->q = q.typed_data();
  work->k = k.typed_data();
  work->v = v.typed_data();
  work->q_pos = q_pos.typed_data();
  work->kv_pos = kv_pos.typed_data();
  work->kv_len = kv_len.typed_data();
  work->out = out->typed_data();
  work->B = qd[0];
  work->H = qd[1];
  work->G = kd[1];
  work->S = kd[2];
  work->D = kd[3];
  // Waking a pool thread costs microseconds: a step that reads little (a tiny model's) runs on the caller alone.
  constexpr int64_t kValuesPerThread = 1 << 16;
  int64_t values = 0;
  for (int64_t b = 0; b < work->B; ++b) values += std::clamp<int64_t>(work->kv_len[b], 0, work->S);
  values *= 2 * work->G * work->D;
  int64_t threads = std::clamp<int64_t>(values / kValuesPerThread, 1, std::max<int64_t>(1, pool.num_threads()));
  for (int64_t t = 1; t < std::min(threads, work->items()); ++t) pool.Schedule([work] { work->Run(); });
  work->Run();
  while (work->finished.load(std::memory_order_acquire) < work->items()) std::this_thread::yield();
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(LlamaJaxDecodeAttentionF32, DecodeAttentionImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
