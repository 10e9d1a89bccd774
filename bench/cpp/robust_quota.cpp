// The seed's shared quota (Mooncake SharedQuotaManager), for comparison with the host
// quota server (bench part host_quota): a table in shared memory behind a robust
// process-shared mutex, EOWNERDEAD recovery, and kill(pid, 0) scans of dead PIDs.
// Written for the bench only; the product does not use it.
//
//   robust_quota rt N             reserve+release round trip, N pairs, one process
//                                 -> {"ns_per_pair": X}
//   robust_quota kill MODE REPS   a child reserves 60 of 100 and SIGKILLs itself; the
//                                 parent then tries to reserve 60 until it succeeds:
//     MODE holding   the child dies holding the mutex: the next lock() sees
//                    EOWNERDEAD and reclaims dead PIDs (the seed's only reclaim path)
//     MODE idle      the child dies outside the mutex: the seed as written never
//                    reclaims (reported as a timeout after 2 s)
//     MODE scan      as idle, but every failed reserve scans for dead PIDs (polling)
//                                 -> {"mode": M, "ns": [...], "timeouts": K}
// The latency is from the child's clock reading just before raise(SIGKILL) to the
// parent's successful reserve (CLOCK_MONOTONIC in both: the same clock).
#include <pthread.h>
#include <signal.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include <cerrno>
#include <cinttypes>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

namespace {

constexpr int kMaxPidSlots = 64;

struct PidUsage {
  pid_t pid;
  std::uint64_t used_bytes;
};

// The seed's layout, one device.
struct SharedHeader {
  std::uint64_t magic;
  std::int32_t version;
  std::int32_t num_devices;
  pthread_mutex_t global_mutex;
  std::uint64_t quota;
  std::uint64_t active_bytes;
  PidUsage pid_usages[kMaxPidSlots];
  std::uint64_t kill_ns;  // bench only: when the child died
};

std::uint64_t mono_ns() {
  timespec ts{};
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<std::uint64_t>(ts.tv_sec) * 1000000000ull +
         static_cast<std::uint64_t>(ts.tv_nsec);
}

SharedHeader* create_table() {
  void* p = mmap(nullptr, sizeof(SharedHeader), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS,
                 -1, 0);
  if (p == MAP_FAILED) {
    std::perror("mmap");
    std::exit(1);
  }
  auto* h = static_cast<SharedHeader*>(p);
  std::memset(h, 0, sizeof(*h));
  h->magic = 0x51554f5441ull;
  h->version = 1;
  h->num_devices = 1;
  h->quota = 100;
  pthread_mutexattr_t attr;
  pthread_mutexattr_init(&attr);
  pthread_mutexattr_setpshared(&attr, PTHREAD_PROCESS_SHARED);
  pthread_mutexattr_setrobust(&attr, PTHREAD_MUTEX_ROBUST);
  pthread_mutex_init(&h->global_mutex, &attr);
  pthread_mutexattr_destroy(&attr);
  return h;
}

bool pid_alive(pid_t pid) {
  if (pid <= 0) return false;
  if (kill(pid, 0) == 0) return true;
  return errno != ESRCH;
}

void reclaim_dead_pids(SharedHeader* h) {
  for (auto& slot : h->pid_usages) {
    if (slot.pid != 0 && !pid_alive(slot.pid)) {
      h->active_bytes -= slot.used_bytes;
      slot.pid = 0;
      slot.used_bytes = 0;
    }
  }
}

void lock(SharedHeader* h) {
  int rc = pthread_mutex_lock(&h->global_mutex);
  if (rc == EOWNERDEAD) {
    pthread_mutex_consistent(&h->global_mutex);
    reclaim_dead_pids(h);
  } else if (rc != 0) {
    std::fprintf(stderr, "pthread_mutex_lock: %s\n", std::strerror(rc));
    std::exit(1);
  }
}

void unlock(SharedHeader* h) { pthread_mutex_unlock(&h->global_mutex); }

bool reserve(SharedHeader* h, pid_t pid, std::uint64_t bytes) {
  lock(h);
  bool ok = h->active_bytes + bytes <= h->quota;
  if (ok) {
    ok = false;
    for (auto& slot : h->pid_usages) {
      if (slot.pid == pid || slot.pid == 0) {
        slot.pid = pid;
        slot.used_bytes += bytes;
        h->active_bytes += bytes;
        ok = true;
        break;
      }
    }
  }
  unlock(h);
  return ok;
}

void release(SharedHeader* h, pid_t pid, std::uint64_t bytes) {
  lock(h);
  for (auto& slot : h->pid_usages) {
    if (slot.pid == pid) {
      slot.used_bytes -= bytes;
      h->active_bytes -= bytes;
      if (slot.used_bytes == 0) slot.pid = 0;
      break;
    }
  }
  unlock(h);
}

int round_trip(long n) {
  SharedHeader* h = create_table();
  pid_t me = getpid();
  for (long i = 0; i < 1000; ++i) {
    reserve(h, me, 1);
    release(h, me, 1);
  }
  std::uint64_t t0 = mono_ns();
  for (long i = 0; i < n; ++i) {
    if (!reserve(h, me, 1)) return 1;
    release(h, me, 1);
  }
  std::uint64_t t1 = mono_ns();
  std::printf("{\"ns_per_pair\": %.1f}\n", static_cast<double>(t1 - t0) / static_cast<double>(n));
  return 0;
}

// One death: returns the latency in ns, or 0 on timeout.
std::uint64_t one_kill(const std::string& mode) {
  SharedHeader* h = create_table();
  int ready[2];
  if (pipe(ready) != 0) std::exit(1);
  pid_t child = fork();
  if (child == 0) {
    reserve(h, getpid(), 60);
    if (mode == "holding") lock(h);
    h->kill_ns = mono_ns();
    if (write(ready[1], "x", 1) != 1) _exit(1);
    raise(SIGKILL);
    _exit(1);
  }
  char c;
  if (read(ready[0], &c, 1) != 1) std::exit(1);
  close(ready[0]);
  close(ready[1]);
  pid_t me = getpid();
  std::uint64_t deadline = mono_ns() + 2000000000ull;
  std::uint64_t latency = 0;
  // The child may not be dead yet: the survivor keeps trying, as a real one would.
  while (mono_ns() < deadline) {
    if (reserve(h, me, 60)) {
      latency = mono_ns() - h->kill_ns;
      break;
    }
    if (mode == "scan") {
      lock(h);
      reclaim_dead_pids(h);
      unlock(h);
    }
  }
  munmap(h, sizeof(*h));
  return latency;
}

int kill_latency(const std::string& mode, int reps) {
  // Children are reaped by the kernel as they die: a zombie would look alive to
  // kill(pid, 0) (a trap of the seed's design when the survivor is the parent).
  signal(SIGCHLD, SIG_IGN);
  std::vector<std::uint64_t> ns;
  int timeouts = 0;
  for (int i = 0; i < reps; ++i) {
    std::uint64_t l = one_kill(mode);
    if (l == 0)
      ++timeouts;
    else
      ns.push_back(l);
  }
  std::printf("{\"mode\": \"%s\", \"ns\": [", mode.c_str());
  for (std::size_t i = 0; i < ns.size(); ++i) std::printf("%s%" PRIu64, i == 0 ? "" : ", ", ns[i]);
  std::printf("], \"timeouts\": %d}\n", timeouts);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc == 3 && std::string(argv[1]) == "rt") return round_trip(std::atol(argv[2]));
  if (argc == 4 && std::string(argv[1]) == "kill") {
    std::string mode = argv[2];
    if (mode == "holding" || mode == "idle" || mode == "scan")
      return kill_latency(mode, std::atoi(argv[3]));
  }
  std::fprintf(stderr, "usage: robust_quota rt N | robust_quota kill holding|idle|scan REPS\n");
  return 2;
}
