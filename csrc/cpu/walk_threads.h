// How the CPU walks of a layer (rnn_cpu.cpp) spread over torch's threads.
//
// A walk's rows are independent sequences, but every step needs the whole state of the step
// before. So one direction's walk splits two ways:
//   row groups     the rows (positions in the walk's row order) in `row_groups` interleaved groups
//                  (StepSchedule::part), each walked on its own, with no synchronisation at all;
//   column slices  each step's columns (runs of W_hh's packed panels) in `col_slices` slices: a
//                  group's slices meet once a step, since step t + 1 reads all of step t. In
//                  return, a slice's panels of W_hh stay in the L2 of the thread that runs it for
//                  the whole walk, instead of streaming through every thread each step.
// A bidirectional layer shares the threads between its directions. Neither split changes the order
// of any sum (an element's sum runs over the whole depth in order, whichever thread computes it),
// so every thread count gives the same bits.
//
// The choice of split is made in one place, choose_walk_splits (walk_threads.cpp, where the rules
// are written down); set_walk_split_override forces one, for tests and benchmarks.
#pragma once

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <exception>
#include <memory>
#include <mutex>
#include <vector>

#include "../rnn.h"

namespace rnn_ext::cpu {

struct WalkSplit {
  int64_t row_groups = 1;
  int64_t col_slices = 1;
  int64_t threads() const { return row_groups * col_slices; }
};

// What the choice depends on, for one direction's walk.
struct WalkShape {
  int64_t rows;           // rows of the walk's first (largest) step: StepSchedule::started()
  int64_t walk_rows;      // rows of all its steps together: StepSchedule::gathered_rows()
  int64_t H;              // hidden features: W_hh is [H, H]
  int64_t element_bytes;  // of the packed W_hh
  int64_t panel_width;    // columns per packed panel: slices are whole panels
};

// The split of each of `directions` walks of this shape, on `threads` threads in all.
std::vector<WalkSplit> choose_walk_splits(const WalkShape& shape, int64_t directions, int64_t threads);

// Forces every walk's split to row_groups x col_slices (each then clamped to the walk's rows and
// panels) whatever the thread count; 0, 0 returns to the rules. Process-wide: for tests and benchmarks.
void set_walk_split_override(int64_t row_groups, int64_t col_slices);

// The L2 cache of one core in bytes, as the OS reports it (1 MiB where it does not).
int64_t l2_cache_bytes();

// The column slices of one row group, going through its phases (its steps, and for the backward
// walk a last phase) together: every slice of phase k is finished before any of phase k + 1 starts.
//
// Slices are claimed, not assigned. A participant claims its own slices of a phase first; then, while
// the phase is unfinished, it spins a few microseconds (the others are on theirs), then claims
// whatever nobody has (a participant that is descheduled, or that never came: fewer threads than
// participants), then yields, then sleeps until the phase's last slice is done. Nobody ever waits
// for an unclaimed slice, so a team finishes whatever number of threads really runs it, and under
// oversubscription the threads that do run take over the work of those that do not.
class StepTeam {
 public:
  StepTeam(int64_t phases, int64_t slices);
  int64_t phases() const { return phases_; }
  int64_t slices() const { return slices_; }

  // Runs work(phase, slice) for the slices this participant gets, own slices [own_begin, own_end)
  // first, phase after phase, until the team is done. If a work throws, the team stops and
  // run_teams rethrows it.
  template <typename Work>
  void participate(int64_t own_begin, int64_t own_end, Work&& work) {
    for (int64_t phase = 0; phase < phases_ && !failed(); ++phase) {
      for (int64_t s = own_begin; s < own_end; ++s) run_if_claimed(phase, s, work);
      wait_for_phase(phase, [&] {
        for (int64_t s = 0; s < slices_; ++s) run_if_claimed(phase, s, work);
      });
    }
  }

  std::exception_ptr error() const { return error_; }

 private:
  template <typename Work>
  void run_if_claimed(int64_t phase, int64_t slice, Work& work) {
    if (!claim(phase, slice)) return;
    try {
      work(phase, slice);
    } catch (...) {
      fail(std::current_exception());
    }
    finish(phase);
  }

  // Until every slice of `phase` is done: spin for kSpin, then run steal() (which claims what is
  // left: its owner is late, descheduled or absent) now and then, yield until kYield, then sleep.
  template <typename Steal>
  void wait_for_phase(int64_t phase, Steal&& steal) {
    const auto start = std::chrono::steady_clock::now();
    for (int64_t round = 1; !phase_done(phase) && !failed(); ++round) {
      if (round % kPausesPerLook != 0) {
        pause();
        continue;
      }
      const auto waited = std::chrono::steady_clock::now() - start;
      if (waited < kSpin) continue;
      steal();
      if (waited < kYield) {
        yield();
      } else {
        sleep_unless_done(phase, steal);
      }
    }
  }

  static constexpr int64_t kPausesPerLook = 64;  // pause instructions between looks at the clock
  static constexpr std::chrono::microseconds kSpin{5};
  static constexpr std::chrono::microseconds kYield{200};

  bool claim(int64_t phase, int64_t slice);
  void finish(int64_t phase);
  bool phase_done(int64_t phase) const;
  bool failed() const { return failed_.load(std::memory_order_relaxed); }
  void fail(std::exception_ptr error);
  template <typename Steal>
  void sleep_unless_done(int64_t phase, Steal& steal) {
    const int32_t seen = generation_.load();
    if (phase_done(phase) || failed()) return;
    steal();  // nothing left unclaimed after this: the phase ends when its claimers finish
    if (!phase_done(phase) && !failed()) generation_.wait(seen);
  }
  static void pause();
  static void yield();

  struct alignas(64) Slot {
    std::atomic<int64_t> claimed{0};  // phases this slice has been claimed for
  };
  int64_t phases_, slices_;
  std::unique_ptr<Slot[]> slots_;
  alignas(64) std::atomic<int64_t> done_{0};        // slices finished, over all phases
  alignas(64) std::atomic<int32_t> generation_{0};  // phases finished (mod 2^32): what sleepers wait on
  std::atomic<bool> failed_{false};
  std::mutex error_mutex_;
  std::exception_ptr error_;
};

// Runs the teams side by side in one parallel region of at most at::get_num_threads() threads:
// the teams' slices laid end to end are the region's participants, each a slice of one team as its
// own; work(team, phase, slice). Rethrows the first exception of any work.
template <typename Work>
void run_teams(std::vector<std::unique_ptr<StepTeam>>& teams, Work&& work) {
  std::vector<int64_t> first;  // the first participant of each team
  int64_t participants = 0;
  for (const auto& team : teams) {
    first.push_back(participants);
    participants += team->slices();
  }
  const auto run = [&](int64_t begin, int64_t end) {
    // Participants [begin, end): each team's among them, as one participant owning those slices.
    for (size_t t = 0; t < teams.size(); ++t) {
      const int64_t own_begin = std::max(begin, first[t]) - first[t];
      const int64_t own_end = std::min(end, first[t] + teams[t]->slices()) - first[t];
      if (own_begin >= own_end) continue;
      teams[t]->participate(own_begin, own_end, [&](int64_t phase, int64_t slice) { work(t, phase, slice); });
    }
  };
  if (participants == 1) {
    run(0, 1);
  } else {
    at::parallel_for(0, participants, 1, run);
  }
  for (const auto& team : teams) {
    if (team->error()) std::rethrow_exception(team->error());
  }
}

// Columns [begin, end) of a step: one column slice's share, whole panels.
struct Columns {
  int64_t begin, end;
  int64_t count() const { return end - begin; }
};

// One row group of one direction, and how many column slices walk it.
struct GroupWalk {
  int64_t direction;
  const StepSchedule* steps;  // the group's rows (the whole schedule when there is one group)
  int64_t slices;
};

// The walks of a layer's directions over the same schedule, split as choose_walk_splits says.
class WalkPlan {
 public:
  // element_bytes and panel_width: of the packed W_hh (PackedWeight).
  WalkPlan(const StepSchedule& steps, int64_t directions, int64_t H, int64_t element_bytes, int64_t panel_width);
  const std::vector<WalkSplit>& splits() const { return splits_; }

  // Calls work(group, phase, columns) for every group, every phase (its steps, then extra_phases
  // more) and every slice's columns, all on the threads, phase k of a group after all its phase k - 1.
  template <typename Work>
  void run(int64_t extra_phases, Work&& work) const {
    std::vector<std::unique_ptr<StepTeam>> teams;
    for (const auto& group : groups_) {
      teams.push_back(std::make_unique<StepTeam>(group.steps->steps() + extra_phases, group.slices));
    }
    run_teams(teams, [&](size_t t, int64_t phase, int64_t slice) {
      work(groups_[t], phase, columns(slice, groups_[t].slices));
    });
  }

 private:
  Columns columns(int64_t slice, int64_t slices) const;
  int64_t H_, panel_width_;
  std::vector<WalkSplit> splits_;
  std::vector<StepSchedule> parts_;  // the row groups' schedules, where a direction has several
  std::vector<GroupWalk> groups_;
};

}  // namespace rnn_ext::cpu
