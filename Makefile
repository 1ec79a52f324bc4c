# minivmm: each target is one step; `make test` is what CI runs.
SHELL := /bin/bash
CARGO ?= cargo
CACHE := $(CURDIR)/.cache
LINUX := $(CACHE)/linux
export MINIVMM_BIN := $(CURDIR)/target/release/minivmm
export MINIVMM_KERNEL := $(LINUX)/vmlinuz
export MINIVMM_VMLINUX := $(LINUX)/vmlinux
export MINIVMM_INITRAMFS := $(LINUX)/initramfs.cpio.gz

.PHONY: all deps build rig-check kernel initramfs guest-linux fmt-check clippy doc import-cycles test-unit test-e2e test soak bench demo clean fuzz-deps fuzz-build fuzz fuzz-short

all: build

## Debian packages (QEMU for the comparison tests and benchmarks, busybox for the initramfs).
deps:
	@scripts/deps.sh

build: deps
	$(CARGO) build --release --workspace

## The newest Debian cloud kernel (bzImage) and its uncompressed vmlinux, cached in .cache/.
kernel: deps
	@scripts/fetch-kernel.sh $(LINUX)
	@scripts/extract-vmlinux.sh $(LINUX)/vmlinuz $(LINUX)/vmlinux

## busybox-static + our static workload program, as a gzip'd newc initramfs.
initramfs: deps
	@scripts/build-initramfs.sh $(MINIVMM_INITRAMFS)

guest-linux: kernel initramfs

fmt-check:
	$(CARGO) fmt --all -- --check
	$(CARGO) fmt --manifest-path migration/fuzz/Cargo.toml -- --check

clippy:
	$(CARGO) clippy --workspace --all-targets -- -D warnings

## Modules of a crate must not import each other in a circle.
import-cycles:
	@python3 scripts/import-cycles.py

doc:
	RUSTDOCFLAGS="-D warnings" $(CARGO) doc --workspace --no-deps

test-unit:
	$(CARGO) test --workspace --exclude e2e

## The two-host rig (scripts/rig.sh) needs root, iproute2's tc and either sch_netem or the
## NFQUEUE delay line (`netdelay`, built with the workspace, and iptables): said once here.
rig-check: deps
	@if [ "$$(id -u)" -eq 0 ]; then scripts/rig.sh check; else echo "rig: not root, the rig tests will skip"; fi

test-e2e: build guest-linux rig-check
	$(CARGO) test --release -p e2e -- --test-threads=2

test: fmt-check clippy doc import-cycles test-unit test-e2e fuzz-short

## Fuzzing (migration/fuzz, cargo-fuzz on the nightly toolchain; see migration/README.md).
FUZZ_TARGETS := decode_stream receive_records source_replies config_json state_blobs control_request
## Seconds per target: `make fuzz` for a real run, `fuzz-short` (part of `make test`) for a smoke run.
FUZZ_SECONDS ?= 300
FUZZ_SHORT_SECONDS ?= 15
export FUZZ_SANITIZER ?= none

fuzz-deps: deps
	@scripts/fuzz-deps.sh

fuzz-build: fuzz-deps
	cd migration && $(CARGO) +nightly fuzz build -s $(FUZZ_SANITIZER)

fuzz: fuzz-build
	@scripts/fuzz.sh $(FUZZ_SECONDS) $(FUZZ_TARGETS)

fuzz-short: fuzz-build
	@scripts/fuzz.sh $(FUZZ_SHORT_SECONDS) $(FUZZ_TARGETS)

## 100 ping-pong migrations of a busy guest, a faulted attempt before every tenth (make test
## runs 10 of them).
soak: build
	MINIVMM_SOAK_MIGRATIONS=100 $(CARGO) test --release -p e2e --test soak -- --nocapture

bench: build
	$(CARGO) run --release -p bench -- $(BENCH_ARGS)

## From a fresh machine: packages, build, then boot the test guest until its first VERIFY-OK.
demo: build
	@scripts/demo.sh

clean:
	$(CARGO) clean
