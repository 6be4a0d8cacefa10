# syntax=docker/dockerfile:1
# One image for every simdevice role: the device agent, the fleet, the local hub and the
# service client. The entrypoint is `simdevice`; the command picks the role.
#
#   docker build -t simdevice .
#   # the local hub (state in a volume; --hostname: the name devices dial)
#   docker run -p 8883:8883 -p 8443:8443 -p 443:4443 -p 8884:8884 -p 8444:8444 -p 5671:5671 \
#       -v simdevice-hub:/var/lib/simdevice simdevice hub --bind 0.0.0.0 --hostname myhost.example
#   # the agent, configured by a mounted file (the default path) ...
#   docker run -v "$PWD/config.toml:/etc/simdevice/config.toml:ro" simdevice run
#   # ... or by the environment (SIMDEVICE__SECTION__KEY overrides the file)
#   docker run -e SIMDEVICE__IDENTITY__CONNECTION_STRING='HostName=...;DeviceId=...;SharedAccessKey=...' \
#       simdevice run
#
# deploy/compose.yaml runs a hub and two devices. The build needs BuildKit (the default since
# Docker 23) for its cache mounts.

FROM rust:1-bookworm AS build
WORKDIR /src
# .dockerignore keeps target/, .git and the Python venvs out of the context.
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin simdevice \
    && install -D -m 0755 target/release/simdevice /out/simdevice

# The same Debian release as the build stage, so the binary's glibc matches. No other
# package: TLS roots are compiled in (webpki-roots), SQLite is bundled.
FROM debian:bookworm-slim
RUN groupadd --system --gid 10001 simdevice \
    && useradd --system --uid 10001 --gid simdevice --no-create-home \
        --home-dir /var/lib/simdevice --shell /usr/sbin/nologin simdevice \
    && install -d -o simdevice -g simdevice -m 0700 /var/lib/simdevice \
    && install -d -m 0755 /etc/simdevice
COPY --from=build /out/simdevice /usr/bin/simdevice
USER simdevice:simdevice
WORKDIR /var/lib/simdevice
# State as under systemd: the hub's in /var/lib/simdevice/hub, the agent's (its outbox) in
# $STATE_DIRECTORY. The agent reads /etc/simdevice/config.toml when mounted, else needs its
# identity from SIMDEVICE__IDENTITY__* variables.
ENV SIMDEVICE_HUB_STATE_DIR=/var/lib/simdevice/hub \
    STATE_DIRECTORY=/var/lib/simdevice
VOLUME ["/var/lib/simdevice"]
# The hub's ports, explicit: as uid 10001 the WebSocket default 443 cannot be bound and would
# fall back to a random port nobody can publish, so the image listens on 4443 (publish it as
# 443: `-p 443:4443`, a Service port 443). The others are the defaults, given explicitly so a
# port that cannot be had fails the start instead of moving: MQTT 8883, service API 8443, DPS
# MQTT 8884 and WebSocket 8444 (real DPS: 8883 and 443 of its own host), Event Hubs AMQP over
# TLS 5671. Plain AMQP 5672 (emulator mode, keys in clear) stays on the container's loopback
# unless `--amqp-plain-bind` widens it (deploy/compose.yaml does, for a development host).
ENV SIMDEVICE_HUB_WS_PORT=4443 \
    SIMDEVICE_HUB_DPS_PORT=8884 \
    SIMDEVICE_HUB_DPS_WS_PORT=8444 \
    SIMDEVICE_HUB_AMQP_PORT=5671 \
    SIMDEVICE_HUB_AMQP_PLAIN_PORT=5672
EXPOSE 8883 8443 4443 8884 8444 5671 5672
ENTRYPOINT ["/usr/bin/simdevice"]
CMD ["hub", "--bind", "0.0.0.0"]
