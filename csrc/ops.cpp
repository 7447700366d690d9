// The one operator registry of lora_ext: every schema is defined here. Kernels register
// per device beside their code (csrc/<area>/<area>_cpu.cpp, <area>_cuda.cpp).
#include <Python.h>
#include <torch/library.h>

// `import lora_ext._C` only has to load this library so the registrations below run;
// the operators are reached through torch.ops.lora_ext, not through this module.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "lora_ext kernels, registered as torch.ops.lora_ext.*", -1, nullptr,
  };
  return PyModule_Create(&module_def);
}

TORCH_LIBRARY(lora_ext, m) {
  // NF4, bit-compatible with bitsandbytes. `packed` is uint8 of shape ((n+1)//2, 1), element 2j
  // in the high nibble; `absmax` is float32, one per block of `blocksize` consecutive elements.
  m.def("quantize_nf4(Tensor A, int blocksize) -> (Tensor packed, Tensor absmax)");
  // Double quantization of absmax: offset = mean(absmax); absmax - offset in blocks of `blocksize`
  // with the 256-entry signed dynamic map `code`, to uint8 plus a float32 absmax per block.
  m.def("double_quant(Tensor absmax, Tensor code, int blocksize) -> (Tensor qabsmax, Tensor nested_absmax, Tensor offset)");
  // Dequantize to `dtype` and `shape` in one pass; with nested_* given, `absmax` is the uint8
  // double-quantized form and is decoded inside the kernel.
  m.def(
      "dequantize_nf4(Tensor packed, Tensor absmax, int blocksize, int[] shape, ScalarType dtype, "
      "Tensor? nested_absmax=None, Tensor? nested_code=None, Tensor? offset=None, int nested_blocksize=256) -> Tensor");
  // The same into a caller's buffer (a reused workspace): shape and dtype are out's.
  m.def(
      "dequantize_nf4_out(Tensor packed, Tensor absmax, int blocksize, Tensor(a!) out, "
      "Tensor? nested_absmax=None, Tensor? nested_code=None, Tensor? offset=None, int nested_blocksize=256) -> ()");
  // y = x W^T (+ bias), W (out_features x in_features) in NF4, accumulated in fp32. Rows of x
  // (leading dims flattened) up to gemv_max_m (-1: the device's default) take the fused kernel
  // that reads the packed weight directly; more rows dequantize into a reused workspace for BLAS.
  m.def(
      "nf4_linear(Tensor x, Tensor packed, Tensor absmax, int out_features, int blocksize, Tensor? bias=None, "
      "Tensor? nested_absmax=None, Tensor? nested_code=None, Tensor? offset=None, int nested_blocksize=256, "
      "int gemv_max_m=-1) -> Tensor");
  // dx = dy W: the input gradient of nf4_linear (the NF4 weight is frozen: it has no gradient).
  m.def(
      "nf4_linear_grad_input(Tensor grad_out, Tensor packed, Tensor absmax, int in_features, int blocksize, "
      "Tensor? nested_absmax=None, Tensor? nested_code=None, Tensor? offset=None, int nested_blocksize=256) -> Tensor");

  // LoRA. dropout: x * keep / (1 - p), keep drawn by Philox4x32-10 from (seed, element index), so
  // backward regenerates the mask and CPU and CUDA drop the same elements.
  m.def("lora_dropout(Tensor x, float p, int seed) -> Tensor");
  // y = base_out + scale * (dropout(x) A^T) B^T; returns y and T = dropout(x) A^T (M x r, kept for
  // backward in place of any dropout mask or dropout(x) copy).
  m.def("lora_forward(Tensor x, Tensor base_out, Tensor A, Tensor B, float scale, float dropout_p, int seed) -> "
        "(Tensor y, Tensor T)");
  // Gradients of lora_forward's LoRA branch: (dx, dA, dB). With grad_x_base (the base layer's own
  // input gradient, dy W), dx = grad_x_base + dropout'(dT A), rounded once: the whole layer's dx.
  m.def("lora_backward(Tensor grad_y, Tensor x, Tensor T, Tensor A, Tensor B, float scale, float dropout_p, "
        "int seed, Tensor? grad_x_base=None) -> (Tensor grad_x, Tensor grad_A, Tensor grad_B)");
  // The whole layer over a frozen base, as one autograd node: y = x W^T (+ bias) + the LoRA branch,
  // -> (y, T). Its backward hands the base's dx (dy W) to lora_backward as grad_x_base, so dx is
  // written once instead of summed from two gradients. W, the NF4 state and bias get no gradient.
  m.def("lora_linear(Tensor x, Tensor weight, Tensor? bias, Tensor A, Tensor B, float scale, float dropout_p, "
        "int seed) -> (Tensor y, Tensor T)");
  m.def("lora_nf4_linear(Tensor x, Tensor packed, Tensor absmax, int out_features, int blocksize, Tensor? bias, "
        "Tensor? nested_absmax, Tensor? nested_code, Tensor? offset, int nested_blocksize, Tensor A, Tensor B, "
        "float scale, float dropout_p, int seed) -> (Tensor y, Tensor T)");

  // DoRA (PEFT's use_dora) with the per-feature scale g = m / ||W + s B A|| (detached norm) given:
  // y = g * (base_out + scale * (x A^T) B^T) + bias, rounded once; base_out = x W^T without the bias.
  // -> (y, T = x A^T). No dropout: PEFT's DoRA with dropout needs two base products (lora_ext/lora.py).
  m.def("dora_forward(Tensor x, Tensor base_out, Tensor A, Tensor B, Tensor g, Tensor? bias, float scale) -> "
        "(Tensor y, Tensor T)");
  // Its gradients (dx, dA, dB, dg) without a division by g; grad_x_base (the base's dx, (g dy) W) is
  // added into dx before its one rounding.
  m.def("dora_backward(Tensor grad_y, Tensor x, Tensor base_out, Tensor T, Tensor A, Tensor B, Tensor g, "
        "float scale, Tensor? grad_x_base=None) -> (Tensor grad_x, Tensor grad_A, Tensor grad_B, Tensor grad_g)");
  // The whole DoRA layer over a frozen base, one autograd node -> (y, T, base_out), base_out = x W^T
  // (kept for dg). W, the NF4 state and bias get no gradient.
  m.def("dora_linear(Tensor x, Tensor weight, Tensor? bias, Tensor A, Tensor B, Tensor g, float scale) -> "
        "(Tensor y, Tensor T, Tensor base_out)");
  m.def("dora_nf4_linear(Tensor x, Tensor packed, Tensor absmax, int out_features, int blocksize, Tensor? bias, "
        "Tensor? nested_absmax, Tensor? nested_code, Tensor? offset, int nested_blocksize, Tensor A, Tensor B, "
        "Tensor g, float scale) -> (Tensor y, Tensor T, Tensor base_out)");
  // DoRA's weight norm needs A W^T (r x out_features) every forward: fp32 (fp64 if either is fp64), from a
  // dense weight in its own dtype, never converted whole. (An NF4 weight goes through nf4_linear.)
  m.def("dora_a_times_w_t(Tensor A, Tensor weight) -> Tensor");
  // The row norms ||W + s B A|| (fp32; the norm is detached) of a dense weight, given w_sq = ||W_i||^2:
  // sqrt(w_sq_i + 2s B_i (A W^T)_:,i + s^2 B_i (A A^T) B_i^T), no out x in matrix. One op, as it runs per
  // layer per forward (its ATen calls from Python took ~0.15 ms a layer in a CPU training step).
  m.def("dora_weight_norm(Tensor A, Tensor B, Tensor weight, Tensor w_sq, float scale) -> Tensor");
  // The same from a_w_t = A W^T (r x out_features) computed elsewhere (an NF4 weight's, by nf4_linear).
  m.def("dora_weight_norm_from_a_w_t(Tensor A, Tensor B, Tensor a_w_t, Tensor w_sq, float scale) -> Tensor");
  // g * dy for the base's dx, (g dy) W: dy (..., N) times g (N), in fp32 (fp64 if either is) and rounded
  // once to dy's dtype; one pass over dy.
  m.def("dora_scaled_grad(Tensor grad_y, Tensor g) -> Tensor");

  // Merge: W += scale * B A in place (unmerge: -=), delta accumulated in fp64, W rounded once;
  // W (d x k) is read and written once, B A never materialized.
  m.def("merge_lora_(Tensor(a!) W, Tensor A, Tensor B, float scale) -> ()");
  m.def("unmerge_lora_(Tensor(a!) W, Tensor A, Tensor B, float scale) -> ()");
  // Merge into an NF4 weight of `shape` in one pass: per block, dequantize (fp32), add the fp64
  // delta (rounded once to fp32, as merge_lora_), quantize as bitsandbytes -> (packed, fp32 absmax).
  m.def(
      "merge_nf4(Tensor packed, Tensor absmax, int blocksize, int[] shape, Tensor A, Tensor B, float scale, "
      "Tensor? nested_absmax=None, Tensor? nested_code=None, Tensor? offset=None, int nested_blocksize=256) -> "
      "(Tensor packed_out, Tensor absmax_out)");

  // Many adapters in one batch: y (the base output, M x N after flattening the leading dims) += on each
  // row the LoRA update of its adapter, scales[a] x A[a]^T B[a]^T, accumulated in fp32 (fp64 if any
  // operand is), y rounded once. Adapter a has its own rank (A[a] is r_a x K, B[a] N x r_a; r_a = 0 where
  // it does not target this layer). The plan (lora_ext.multi_lora.plan): `rows` lists the distinct rows
  // that have an adapter, grouped by adapter; `tiles` (n x 3 int32) cuts it into runs of one adapter,
  // (adapter, first position, count), at most 64 long for the CUDA kernels' blocks (longer ones loop),
  // no position in two tiles. Rows in no tile keep the base output. Inference: no autograd. The CPU
  // checks the plan's values; CUDA does not read them (a sync) and skips what is out of range.
  m.def("multi_lora_forward_(Tensor(a!) y, Tensor x, Tensor[] lora_A, Tensor[] lora_B, float[] scales, "
        "Tensor rows, Tensor tiles) -> ()");
}
