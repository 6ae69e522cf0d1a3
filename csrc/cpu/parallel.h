// Work distribution for the CPU kernels, on torch's intra-op thread pool through the stable ABI
// (torch::stable::parallel_for / get_num_threads).
//
// at::parallel_for splits a range statically, one chunk per thread: when another process holds a
// core, the whole op waits for the slowed thread. The loss kernels here instead hand out tasks
// dynamically, and keep results deterministic by writing each task's result to its own slot
// (summed later in task order), never accumulating in thread order.
#pragma once
#include <algorithm>
#include <atomic>
#include <cstdint>

#include "stable.h"

namespace ffa::cpu {

namespace detail {
// Set while this thread runs a chunk of ffa's parallel_for (the stable API has no
// at::in_parallel_region()); ffa's kernels only nest their own parallel loops.
inline thread_local bool in_region = false;
}  // namespace detail

inline bool in_parallel_region() { return detail::in_region; }

inline int64_t get_num_threads() { return static_cast<int64_t>(torch::stable::get_num_threads()); }

// at::parallel_for's contract: f(begin, end) over chunks of [begin, end), at least grain_size
// long, on torch's threads; serial inside an enclosing region (torch's own rule) or for one chunk.
template <typename F>
void parallel_for(int64_t begin, int64_t end, int64_t grain_size, const F& f) {
  if (begin >= end) return;
  auto body = [&f](int64_t b, int64_t e) {
    const bool outer = detail::in_region;
    detail::in_region = true;
    try {
      f(b, e);
    } catch (...) {
      detail::in_region = outer;
      throw;
    }
    detail::in_region = outer;
  };
  if (detail::in_region || end - begin <= grain_size) {
    body(begin, end);
    return;
  }
  torch::stable::parallel_for(begin, end, grain_size, body);
}

// Runs f(task) for every task in [0, n) on torch's intra-op threads, handed out one at a time.
// Inside an enclosing parallel region (or with one thread) it runs serially, in order.
template <typename F>
void parallel_tasks(int64_t n, const F& f) {
  if (n <= 0) return;
  std::atomic<int64_t> next{0};
  const int64_t workers = std::min<int64_t>(get_num_threads(), n);
  parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    for (int64_t t = next.fetch_add(1); t < n; t = next.fetch_add(1)) f(t);
  });
}

// Runs f(b) for each sample: samples in parallel when the batch covers the threads (their inner
// loops and BLAS calls then run single-threaded: one parallel region in all); otherwise one by
// one, each free to parallelize inside.
template <typename F>
void for_each_sample(int64_t B, const F& f) {
  if (B >= get_num_threads()) {
    parallel_tasks(B, f);
  } else {
    for (int64_t b = 0; b < B; ++b) f(b);
  }
}

}  // namespace ffa::cpu
