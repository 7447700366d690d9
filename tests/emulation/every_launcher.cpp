// Every CUDA launcher once or more on small odd shapes, over the emulated kernels (cuda_emulation.h),
// each buffer a heap allocation of exactly the size the launch may touch. Built twice:
// - with -fsanitize=thread, ThreadSanitizer reports any two threads touching the same shared or global
//   memory without a barrier between them (a missing __syncthreads, two threads writing one output):
//   a CPU stand-in for compute-sanitizer's racecheck; exit status 66 when it found a race;
// - with -fsanitize=address, AddressSanitizer aborts on any read or write past a buffer's end, also a
//   read whose value no output uses (which the guard margins of the emulated tests cannot see): a CPU
//   stand-in for memcheck.
// Values are not checked here (the emulated tests do that).
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <tuple>
#include <utility>
#include <vector>

extern "C" {
void emu_quantize_nf4(const void*, int, uint8_t*, float*, int64_t, int);
void emu_double_quant(const float*, const float*, const float*, uint8_t*, float*, int64_t, int);
void emu_dequantize_nf4(const uint8_t*, const float*, const uint8_t*, const float*, const float*, const float*, int,
                        void*, int64_t, int, int);
void emu_nf4_gemv(const void*, int64_t, const uint8_t*, const float*, const uint8_t*, const float*, const float*,
                  const float*, int, const void*, void*, int64_t, int64_t, int64_t, int, int);
void emu_merge(void*, const double*, const double*, int64_t, int64_t, int64_t, double, double, int);
void emu_merge_nf4(const uint8_t*, const float*, const uint8_t*, const float*, const float*, const float*, int, int,
                   const double*, const double*, int64_t, int64_t, int64_t, double, uint8_t*, float*);
void emu_dropout(const void*, void*, int64_t, double, uint64_t, int);
int emu_lora_forward(const void*, int, const float*, const float*, const void*, int, float*, void*, int64_t, int64_t,
                     int64_t, int64_t, float, double, uint64_t, int64_t, const float*, const float*);
int emu_column_dots(const void*, const void*, int, float*, int64_t, int64_t, int64_t);
int emu_column_dot_splits(int64_t, int64_t, int64_t);
int emu_lora_backward(const void*, int, const void*, int, const float*, const float*, const float*, float*, float*,
                      float*, void*, const void*, int64_t, int64_t, int64_t, int64_t, float, double, uint64_t,
                      int64_t);
void emu_set_tensor_cores(int);
int emu_multi_lora(const void*, int, void*, int, const int64_t*, const int32_t*, const float* const*,
                   const float* const*, const int64_t*, const float*, float*, int64_t, int64_t, int64_t, int64_t,
                   int64_t, int64_t, int64_t, int);
}

namespace {

constexpr int kF32 = 0, kBF16 = 2;

std::vector<float> values(size_t n, int mod) {
  std::vector<float> v(n);
  for (size_t i = 0; i < n; ++i) v[i] = static_cast<float>(static_cast<int>(i % mod) - mod / 2) / mod;
  return v;
}

// The bf16 bits of values(n, mod), truncated.
std::vector<uint16_t> bf16_values(size_t n, int mod) {
  const auto v = values(n, mod);
  std::vector<uint16_t> out(n);
  for (size_t i = 0; i < n; ++i) {
    uint32_t bits;
    std::memcpy(&bits, &v[i], sizeof(bits));
    out[i] = static_cast<uint16_t>(bits >> 16);
  }
  return out;
}

// A weight of rows x cols quantized (blocksize 64) into exact-size buffers, with its double-quantized scales.
struct Quantized {
  std::vector<uint8_t> packed, qabsmax;
  std::vector<float> absmax, nested;
};

const std::vector<float> kCode = [] {
  std::vector<float> code(256);
  for (int i = 0; i < 256; ++i) code[i] = -1.0f + 2.0f * i / 255.0f;  // sorted, as the map is
  return code;
}();
const std::vector<float> kOffset = {0.5f};

Quantized quantized(int64_t n) {
  const auto w = values(n, 13);
  Quantized q{std::vector<uint8_t>((n + 1) / 2), {}, std::vector<float>((n + 63) / 64), {}};
  emu_quantize_nf4(w.data(), kF32, q.packed.data(), q.absmax.data(), n, 6);
  const int64_t nb = static_cast<int64_t>(q.absmax.size());
  q.qabsmax.resize(nb);
  q.nested.resize((nb + 255) / 256);
  emu_double_quant(q.absmax.data(), kOffset.data(), kCode.data(), q.qabsmax.data(), q.nested.data(), nb, 8);
  return q;
}

}  // namespace

int main() {
  // NF4: quantize 40 x 96 + 17 (a partial last block), double quant, both dequant paths (the bytewise
  // one from an unaligned start, the buffers' ends exact).
  const int64_t n = 40 * 96 + 17;
  const Quantized q = quantized(n);
  {
    std::vector<float> out(n);
    emu_dequantize_nf4(q.packed.data(), q.absmax.data(), nullptr, nullptr, nullptr, nullptr, 8, out.data(), n, 6, kF32);
    std::vector<float> rest(n - 1);  // elements 2.. of the weight: its bytes from the second on
    emu_dequantize_nf4(q.packed.data() + 1, nullptr, q.qabsmax.data(), q.nested.data(), kCode.data(),
                       kOffset.data(), 8, rest.data(), n - 1, 6, kF32);
  }
  // GEMV: vector path (K = 96) with tiles of 4 rows over double-quantized scales, scalar path (K = 100)
  // with one row and a bias; x is M rows of ldx.
  for (const auto [M, N, K, nested] : {std::tuple<int64_t, int64_t, int64_t, bool>{5, 9, 96, true},
                                       {1, 7, 100, false}}) {
    const Quantized w = quantized(N * K);
    const auto x = values(M * K, 7), bias = values(N, 5);
    std::vector<float> y(M * N);
    emu_nf4_gemv(x.data(), K, w.packed.data(), nested ? nullptr : w.absmax.data(),
                 nested ? w.qabsmax.data() : nullptr, nested ? w.nested.data() : nullptr,
                 nested ? kCode.data() : nullptr, nested ? kOffset.data() : nullptr, 8,
                 nested ? nullptr : bias.data(), y.data(), M, N, K, 6, kF32);
  }
  // Merges: dense (rows and columns ragged) and NF4.
  const int64_t d = 19, k = 192, r = 5;
  {
    std::vector<double> A(r * k, 0.01), B(d * r, 0.02);
    auto W = values(d * k, 9);
    emu_merge(W.data(), A.data(), B.data(), d, k, r, 0.5, 1.0, kF32);
    const Quantized w = quantized(d * k);
    std::vector<uint8_t> packed_out((d * k + 1) / 2);
    std::vector<float> absmax_out((d * k + 63) / 64);
    emu_merge_nf4(w.packed.data(), nullptr, w.qabsmax.data(), w.nested.data(), kCode.data(), kOffset.data(), 8, 6,
                  A.data(), B.data(), d * k, k, r, 0.5, packed_out.data(), absmax_out.data());
  }
  {
    const auto x = values(1001, 11);
    std::vector<float> out(1001);
    emu_dropout(x.data(), out.data(), 1001, 0.3, 5, kF32);
  }
  // LoRA: r = 12 over 1030 tokens (narrow tiles; dB and dA split K in two), r = 80 over 70 tokens
  // (two wide column tiles).
  for (const auto [M, rank] : {std::pair<int64_t, int64_t>{1030, 12}, {70, 80}}) {
    const int64_t K = 36, N = 20;
    const auto xl = values(M * K, 11), base = values(M * N, 5), dy = values(M * N, 3), dx_base = values(M * K, 13);
    const auto A32 = values(rank * K, 7), B32 = values(N * rank, 9);
    std::vector<float> T(M * rank), yl(M * N), dT(M * rank), dB(N * rank), dAt(K * rank), dx(M * K);
    emu_lora_forward(xl.data(), kF32, A32.data(), B32.data(), base.data(), kF32, T.data(), yl.data(), M, K, N, rank,
                     1.5f, 0.2, 9, 264, nullptr, nullptr);
    emu_lora_backward(dy.data(), kF32, xl.data(), kF32, A32.data(), B32.data(), T.data(), dT.data(), dB.data(),
                      dAt.data(), dx.data(), dx_base.data(), M, K, N, rank, 1.5f, 0.2, 9, 264);
    // bf16 activations on a GPU with bf16 mma: T, dT, dB and dA^T on the tensor-core kernel
    const auto xb = bf16_values(M * K, 11), baseb = bf16_values(M * N, 5), dyb = bf16_values(M * N, 3);
    std::vector<uint16_t> yb(M * N), dxb(M * K);
    emu_set_tensor_cores(1);
    emu_lora_forward(xb.data(), kBF16, A32.data(), B32.data(), baseb.data(), kBF16, T.data(), yb.data(), M, K, N,
                     rank, 1.5f, 0.2, 9, 264, nullptr, nullptr);
    emu_lora_backward(dyb.data(), kBF16, xb.data(), kBF16, A32.data(), B32.data(), T.data(), dT.data(), dB.data(),
                      dAt.data(), dxb.data(), nullptr, M, K, N, rank, 1.5f, 0.2, 9, 264);
    emu_set_tensor_cores(0);
  }
  // DoRA: the forward with g and the bias in y's epilogue (fp32 y; bf16 y with g alone), N = 21 ragged, and
  // the column dots over 1030 rows, cut in row slices (bf16 and fp32).
  {
    const int64_t M = 1030, K = 36, N = 21, rank = 12;
    const auto xl = values(M * K, 11), base = values(M * N, 5), A32 = values(rank * K, 7), B32 = values(N * rank, 9);
    const auto g = values(N, 4), bias = values(N, 3);
    std::vector<float> T(M * rank), yl(M * N);
    emu_lora_forward(xl.data(), kF32, A32.data(), B32.data(), base.data(), kF32, T.data(), yl.data(), M, K, N, rank,
                     1.5f, 0.0, 0, 264, g.data(), bias.data());
    const auto xb = bf16_values(M * K, 11), baseb = bf16_values(M * N, 5), dyb = bf16_values(M * N, 3);
    std::vector<uint16_t> yb(M * N);
    emu_lora_forward(xb.data(), kBF16, A32.data(), B32.data(), baseb.data(), kBF16, T.data(), yb.data(), M, K, N,
                     rank, 1.5f, 0.0, 0, 264, g.data(), nullptr);
    std::vector<float> partial(static_cast<size_t>(emu_column_dot_splits(M, N, 264)) * N);
    emu_column_dots(dyb.data(), baseb.data(), kBF16, partial.data(), M, N, 264);
    emu_column_dots(base.data(), base.data(), kF32, partial.data(), M, N, 264);
  }
  // Mixed-adapter batch: 80 rows, 70 of them with an adapter (ranks 5, 0 and 20), one adapter's run a
  // full tile of 64 plus a tile of 2; 70 output columns (two column tiles); K = 520 in two slices.
  {
    const int64_t M = 80, K = 520, N = 70, r_max = 20;
    const int64_t ranks[3] = {5, 0, 20};
    const float scales[3] = {0.5f, 1.0f, 2.0f};
    std::vector<int64_t> rows;
    for (int64_t i = 0; i < 70; ++i) rows.push_back((i * 7) % M);  // distinct: 7 is prime to 80
    const std::vector<int32_t> tiles = {2, 0, 64, 2, 64, 2, 0, 66, 3, 1, 69, 1};
    const auto x = values(M * K, 11), A0 = values(5 * K, 7), B0 = values(N * 5, 9), A2 = values(20 * K, 5),
               B2 = values(N * 20, 3);
    const float* A[3] = {A0.data(), nullptr, A2.data()};
    const float* B[3] = {B0.data(), nullptr, B2.data()};
    auto y = values(M * N, 13);
    std::vector<float> T(2 * rows.size() * r_max);
    emu_multi_lora(x.data(), kF32, y.data(), kF32, rows.data(), tiles.data(), A, B, ranks, scales, T.data(), M, K, N,
                   static_cast<int64_t>(rows.size()), 4, 3, r_max, 2);
    const auto xb = bf16_values(M * K, 11);
    auto yb = bf16_values(M * N, 13);
    emu_multi_lora(xb.data(), kBF16, yb.data(), kBF16, rows.data(), tiles.data(), A, B, ranks, scales, T.data(), M, K,
                   N, static_cast<int64_t>(rows.size()), 4, 3, r_max, 2);
  }
  std::printf("every_launcher: done\n");
  return 0;
}
