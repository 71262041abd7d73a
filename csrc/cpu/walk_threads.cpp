#include "walk_threads.h"

#include <unistd.h>

#include <thread>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

namespace rnn_ext::cpu {

namespace {

// A row group needs this many rows to fill a tile's rows; fewer leave the FMA units idle.
constexpr int64_t kMinGroupRows = 4;
// A walk of fewer multiply-adds (rows x H x H over all steps) runs on one thread: waking the
// others costs more than they save.
constexpr int64_t kMinParallelWalkMacs = int64_t{1} << 19;
// A column slice's share of one step, at least: each step ends with the group's slices meeting,
// which costs a fraction of a microsecond (more where threads outnumber cores).
constexpr int64_t kMinSliceMacs = int64_t{1} << 15;

std::atomic<int64_t> forced_row_groups{0};
std::atomic<int64_t> forced_col_slices{0};

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

int64_t panels_of(const WalkShape& shape) { return std::max<int64_t>(1, ceil_div(shape.H, shape.panel_width)); }

// The most slices a step of `rows` rows pays for: each at least kMinSliceMacs, each whole panels.
int64_t max_slices(const WalkShape& shape, int64_t rows) {
  return std::clamp<int64_t>(rows * shape.H * shape.H / kMinSliceMacs, 1, panels_of(shape));
}

// The split of one direction's walk on `threads` threads:
//  1. One thread for a small walk (kMinParallelWalkMacs).
//  2. Column slices for the cache: where W_hh is larger than half an L2 (the other half holds the
//     rows that pass by), the fewest slices whose share of it fits there, if the threads allow that
//     many. Each thread then reads its panels from its own L2 every step, instead of all of W_hh
//     from the shared L3 (at H = 1024 in float, 4 MiB a step per thread).
//  3. Row groups: as many as the threads left allow, each of kMinGroupRows rows or more. They need
//     no meeting at all, so rows come before further columns.
//  4. Column slices for the threads still idle (few rows: B = 1 .. 4 x threads), as many as pay for
//     their meeting (kMinSliceMacs each per step).
WalkSplit choose_walk_split(const WalkShape& shape, int64_t threads) {
  if (threads <= 1 || shape.rows <= 0 || shape.walk_rows * shape.H * shape.H < kMinParallelWalkMacs) return {};
  const int64_t max_groups = std::max<int64_t>(1, shape.rows / kMinGroupRows);
  const int64_t w_hh_bytes = panels_of(shape) * shape.panel_width * shape.H * shape.element_bytes;
  const int64_t cache_slices = ceil_div(w_hh_bytes, l2_cache_bytes() / 2);
  int64_t cols = 1;
  if (cache_slices > 1 && cache_slices <= threads &&
      cache_slices <= max_slices(shape, ceil_div(shape.rows, std::min(max_groups, threads / cache_slices)))) {
    cols = cache_slices;
  }
  const int64_t groups = std::clamp<int64_t>(threads / cols, 1, max_groups);
  if (groups * cols < threads) {
    cols = std::max(cols, std::min(max_slices(shape, ceil_div(shape.rows, groups)), threads / groups));
  }
  return {groups, cols};
}

}  // namespace

std::vector<WalkSplit> choose_walk_splits(const WalkShape& shape, int64_t directions, int64_t threads) {
  const int64_t forced_rows = forced_row_groups.load();
  const int64_t forced_cols = forced_col_slices.load();
  std::vector<WalkSplit> splits;
  for (int64_t d = 0; d < directions; ++d) {
    if (forced_rows > 0) {
      splits.push_back({std::clamp<int64_t>(forced_rows, 1, std::max<int64_t>(1, shape.rows)),
                        std::clamp<int64_t>(forced_cols, 1, panels_of(shape))});
      continue;
    }
    // The directions share the threads: the first takes the odd one.
    const int64_t share = directions == 1 ? threads : (threads + (d == 0 ? 1 : 0)) / 2;
    splits.push_back(choose_walk_split(shape, std::max<int64_t>(1, share)));
  }
  return splits;
}

void set_walk_split_override(int64_t row_groups, int64_t col_slices) {
  TORCH_CHECK((row_groups > 0) == (col_slices > 0) && row_groups >= 0 && col_slices >= 0,
              "rnn_ext: a walk split override needs row_groups and col_slices both positive, or both 0 to clear, got ",
              row_groups, " and ", col_slices);
  forced_row_groups.store(row_groups);
  forced_col_slices.store(col_slices);
}

int64_t l2_cache_bytes() {
  static const int64_t bytes = [] {
#ifdef _SC_LEVEL2_CACHE_SIZE
    const long reported = sysconf(_SC_LEVEL2_CACHE_SIZE);
    if (reported > 0) return static_cast<int64_t>(reported);
#endif
    return int64_t{1} << 20;
  }();
  return bytes;
}

WalkPlan::WalkPlan(const StepSchedule& steps, int64_t directions, int64_t H, int64_t element_bytes, int64_t panel_width)
    : H_(H), panel_width_(panel_width) {
  const WalkShape shape{steps.started(), steps.gathered_rows(), H, element_bytes, panel_width};
  // Inside another parallel region at::parallel_for runs inline: one thread, whatever the count.
  const int64_t threads = at::in_parallel_region() ? 1 : at::get_num_threads();
  splits_ = choose_walk_splits(shape, directions, threads);
  int64_t parts = 0;
  for (const auto& split : splits_) parts += split.row_groups > 1 ? split.row_groups : 0;
  parts_.reserve(parts);  // groups_ points into it
  for (int64_t d = 0; d < directions; ++d) {
    const WalkSplit& split = splits_[d];
    for (int64_t r = 0; r < split.row_groups; ++r) {
      const StepSchedule* group = &steps;
      if (split.row_groups > 1) {
        parts_.push_back(steps.part(r, split.row_groups));
        group = &parts_.back();
      }
      groups_.push_back({d, group, split.col_slices});
    }
  }
}

Columns WalkPlan::columns(int64_t slice, int64_t slices) const {
  const int64_t panels = ceil_div(H_, panel_width_);
  return {slice * panels / slices * panel_width_, std::min(H_, (slice + 1) * panels / slices * panel_width_)};
}

StepTeam::StepTeam(int64_t phases, int64_t slices)
    : phases_(phases), slices_(slices), slots_(std::make_unique<Slot[]>(slices)) {}

bool StepTeam::claim(int64_t phase, int64_t slice) {
  // Every slice was claimed `phase` times before this phase began; the first to move it on wins.
  int64_t expected = phase;
  return slots_[slice].claimed.load(std::memory_order_relaxed) == phase &&
      slots_[slice].claimed.compare_exchange_strong(expected, phase + 1);
}

void StepTeam::finish(int64_t phase) {
  if (done_.fetch_add(1) + 1 == (phase + 1) * slices_) {
    generation_.fetch_add(1);
    generation_.notify_all();
  }
}

bool StepTeam::phase_done(int64_t phase) const { return done_.load() >= (phase + 1) * slices_; }

void StepTeam::fail(std::exception_ptr error) {
  {
    std::lock_guard<std::mutex> lock(error_mutex_);
    if (!error_) error_ = error;
  }
  failed_.store(true);
  generation_.fetch_add(1);
  generation_.notify_all();
}

void StepTeam::pause() {
#if defined(__x86_64__) || defined(__i386__)
  _mm_pause();
#endif
}

void StepTeam::yield() { std::this_thread::yield(); }

}  // namespace rnn_ext::cpu
