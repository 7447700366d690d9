// Every kernel launch goes through launch_kernel(kernel, grid, block, stream, args...). Under nvcc it
// is kernel<<<grid, block, 0, stream>>>(args...). Under tests/emulation (LORA_EXT_CUDA_EMULATION)
// it runs the host-compiled kernel on the CPU, so the launchers themselves are tested there too:
// dispatch, grid sizes and alignment choices.
#pragma once

#include <cuda_runtime.h>

#include <utility>

namespace lora_ext {

template <typename... Params, typename... Args>
inline void launch_kernel(void (*kernel)(Params...), dim3 grid, dim3 block, cudaStream_t stream, Args&&... args) {
#if defined(LORA_EXT_CUDA_EMULATION)
  (void)stream;
  ::cuda_emulation::launch(grid, block.x, [&] { kernel(args...); });
#else
  kernel<<<grid, block, 0, stream>>>(std::forward<Args>(args)...);
#endif
}

}  // namespace lora_ext
