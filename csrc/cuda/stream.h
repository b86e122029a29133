// The current CUDA stream, obtained through the stable ABI only.
//
// torch >= 2.13 exports torch_stream_native_handle(); it is declared weak so the
// same binary still loads into torch 2.10-2.12, where only the default stream
// (id 0, native handle nullptr) can be resolved without private headers.
#pragma once

#include <cuda_runtime.h>
#include <torch/csrc/stable/accelerator.h>

extern "C" __attribute__((weak)) AOTITorchError torch_stream_native_handle(StreamHandle stream,
                                                                           void** ret);

namespace mmattn {

inline cudaStream_t current_cuda_stream(torch::stable::DeviceIndex device_index) {
  StreamHandle handle = nullptr;
  STD_TORCH_CHECK(aoti_torch_get_current_stream(device_index, &handle) == AOTI_TORCH_SUCCESS,
                  "mmattn: could not query the current CUDA stream");
  torch::stable::accelerator::Stream stream(handle);
  if (torch_stream_native_handle != nullptr) {
    void* native = nullptr;
    STD_TORCH_CHECK(torch_stream_native_handle(handle, &native) == AOTI_TORCH_SUCCESS,
                    "mmattn: could not read the native CUDA stream handle");
    return static_cast<cudaStream_t>(native);
  }
  STD_TORCH_CHECK(stream.id() == 0,
                  "mmattn: this torch (< 2.13) cannot expose non-default CUDA streams through "
                  "the stable ABI; run mmattn CUDA kernels on the default stream or upgrade torch");
  return nullptr;
}

inline void check_cuda_launch(const char* kernel_name) {
  const cudaError_t err = cudaGetLastError();
  STD_TORCH_CHECK(err == cudaSuccess, "mmattn: CUDA launch of ", kernel_name,
                  " failed: ", cudaGetErrorString(err));
}

}  // namespace mmattn
