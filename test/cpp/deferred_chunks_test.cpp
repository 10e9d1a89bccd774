// Encrypted regions created with defer_chunks (issue 12): chunks initialised in slices by
// the creator, header published last; nobody reads, writes or opens it before.
#include "header.hpp"
#include "helpers.hpp"

using namespace spshm;
using namespace spshm_test;

TEST_CASE("a deferred encrypted region is usable only once every chunk is in and published",
          "[crypto]") {
  auto backend = GENERATE(BackendKind::memfd, BackendKind::posix);
  const std::uint64_t size = 20 * std::uint64_t{kChunkSize} + 7;  // 21 chunks
  CreateOptions o = options(backend, size);
  o.encrypted = true;
  o.security_level = 1;
  o.defer_chunks = true;
  Region r = create_ok(o);
  SegmentCleanup cleanup{backend == BackendKind::posix ? r.id() : ""};
  REQUIRE_FALSE(header_published(r.header()));

  std::uint8_t byte = 1;
  auto w = r.write(0, &byte, 1);
  REQUIRE_FALSE(w.ok());
  REQUIRE(w.error().code == Errc::busy);
  auto rd = r.read(0, &byte, 1);
  REQUIRE_FALSE(rd.ok());
  REQUIRE(rd.error().code == Errc::busy);
  // another process (here: another open) cannot use it before it is published
  auto early = Region::open(OpenTarget{r.id(), r.control_path(), r.data_path()}, true);
  REQUIRE_FALSE(early.ok());

  // A seal now would make the view read-only under the initialiser (it crashed the VM
  // when fuzzed): refused until the region is published.
  auto early_seal = r.seal();
  REQUIRE_FALSE(early_seal.ok());
  REQUIRE(early_seal.error().code == Errc::busy);
  REQUIRE(early_seal.error().message.find("still being initialised") != std::string::npos);
  REQUIRE_FALSE(r.sealed());

  REQUIRE_FALSE(r.publish().ok());                // chunks missing
  REQUIRE_FALSE(r.initialise_chunks(3, 4).ok());  // out of order
  auto left = r.initialise_chunks(0, 16);
  REQUIRE(left.ok());
  REQUIRE(*left == 5);
  left = r.initialise_chunks(16, 100);  // clipped to the region
  REQUIRE(left.ok());
  REQUIRE(*left == 0);
  REQUIRE(r.publish().ok());
  REQUIRE(header_published(r.header()));
  REQUIRE_FALSE(r.publish().ok());
  REQUIRE_FALSE(r.initialise_chunks(21, 1).ok());

  std::vector<std::uint8_t> all(size, 0xff);
  REQUIRE(r.read(0, all.data(), all.size()).ok());
  REQUIRE(all == std::vector<std::uint8_t>(size, 0));
  REQUIRE(r.write(size - 1, &byte, 1).ok());
  {
    auto opened = Region::open(OpenTarget{r.id(), r.control_path(), r.data_path()}, true);
    INFO((opened ? std::string() : opened.error().message));
    REQUIRE(opened.ok());
  }
  auto sealed = r.seal();  // published: sealable as any region
  INFO((sealed ? std::string() : sealed.error().message));
  REQUIRE(sealed.ok());
}

TEST_CASE("without defer_chunks there is nothing to initialise or publish", "[crypto]") {
  CreateOptions o = options(BackendKind::memfd, 3 * std::uint64_t{kChunkSize});
  o.encrypted = true;
  Region r = create_ok(o);
  REQUIRE(header_published(r.header()));
  REQUIRE_FALSE(r.initialise_chunks(0, 1).ok());
  REQUIRE_FALSE(r.publish().ok());
}
