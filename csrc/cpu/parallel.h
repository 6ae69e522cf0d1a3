// Work distribution for the CPU loss kernels.
//
// at::parallel_for splits a range statically, one chunk per thread: when another process holds a
// core, the whole op waits for the slowed thread. The kernels here instead hand out tasks
// dynamically, and keep results deterministic by writing each task's result to its own slot
// (summed later in task order), never accumulating in thread order.
#pragma once
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>

namespace ffa::cpu {

// Runs f(task) for every task in [0, n) on torch's intra-op threads, handed out one at a time.
// Inside an enclosing parallel region (or with one thread) it runs serially, in order.
template <typename F>
void parallel_tasks(int64_t n, const F& f) {
  if (n <= 0) return;
  std::atomic<int64_t> next{0};
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), n);
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    for (int64_t t = next.fetch_add(1); t < n; t = next.fetch_add(1)) f(t);
  });
}

// Runs f(b) for each sample: samples in parallel when the batch covers the threads (their inner
// loops and BLAS calls then run single-threaded: one parallel region in all); otherwise one by
// one, each free to parallelize inside.
template <typename F>
void for_each_sample(int64_t B, const F& f) {
  if (B >= at::get_num_threads()) {
    parallel_tasks(B, f);
  } else {
    for (int64_t b = 0; b < B; ++b) f(b);
  }
}

}  // namespace ffa::cpu
