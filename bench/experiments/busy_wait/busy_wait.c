// bench/experiments/busy_wait: why a VM's idle normal schedulers wake late from their
// timers while another thread of the VM keeps a core busy (bench/FINDINGS.md section 7,
// fourth pass). Not part of the product. Build and run: see busy_wait.erl.
//
// Work: a fixed amount of memory-bound CPU work (calibrated at load to `us` microseconds),
// run either on a dirty CPU scheduler (spin/2) or on a thread of this library (job/4)
// whose scheduling policy is set once, by the thread itself, at load:
//   0 nice 0, 1 nice 19, 2 SCHED_BATCH, 3 SCHED_IDLE, 4 nice 10.
// The thread messages the caller when done (enif_send). Work can give the processor away
// (sched_yield) every `yield_us` microseconds.
#define _GNU_SOURCE
#include <erl_nif.h>
#include <sched.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

static long long now_ns(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec * 1000000000LL + t.tv_nsec;
}

static char src[1 << 16], dst[1 << 16];
static double passes_per_us = 0;

static void passes(long n) {
  volatile unsigned x = 0;
  for (long k = 0; k < n; k++, x++)
    for (int i = 0; i < (1 << 16); i += 16) dst[i] = src[i] ^ x;
}

static void calibrate(void) {
  long long best = 1LL << 62;
  for (int r = 0; r < 5; r++) {
    long long t = now_ns();
    passes(200);
    long long d = now_ns() - t;
    if (d < best) best = d;
  }
  passes_per_us = 200.0 * 1000.0 / best;
}

static void work(long us, long yield_us) {
  if (yield_us <= 0) {
    passes((long)(us * passes_per_us));
    return;
  }
  for (long done = 0; done < us; done += yield_us) {
    passes((long)((yield_us < us - done ? yield_us : us - done) * passes_per_us));
    sched_yield();
  }
}

// spin(us, yield_us) on a dirty CPU scheduler
static ERL_NIF_TERM spin(ErlNifEnv* env, int argc, const ERL_NIF_TERM argv[]) {
  long us, yield_us;
  if (!enif_get_long(env, argv[0], &us) || !enif_get_long(env, argv[1], &yield_us))
    return enif_make_badarg(env);
  work(us, yield_us);
  return enif_make_atom(env, "ok");
}

#define WORKERS 5
typedef struct {
  ErlNifMutex* mutex;
  ErlNifCond* cond;
  ErlNifEnv* env;
  int policy, pending;
  ErlNifPid pid;
  ERL_NIF_TERM ref;
  long us, yield_us;
} Worker;
static Worker workers[WORKERS];

static void* worker_main(void* arg) {
  Worker* w = arg;
  pid_t tid = (pid_t)syscall(SYS_gettid);
  struct sched_param none = {0};
  if (w->policy == 1) setpriority(PRIO_PROCESS, tid, 19);
  if (w->policy == 4) setpriority(PRIO_PROCESS, tid, 10);
  if (w->policy == 2) sched_setscheduler(0, SCHED_BATCH, &none);
  if (w->policy == 3) sched_setscheduler(0, SCHED_IDLE, &none);
  for (;;) {
    enif_mutex_lock(w->mutex);
    while (!w->pending) enif_cond_wait(w->cond, w->mutex);
    enif_mutex_unlock(w->mutex);
    work(w->us, w->yield_us);
    ErlNifPid pid = w->pid;
    ERL_NIF_TERM msg = enif_make_tuple2(w->env, enif_make_atom(w->env, "done"), w->ref);
    enif_mutex_lock(w->mutex);
    w->pending = 0;
    enif_mutex_unlock(w->mutex);
    enif_send(NULL, &pid, w->env, msg);
    enif_clear_env(w->env);
  }
  return NULL;
}

// job(policy, us, yield_us) -> ref; {done, ref} arrives when the work is done
static ERL_NIF_TERM job(ErlNifEnv* env, int argc, const ERL_NIF_TERM argv[]) {
  int policy;
  long us, yield_us;
  if (!enif_get_int(env, argv[0], &policy) || policy < 0 || policy >= WORKERS ||
      !enif_get_long(env, argv[1], &us) || !enif_get_long(env, argv[2], &yield_us))
    return enif_make_badarg(env);
  Worker* w = &workers[policy];
  ERL_NIF_TERM ref = enif_make_ref(env);
  enif_mutex_lock(w->mutex);
  w->ref = enif_make_copy(w->env, ref);
  enif_self(env, &w->pid);
  w->us = us;
  w->yield_us = yield_us;
  w->pending = 1;
  enif_cond_signal(w->cond);
  enif_mutex_unlock(w->mutex);
  return ref;
}

static int load(ErlNifEnv* env, void** priv, ERL_NIF_TERM info) {
  calibrate();
  for (int i = 0; i < WORKERS; i++) {
    workers[i].mutex = enif_mutex_create("busy_wait_worker");
    workers[i].cond = enif_cond_create("busy_wait_worker");
    workers[i].env = enif_alloc_env();
    workers[i].policy = i;
    ErlNifTid tid;
    if (enif_thread_create("busy_wait_worker", &tid, worker_main, &workers[i], NULL) != 0)
      return 1;
  }
  return 0;
}

static ErlNifFunc funcs[] = {{"spin", 2, spin, ERL_NIF_DIRTY_JOB_CPU_BOUND},
                             {"job", 3, job, 0}};
ERL_NIF_INIT(busy_wait, funcs, load, NULL, NULL, NULL)
