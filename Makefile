# snakepit_shm: the two commands are `make demo` and `make test`.
# Every target installs the Debian packages it needs first (scripts/install-deps.sh).
SHELL := /bin/bash
PYTHON := /usr/bin/python3
MIX := mix
export MIX_ENV ?= dev
CMAKE_TEST_DIR := _build/ctest
CMAKE_ASAN_DIR := _build/ctest-asan

.PHONY: all deps deps-test build demo test bench soak cpp-test cpp-asan elixir-test python-test \
        asan-fuzz wine-test dialyzer format format-check shm-check clean

all: build

deps:
	@scripts/install-deps.sh build

deps-test:
	@scripts/install-deps.sh build test wine bench

build: deps
	@$(MIX) compile

demo: deps
	@$(MIX) compile
	@$(MIX) snakepit.shm.demo

test: deps-test
	@scripts/test-all.sh

cpp-test:
	@cmake -S . -B $(CMAKE_TEST_DIR) -DCMAKE_BUILD_TYPE=RelWithDebInfo -DSPSHM_BUILD_NIF=OFF >/dev/null
	@cmake --build $(CMAKE_TEST_DIR) --parallel 2 >/dev/null
	@cd $(CMAKE_TEST_DIR) && ctest --output-on-failure

cpp-asan:
	@cmake -S . -B $(CMAKE_ASAN_DIR) -DCMAKE_BUILD_TYPE=Debug -DSPSHM_SANITIZE=ON -DSPSHM_BUILD_NIF=OFF \
	  -DSPSHM_OUTPUT_DIR=$(CURDIR)/$(CMAKE_ASAN_DIR)/out >/dev/null
	@cmake --build $(CMAKE_ASAN_DIR) --parallel 2 >/dev/null
	@cd $(CMAKE_ASAN_DIR) && ctest --output-on-failure

elixir-test:
	@MIX_ENV=test $(MIX) test

python-test:
	@$(MIX) compile
	@scripts/run-pytest.sh

# The bench needs the build packages and gnuplot only (not wine or the test tools).
bench:
	@scripts/install-deps.sh build bench
	@$(MIX) compile
	@$(MIX) snakepit.shm.bench $(if $(QUICK),--quick,)

soak: deps-test
	@SNAKEPIT_SHM_SOAK=1 scripts/test-all.sh

dialyzer:
	@scripts/dialyzer.sh

format:
	@$(MIX) format
	@clang-format -i $$(git ls-files 'c_src/*.cpp' 'c_src/*.hpp' 'c_src/*.h' 'test/cpp/*.cpp')

format-check:
	@$(MIX) format --check-formatted
	@clang-format --dry-run -Werror $$(git ls-files 'c_src/*.cpp' 'c_src/*.hpp' 'c_src/*.h' 'test/cpp/*.cpp')

shm-check:
	@scripts/shm-check.sh

clean:
	rm -rf _build priv/*.so priv/asan
