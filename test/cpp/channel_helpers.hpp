// Shared helpers of the channel tests.
#pragma once

#include <atomic>
#include <thread>

#include "channel.hpp"
#include "platform_channel.hpp"

namespace spshm_test {

/// Runs an owner endpoint's event handling on a thread of its own until stopped (or
/// destroyed): the tests' stand-in for the NIF's enif_select on the BEAM side.
class OwnerPump {
 public:
  explicit OwnerPump(spshm::channel::Endpoint& owner)
      : thread_([this, &owner] {
          while (!done_.load()) {
            spshm::channel::os::wait_readable(owner.wait_fd(), 10);
            owner.handle_events();
            ++loops_;
          }
        }) {}
  OwnerPump(const OwnerPump&) = delete;
  OwnerPump& operator=(const OwnerPump&) = delete;
  ~OwnerPump() { stop(); }

  void stop() {
    done_ = true;
    if (thread_.joinable()) thread_.join();
  }
  int loops() const { return loops_.load(); }

 private:
  std::atomic<bool> done_{false};
  std::atomic<int> loops_{0};
  std::thread thread_;  // last: started once the flags above exist
};

}  // namespace spshm_test
