# syntax=docker/dockerfile:1
# aksnet node agent image.
#   docker build -t ghcr.io/aksnet/aksnet-agent:0.1.0 .
# The agent binary embeds its eBPF object: aksnet-agent/build.rs builds aksnet-ebpf with nightly
# and bpf-linker, so the builder needs both besides the stable toolchain.

# The runtime stage's base. `cargo xtask image` builds the runtime stage on a Debian bookworm
# made by debootstrap (no registry needed) and replaces the builder stage with the agent built on
# the host at the same path; everything from `FROM ... AS runtime` on is built as written here.
ARG RUNTIME_BASE=debian:bookworm-slim

# Stable 1.95 builds the agent (workspace rust-version); glibc matches the final stage's
# (both Debian bookworm).
FROM rust:1.95-bookworm AS builder

# The eBPF toolchain, as `cargo xtask setup` installs it on a dev machine (xtask/src/setup.rs:
# nightly_rust_src and bpf_linker; keep the versions in step). setup itself is not called: it also
# installs the lab's Debian and Python packages, which an image build does not need.
ARG BPF_LINKER_VERSION=0.13.0
ARG LLVM_MAJOR=22
ENV LLVM_PREFIX=/opt/aksnet-llvm
RUN rustup toolchain install nightly --profile minimal --component rust-src \
 && llvm="$(rustc +nightly -vV | sed -n 's/^LLVM version: \([0-9]*\).*/\1/p')" \
 && if [ "$llvm" != "$LLVM_MAJOR" ]; then \
      echo "nightly now ships LLVM $llvm, bpf-linker is built for LLVM $LLVM_MAJOR: bump BPF_LINKER_VERSION and LLVM_MAJOR here and in xtask/src/setup.rs" >&2; \
      exit 1; \
    fi \
 && lib="$(rustc +nightly --print sysroot)/lib" \
 && so="$(cd "$lib" && ls libLLVM.so.*-nightly)" \
 && mkdir -p "$LLVM_PREFIX/lib" \
 && ln -s "$lib/$so" "$LLVM_PREFIX/lib/libLLVM.so" \
 && ln -s "$lib/$so" "$LLVM_PREFIX/lib/$so" \
 && cargo install bpf-linker --version "$BPF_LINKER_VERSION" \
      --no-default-features --features "llvm-$LLVM_MAJOR"

WORKDIR /src
COPY . .
# Release build of the agent only; the cache mounts keep the registry and both target
# directories (agent and eBPF, under target/) between builds.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p aksnet-agent \
 && install -D -m 0755 target/release/aksnet-agent /out/aksnet-agent

# Small runtime: the binary, iptables for discovery (`iptables-save`, in both the legacy and the
# nft flavour: AKS node images differ in which backend kube-proxy uses), nftables (`nft`, to
# tell kube-proxy's nftables mode) and CA roots.
FROM ${RUNTIME_BASE} AS runtime
RUN apt-get update \
 && apt-get install -y --no-install-recommends iptables nftables ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY --from=builder /out/aksnet-agent /usr/local/bin/aksnet-agent
# Root, not privileged: loading BPF programs needs CAP_BPF/CAP_PERFMON, which Kubernetes grants
# only to root once no_new_privs is set (deploy/base/daemonset.yaml drops everything else).
USER 0
ENTRYPOINT ["/usr/local/bin/aksnet-agent"]
