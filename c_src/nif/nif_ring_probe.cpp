// Test probe of the channel's SPSC ring (ring.hpp): one ring in private memory with its
// producer and consumer, driven command by command from Elixir by the PropEr model of
// the ring indices (test/support/channel_ring_model.ex). Not used by the library.
#include <cstring>
#include <new>
#include <vector>

#include <erl_nif.h>

#include "nif_channel.hpp"
#include "nif_functions.hpp"
#include "ring.hpp"
#include "terms.hpp"

namespace spshm::nif {

namespace {

struct RingProbe {
  std::vector<std::uint8_t> mem;
  ring::Producer p;
  ring::Consumer c;
  std::uint32_t inline_max = 0;
  std::uint64_t now = 0;
};

ErlNifResourceType* probe_type = nullptr;

void probe_dtor(ErlNifEnv*, void* obj) { static_cast<RingProbe*>(obj)->~RingProbe(); }

bool get_probe(ErlNifEnv* env, ERL_NIF_TERM t, RingProbe** out) {
  return enif_get_resource(env, t, probe_type, reinterpret_cast<void**>(out)) != 0;
}

}  // namespace

bool open_ring_probe_type(ErlNifEnv* env) {
  ErlNifResourceTypeInit init{};
  init.dtor = probe_dtor;
  auto flags = static_cast<ErlNifResourceFlags>(ERL_NIF_RT_CREATE | ERL_NIF_RT_TAKEOVER);
  probe_type = enif_open_resource_type_x(env, "spshm_ring_probe", &init, flags, nullptr);
  return probe_type != nullptr;
}

// ring_probe_new(capacity, ack_mode 0..2, max_batch) -> probe
SPSHM_GUARDED_NIF(nif_ring_probe_new)(ErlNifEnv* env, int, const ERL_NIF_TERM argv[]) {
  std::uint64_t cap, mode, batch;
  if (!get_u64(env, argv[0], &cap) || !get_u64(env, argv[1], &mode) ||
      !get_u64(env, argv[2], &batch) || !ring::valid_capacity(cap) || cap > (1u << 20) ||
      mode > 2 || batch == 0 || batch > 1000000) {
    return enif_make_badarg(env);
  }
  void* mem = enif_alloc_resource(probe_type, sizeof(RingProbe));
  auto* r = new (mem) RingProbe();
  r->mem.assign(ring::kHeaderSize + 2 * cap, 0);
  r->inline_max = static_cast<std::uint32_t>(cap / 4);
  ring::init_header(r->mem.data(), cap, cap, r->inline_max);
  auto* h = reinterpret_cast<ring::ChannelHeader*>(r->mem.data());
  r->p.ctl = r->c.ctl = &h->rings[0];
  r->p.data = r->mem.data() + ring::kHeaderSize;
  r->c.data = r->p.data;
  r->p.cap = r->c.cap = cap;
  r->c.policy.mode = static_cast<ring::AckMode>(mode);
  r->c.policy.max_batch = static_cast<std::uint32_t>(batch);
  r->c.policy.flush_interval_ns = UINT64_MAX;
  ERL_NIF_TERM term = enif_make_resource(env, r);
  enif_release_resource(r);
  return term;
}

// ring_probe_write(probe, length, seed) -> :ok | :full; payload byte i = seed + i
SPSHM_GUARDED_NIF(nif_ring_probe_write)(ErlNifEnv* env, int, const ERL_NIF_TERM argv[]) {
  RingProbe* r;
  std::uint64_t len, seed;
  if (!get_probe(env, argv[0], &r) || !get_u64(env, argv[1], &len) ||
      !get_u64(env, argv[2], &seed) || len > r->inline_max) {
    return enif_make_badarg(env);
  }
  std::vector<std::uint8_t> payload(len);
  for (std::size_t i = 0; i < len; ++i) payload[i] = static_cast<std::uint8_t>(seed + i);
  bool bell = false;
  auto s =
      ring::write(r->p, ring::kFrameData, payload.data(), static_cast<std::uint32_t>(len), &bell);
  return s == ring::Status::ok ? atoms.ok : enif_make_atom(env, "full");
}

// ring_probe_read(probe) -> {:ok, binary} | :empty | :protocol_error
SPSHM_GUARDED_NIF(nif_ring_probe_read)(ErlNifEnv* env, int, const ERL_NIF_TERM argv[]) {
  RingProbe* r;
  if (!get_probe(env, argv[0], &r)) return enif_make_badarg(env);
  ring::Frame f;
  auto s = ring::peek(r->c, r->inline_max, &f);
  if (s == ring::Status::empty) return enif_make_atom(env, "empty");
  if (s != ring::Status::ok) return enif_make_atom(env, "protocol_error");
  ERL_NIF_TERM bin;
  unsigned char* dst = enif_make_new_binary(env, f.length, &bin);
  ring::copy_payload(r->c, f, dst);
  (void)ring::consume(r->c, f, ++r->now);
  return enif_make_tuple2(env, atoms.ok, bin);
}

// ring_probe_flush(probe) -> :ok (publishes the tail, as before sleeping)
SPSHM_GUARDED_NIF(nif_ring_probe_flush)(ErlNifEnv* env, int, const ERL_NIF_TERM argv[]) {
  RingProbe* r;
  if (!get_probe(env, argv[0], &r)) return enif_make_badarg(env);
  (void)ring::flush(r->c, ++r->now);
  return atoms.ok;
}

// ring_probe_indices(probe) -> {head, shared tail, private tail}
SPSHM_GUARDED_NIF(nif_ring_probe_indices)(ErlNifEnv* env, int, const ERL_NIF_TERM argv[]) {
  RingProbe* r;
  if (!get_probe(env, argv[0], &r)) return enif_make_badarg(env);
  return enif_make_tuple3(env, enif_make_uint64(env, r->p.ctl->producer.head.load()),
                          enif_make_uint64(env, r->c.ctl->consumer.tail.load()),
                          enif_make_uint64(env, r->c.tail));
}

}  // namespace spshm::nif
