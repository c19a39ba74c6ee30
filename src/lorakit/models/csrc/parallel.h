// parallel_for for the kernels (skinny_gemm.cpp, decode_attention.cpp): at::parallel_for's split, with or without
// -fopenmp.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

// at::parallel_for is serial in a translation unit compiled without -fopenmp (its OpenMP loop is a #pragma in ATen's
// inline headers), as this one may be. Then parallel_for below calls the OpenMP runtime that torch uses directly:
// GOMP_parallel is what `#pragma omp parallel` compiles to (libgomp's ABI, also provided by LLVM's and Intel's
// runtimes). Weak, so that without an OpenMP runtime loaded the work runs serially.
#ifndef _OPENMP
extern "C" {
void GOMP_parallel(void (*fn)(void*), void* data, unsigned num_threads, unsigned flags) __attribute__((weak));
int omp_get_thread_num() __attribute__((weak));
int omp_get_num_threads() __attribute__((weak));
}
#endif

namespace lorakit_kernels {

// at::parallel_for(begin, end, grain, f), split the same way: each of up to at::get_num_threads() threads takes one
// contiguous chunk of the range.
template <class F>
void parallel_for(int64_t begin, int64_t end, int64_t grain, const F& f) {
#ifdef _OPENMP
  at::parallel_for(begin, end, grain, f);
#else
  at::internal::lazy_init_num_threads();
  const int64_t tasks = std::min<int64_t>(at::get_num_threads(), at::divup(end - begin, grain));
  if (tasks <= 1 || !GOMP_parallel || !omp_get_thread_num || !omp_get_num_threads || at::in_parallel_region()) {
    f(begin, end);
    return;
  }
  struct Range {
    int64_t begin, end, tasks;
    const F* f;
  } range{begin, end, tasks, &f};
  // no num_threads (0: the team torch set up), as ATen does: see the note in ATen/ParallelOpenMP.h
  GOMP_parallel(
      [](void* p) {
        const Range& r = *static_cast<const Range*>(p);
        const int64_t chunk = at::divup(r.end - r.begin, std::min<int64_t>(r.tasks, omp_get_num_threads()));
        const int64_t b = r.begin + omp_get_thread_num() * chunk;
        if (b < r.end) (*r.f)(b, std::min(r.end, b + chunk));
      },
      &range, 0, 0);
#endif
}

}  // namespace lorakit_kernels
