# syntax=docker/dockerfile:1
#
# One image holding the three llm-proxy binaries in /usr/local/bin:
#   llm-proxy-control-plane, llm-proxy-data-plane, llmctl
# and `llm-proxy`, a symlink to llmctl (the name the Thai seed guide uses: `llm-proxy serve`).
#
#   docker build -t llm-proxy .
#
# Stages:
#   builder     compiles the workspace (BuildKit cache mounts keep the cargo registry and target/
#               between builds, so a rebuild only recompiles what changed)
#   distroless  the binaries on gcr.io/distroless/cc-debian12: no shell, no package manager, no
#               curl; for Kubernetes, whose probes are httpGet (docker build --target distroless)
#   runtime     the default (last stage): Debian slim + ca-certificates + curl, so that
#               docker-compose healthchecks can call /healthz and /readyz from inside the container
#
# Both runtime images run as UID/GID 65532 and also under an arbitrary UID with GID 0
# (OpenShift): the binaries need no home directory and write nothing except under
# /var/lib/llm-proxy (data dir of `llmctl serve`), which is owned by 65532:0 with group write.
# There is no ENTRYPOINT: the command names the binary. The default command is the all-in-one
# gateway (control plane on loopback + data plane on :8132, SQLite and master key in
# /var/lib/llm-proxy; mount a volume there to keep them):
#   docker run -d --name llm-proxy -p 8132:8132 -v llm-proxy:/var/lib/llm-proxy llm-proxy
#   docker exec llm-proxy llmctl connection add ...
# Split deployments give the command instead: `llm-proxy-control-plane serve`,
# `llm-proxy-data-plane` (see docker-compose.yml and charts/llm-proxy).

# The full version, the one rust-toolchain.toml pins: with another, rustup in the builder would
# download that toolchain first.
ARG RUST_VERSION=1.95.0
# The three base images must share one Debian release (the binaries link against its glibc).
ARG DEBIAN_RELEASE=bookworm
ARG DISTROLESS_IMAGE=gcr.io/distroless/cc-debian12:nonroot

# ---------------------------------------------------------------------------------------------
FROM rust:${RUST_VERSION}-${DEBIAN_RELEASE} AS builder
WORKDIR /src
# No protoc (protox compiles the .proto files), SQLite is bundled, aws-lc-rs builds with the
# image's gcc: nothing to install.
COPY . .
# target/ is a cache mount (not part of the image), so the binaries are copied out in the same
# step. Debug info is stripped (the release profile keeps line tables: ~260 MB -> ~56 MB);
# symbols stay, so panics still name their functions.
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/usr/local/cargo/git,sharing=locked \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --release --locked \
        --bin llm-proxy-control-plane --bin llm-proxy-data-plane --bin llmctl \
 && mkdir -p /out/bin \
 && for bin in llm-proxy-control-plane llm-proxy-data-plane llmctl; do \
        objcopy --strip-debug "target/release/$bin" "/out/bin/$bin"; \
    done \
 && ln -s llmctl /out/bin/llm-proxy \
 && install -d -m 0775 /out/data

# ---------------------------------------------------------------------------------------------
FROM ${DISTROLESS_IMAGE} AS distroless
ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="llm-proxy" \
      org.opencontainers.image.description="LLM gateway: control plane, data plane and llmctl (distroless)" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}"
COPY --from=builder --chown=0:0 --chmod=0755 /out/bin/ /usr/local/bin/
COPY --from=builder --chown=65532:0 --chmod=0775 /out/data /var/lib/llm-proxy
# NO_COLOR: plain log lines (no ANSI colours) for container log collectors.
ENV HOME=/var/lib/llm-proxy \
    NO_COLOR=1
WORKDIR /var/lib/llm-proxy
USER 65532:65532
# CP gRPC, DP API, CP metrics/health, DP metrics/health
EXPOSE 8131 8132 9131 9132
CMD ["llmctl", "serve", "--data-dir", "/var/lib/llm-proxy"]

# ---------------------------------------------------------------------------------------------
FROM debian:${DEBIAN_RELEASE}-slim AS runtime
ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="llm-proxy" \
      org.opencontainers.image.description="LLM gateway: control plane, data plane and llmctl" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}"
# ca-certificates: the data plane verifies upstream providers against the system roots.
# curl: container healthchecks (curl -fsS http://127.0.0.1:9132/readyz).
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --gid 65532 nonroot \
 && useradd --uid 65532 --gid 65532 --no-create-home --home-dir /var/lib/llm-proxy \
        --shell /usr/sbin/nologin nonroot \
 && install -d -o 65532 -g 0 -m 0775 /var/lib/llm-proxy
COPY --from=builder --chown=0:0 --chmod=0755 /out/bin/ /usr/local/bin/
# NO_COLOR: plain log lines (no ANSI colours) for container log collectors.
ENV HOME=/var/lib/llm-proxy \
    NO_COLOR=1
WORKDIR /var/lib/llm-proxy
USER 65532:65532
# CP gRPC, DP API, CP metrics/health, DP metrics/health
EXPOSE 8131 8132 9131 9132
CMD ["llmctl", "serve", "--data-dir", "/var/lib/llm-proxy"]
