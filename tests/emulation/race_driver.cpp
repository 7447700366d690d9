// Every CUDA launcher once or more on small odd shapes, built with -fsanitize=thread over the
// emulated kernels (cuda_emulation.h): ThreadSanitizer then reports any two threads touching the
// same shared or global memory without a barrier between them. That covers a missing
// __syncthreads, or two threads writing one output. Values are not checked here (the emulated
// tests do that). The exit status is ThreadSanitizer's: 66 when it found a race.
#include <cstdint>
#include <cstdio>
#include <cstring>
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
                     int64_t, int64_t, float, double, uint64_t, int64_t);
int emu_lora_backward(const void*, int, const void*, int, const float*, const float*, const float*, float*, float*,
                      float*, void*, const void*, int64_t, int64_t, int64_t, int64_t, float, double, uint64_t,
                      int64_t);
void emu_set_tensor_cores(int);
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

}  // namespace

int main() {
  // NF4: quantize 40 x 96 (blocksize 64, a partial last block), double quant, both dequant paths.
  const int64_t n = 40 * 96 + 17;
  const auto w = values(n, 13);
  std::vector<uint8_t> packed((n + 1) / 2 + 1);
  std::vector<float> absmax((n + 63) / 64);
  emu_quantize_nf4(w.data(), kF32, packed.data(), absmax.data(), n, 6);
  const int64_t nb = static_cast<int64_t>(absmax.size());
  std::vector<float> code = values(256, 256), offset = {0.5f}, nested((nb + 255) / 256);
  for (int i = 0; i < 256; ++i) code[i] = -1.0f + 2.0f * i / 255.0f;  // sorted, as the map is
  std::vector<uint8_t> qabsmax(nb);
  emu_double_quant(absmax.data(), offset.data(), code.data(), qabsmax.data(), nested.data(), nb, 8);
  std::vector<float> out(n + 1);
  emu_dequantize_nf4(packed.data(), absmax.data(), nullptr, nullptr, nullptr, nullptr, 8, out.data(), n, 6, kF32);
  emu_dequantize_nf4(packed.data() + 1, nullptr, qabsmax.data(), nested.data(), code.data(), offset.data(), 8,
                     out.data() + 1, n - 2, 6, kF32);  // unaligned: bytewise
  // GEMV: vector path (K = 96) with tiles of 4 rows, scalar path (K = 100) with one row.
  const auto x = values(5 * 100, 7);
  std::vector<float> y(5 * 300);
  emu_nf4_gemv(x.data(), 96, packed.data(), absmax.data(), nullptr, nullptr, nullptr, nullptr, 8, nullptr, y.data(), 5,
               9, 96, 6, kF32);
  emu_nf4_gemv(x.data(), 100, packed.data(), absmax.data(), nullptr, nullptr, nullptr, nullptr, 8, nullptr, y.data(),
               1, 7, 100, 6, kF32);
  // Merges: dense (rows and columns ragged) and NF4, over the first d * k <= n codes of the weight.
  const int64_t d = 19, k = 192, r = 5;
  std::vector<double> A(r * k, 0.01), B(d * r, 0.02);
  auto W = values(d * k, 9);
  emu_merge(W.data(), A.data(), B.data(), d, k, r, 0.5, 1.0, kF32);
  std::vector<uint8_t> packed_out((d * k + 1) / 2);
  std::vector<float> absmax_out((d * k + 63) / 64);
  emu_merge_nf4(packed.data(), absmax.data(), nullptr, nullptr, nullptr, nullptr, 8, 6, A.data(), B.data(), d * k, k, r,
                0.5, packed_out.data(), absmax_out.data());
  emu_dropout(w.data(), out.data(), 1001, 0.3, 5, kF32);
  // LoRA: r = 12 over 1030 tokens (narrow tiles; dB and dA split K in two), r = 80 over 70 tokens
  // (two wide column tiles).
  for (const auto [M, rank] : {std::pair<int64_t, int64_t>{1030, 12}, {70, 80}}) {
    const int64_t K = 36, N = 20;
    const auto xl = values(M * K, 11), base = values(M * N, 5), dy = values(M * N, 3), dx_base = values(M * K, 13);
    const auto A32 = values(rank * K, 7), B32 = values(N * rank, 9);
    std::vector<float> T(M * rank), yl(M * N), dT(M * rank), dB(N * rank), dAt(K * rank), dx(M * K);
    emu_lora_forward(xl.data(), kF32, A32.data(), B32.data(), base.data(), kF32, T.data(), yl.data(), M, K, N, rank,
                     1.5f, 0.2, 9, 264);
    emu_lora_backward(dy.data(), kF32, xl.data(), kF32, A32.data(), B32.data(), T.data(), dT.data(), dB.data(),
                      dAt.data(), dx.data(), dx_base.data(), M, K, N, rank, 1.5f, 0.2, 9, 264);
    // bf16 activations on a GPU with bf16 mma: T, dT, dB and dA^T on the tensor-core kernel
    const auto xb = bf16_values(M * K, 11), baseb = bf16_values(M * N, 5), dyb = bf16_values(M * N, 3);
    std::vector<uint16_t> yb(M * N), dxb(M * K);
    emu_set_tensor_cores(1);
    emu_lora_forward(xb.data(), kBF16, A32.data(), B32.data(), baseb.data(), kBF16, T.data(), yb.data(), M, K, N,
                     rank, 1.5f, 0.2, 9, 264);
    emu_lora_backward(dyb.data(), kBF16, xb.data(), kBF16, A32.data(), B32.data(), T.data(), dT.data(), dB.data(),
                      dAt.data(), dxb.data(), nullptr, M, K, N, rank, 1.5f, 0.2, 9, 264);
    emu_set_tensor_cores(0);
  }
  std::printf("race_driver: done\n");
  return 0;
}
